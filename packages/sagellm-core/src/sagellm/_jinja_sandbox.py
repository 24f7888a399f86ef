"""A Jinja sandbox that also bounds time and memory, for chat templates that clients may send.

Jinja's own sandbox stops attribute escapes but not ``{% set s = 'x' * 10**9 %}``, a loop of
loops, or a macro that doubles its output on every call. This one adds a per-render budget:

* every operation that can make a large value (the binary operators, ``~``, string methods,
  filters, buffer joins, printed values) checks the size of what it is about to make;
* every loop iteration, call, attribute and item lookup checks the render's deadline.

The checks need the running render's budget, which lives in a context variable, so one
environment (and its compiled templates) serves every thread.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that does not compile, raises, or exceeds a limit (a client error)."""


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may use. The defaults leave real templates far below every bound."""

    #: Wall-clock seconds for one render (compilation of a new template is not interruptible,
    #: which is why ``max_template_chars`` bounds it).
    timeout_s: float = 2.0
    #: Longest string any operation may produce, and the longest rendered output.
    max_chars: int = 8 << 20
    #: Longest list or tuple an operator may produce.
    max_items: int = 1 << 20
    #: Largest integer (in bits) arithmetic may produce: 2 ** 4096 is plenty for any template.
    max_int_bits: int = 4096
    #: Longest template source accepted (real ones are a few KiB).
    max_template_chars: int = 256 << 10


@dataclass
class _Budget:
    limits: TemplateLimits
    deadline: float

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError(f"the chat template ran longer than its limit of "
                                    f"{self.limits.timeout_s:g} s")


_budget: ContextVar[_Budget | None] = ContextVar("sagellm_template_budget", default=None)


@contextlib.contextmanager
def budget(limits: TemplateLimits) -> Iterator[None]:
    """Bound the renders run inside this block (in this thread or task)."""
    token = _budget.set(_Budget(limits, time.monotonic() + limits.timeout_s))
    try:
        yield
    finally:
        _budget.reset(token)


def _current() -> _Budget:
    b = _budget.get()
    if b is None:  # rendering outside budget() would be unbounded: refuse instead
        raise RuntimeError("hardened templates must be rendered inside budget()")
    return b


def _too_big(what: str, size: int, limit: int, unit: str = "characters") -> ChatTemplateError:
    return ChatTemplateError(f"the chat template tried to make {what} of {size:,} {unit} "
                             f"(the limit is {limit:,})")


def _text_len(obj: Any, limit: int) -> int:
    """About how many characters ``str(obj)`` has; stops counting once past ``limit``.

    Containers are walked rather than stringified, because a list holding itself twice, ten
    levels deep, is small in memory but prints a thousand times larger."""
    total, steps = 0, 0
    todo = [obj]
    b = _budget.get()
    while todo and total <= limit:
        steps += 1
        if b is not None and steps % 65536 == 0:
            b.tick()
        x = todo.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(x)
            todo.extend(x)
        elif isinstance(x, dict):
            total += 2 + 4 * len(x)
            todo.extend(x.keys())
            todo.extend(x.values())
        elif isinstance(x, jinja2.utils.Namespace):
            total += 16
            todo.append(x._Namespace__attrs)  # type: ignore[attr-defined]
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 2
        else:
            total += 32  # numbers, None, Undefined, callables: short reprs
    return total


def _check_value(value: Any, limits: TemplateLimits) -> Any:
    if isinstance(value, str):
        if len(value) > limits.max_chars:
            raise _too_big("a string", len(value), limits.max_chars)
    elif isinstance(value, (list, tuple)):
        if len(value) > limits.max_items:
            raise _too_big("a list", len(value), limits.max_items, "items")
    elif isinstance(value, int) and value.bit_length() > limits.max_int_bits:
        raise _too_big("an integer", value.bit_length(), limits.max_int_bits, "bits")
    return value


def _sized(x: Any) -> int | None:
    return len(x) if isinstance(x, (str, list, tuple)) else None


#: printf-style field widths and precisions ("%99999999s", "%.99999999f").
_PRINTF_NUMBER = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")
#: str.format field widths ("{:>99999999}").
_FORMAT_NUMBER = re.compile(r"\{[^{}]*:[^{}\d]*(\d+)")


def _check_format_widths(fmt: str, pattern: re.Pattern[str], limits: TemplateLimits) -> None:
    for m in pattern.finditer(fmt):
        for g in m.groups():
            width = int(g) if g and len(g) <= 12 else (10**12 if g else 0)
            if width > limits.max_chars:
                raise _too_big("a formatted field", width, limits.max_chars)


def _check_binop(op: str, left: Any, right: Any, limits: TemplateLimits) -> None:
    """Refuse, before computing it, a result over the limits (computing it is the attack)."""
    if op == "*":
        for seq, n in ((left, right), (right, left)):
            size = _sized(seq)
            if size is not None and isinstance(n, int):
                limit = limits.max_chars if isinstance(seq, str) else limits.max_items
                if size * n > limit:
                    raise _too_big("a repetition", size * n, limit,
                                   "characters" if isinstance(seq, str) else "items")
        if isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() + right.bit_length()
            if bits > limits.max_int_bits:
                raise _too_big("an integer", bits, limits.max_int_bits, "bits")
    elif op == "+":
        a, b = _sized(left), _sized(right)
        if a is not None and b is not None:
            limit = limits.max_chars if isinstance(left, str) else limits.max_items
            if a + b > limit:
                raise _too_big("a concatenation", a + b, limit,
                               "characters" if isinstance(left, str) else "items")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        bits = max(left.bit_length() - 1, 0) * right if right < limits.max_int_bits + 1 else right
        if abs(left) > 1 and bits > limits.max_int_bits:
            raise _too_big("a power", bits, limits.max_int_bits, "bits")
    elif op == "%" and isinstance(left, str):
        _check_format_widths(left, _PRINTF_NUMBER, limits)
        if _text_len(right, limits.max_chars) + len(left) > limits.max_chars:
            raise _too_big("a formatted string", _text_len(right, limits.max_chars),
                           limits.max_chars)


def _check_str_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                      limits: TemplateLimits) -> None:
    """String methods whose result can be much larger than their inputs."""
    # The sandbox hands out str.format wrapped (to sandbox the formatting); look through it.
    target = getattr(getattr(obj, "__wrapped__", obj), "__self__", None)
    if not isinstance(target, str):
        return
    name = getattr(obj, "__name__", "")
    first = args[0] if args else next(iter(kwargs.values()), None)
    estimate = 0
    if name in ("ljust", "rjust", "center", "zfill") and isinstance(first, int):
        estimate = first
    elif name == "expandtabs":
        size = first if isinstance(first, int) else 8
        estimate = len(target) + target.count("\t") * size
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = len(target) + 1 if args[0] == "" else target.count(args[0])
        estimate = len(target) + hits * len(args[1])
    elif name == "join" and args:
        items = args[0]
        if isinstance(items, (list, tuple)):
            estimate = len(target) * len(items) + _text_len(items, limits.max_chars)
    elif name in ("format", "format_map"):
        _check_format_widths(target, _FORMAT_NUMBER, limits)
        estimate = len(target) + _text_len([args, kwargs], limits.max_chars)
    if estimate > limits.max_chars:
        raise _too_big(f"a string (str.{name})", estimate, limits.max_chars)


#: Filters that print their argument (a list is printed whole, however it is nested).
_STRINGIFYING = frozenset({"string", "pprint", "tojson", "upper", "lower", "title", "capitalize",
                           "trim", "striptags", "escape", "e", "forceescape", "urlencode", "urlize",
                           "wordcount", "safe", "center", "indent", "wordwrap", "truncate",
                           "replace", "format"})


#: Filters whose output grows with a width argument times the lines (or items) of their input.
_WIDTH_FILTERS = frozenset({"center", "indent", "format", "replace", "wordwrap", "tojson"})


def _check_filter(name: str, value: Any, rest: list[Any], kwargs: dict[str, Any],
                  limits: TemplateLimits) -> None:
    """Refuse a filter call whose result would exceed the limits, before making it."""
    if name == "sum":
        start = kwargs.get("start", rest[1] if len(rest) > 1 else 0)
        if not isinstance(start, (int, float)):  # adding up lists or strings is quadratic
            raise ChatTemplateError("the sum filter only adds numbers in chat templates")
        return
    if name not in _STRINGIFYING and name != "join":
        return  # |length, |first, |selectattr...: no bigger than their input; skip the walk
    size = len(value) if isinstance(value, str) else _text_len(value, limits.max_chars)
    if name in _STRINGIFYING and size > limits.max_chars:
        raise _too_big(f"a string (|{name})", size, limits.max_chars)
    if name == "join":
        sep = rest[0] if rest and isinstance(rest[0], str) else ""
        n = len(value) if isinstance(value, (list, tuple, str)) else 0
        if size + len(sep) * n > limits.max_chars:
            raise _too_big("a joined string", size + len(sep) * n, limits.max_chars)
    elif name in _WIDTH_FILTERS:
        ints = [a for a in (*rest, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
        width = max(ints, default=0)
        # Indentation repeats per line, and tojson's per item and nesting level.
        lines = size if name == "tojson" else (value.count("\n") + 1 if isinstance(value, str) else 1)
        estimate = size + _text_len(rest, limits.max_chars) + width * lines
        if name == "format" and isinstance(value, str):
            _check_format_widths(value, _PRINTF_NUMBER, limits)
        if name == "replace" and len(rest) >= 2 and isinstance(value, str):
            old, new = rest[0], rest[1]
            if isinstance(old, str) and isinstance(new, str):
                hits = len(value) + 1 if old == "" else value.count(old)
                estimate = len(value) + hits * len(new)
        if estimate > limits.max_chars:
            raise _too_big(f"a string (|{name})", estimate, limits.max_chars)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a built-in filter: the deadline, its arguments where it amplifies, its result."""

    @functools.wraps(func)  # keeps Jinja's pass_context/pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        b = _current()
        b.tick()
        # Marked filters get a context or the environment first; the value comes next.
        i = next((i for i, a in enumerate(args) if not isinstance(
            a, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))), len(args))
        if i < len(args):
            value = args[i]
            if isinstance(value, Iterator):  # measure a generator's items, then pass them on
                value = list(value)
                args = (*args[:i], value, *args[i + 1:])
            _check_filter(name, value, list(args[i + 1:]), kwargs, b.limits)
        return _check_value(func(*args, **kwargs), b.limits)

    return guarded


def _guarded_iter(value: Any) -> Iterator[Any]:
    b = _current()
    b.tick()
    for item in value:
        b.tick()
        yield item


#: The filter a ``{% for %}`` loop's iterable is passed through (a name templates cannot type).
_LOOP_GUARD = "sagellm loop guard"


class _GuardedCodeGenerator(CodeGenerator):
    """Routes loops and ``~`` through the budget (Jinja has no hook for either)."""

    def visit_Template(self, node: jinja2.nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(jinja2.nodes.For):
            loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None,
                                            lineno=loop.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_values((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; a
    renderer for inference only needs the text, so the tag renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation they cannot format.
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore names (a step towards interpreter internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace may not hold {name!r}")


class HardenedEnvironment(ImmutableSandboxedEnvironment):
    """The environment HF chat templates are written for, with every render under a budget."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_GUARD] = _guarded_iter
        self.globals.pop("lipsum", None)  # lipsum(10**7) would be one unbounded call
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_DictFactory(), namespace=_Namespace)

    # -- the sandbox's hooks ------------------------------------------------------------

    def call(__self, __context: jinja2.runtime.Context, __obj: Any,  # noqa: N805
             *args: Any, **kwargs: Any) -> Any:
        b = _current()
        b.tick()
        _check_str_method(__obj, args, kwargs, b.limits)
        return _check_value(super().call(__context, __obj, *args, **kwargs), b.limits)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _current().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _current().tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        b = _current()
        b.tick()
        _check_binop(operator, left, right, b.limits)
        return _check_value(self.binop_table[operator](left, right), b.limits)

    def call_unop(self, context: jinja2.runtime.Context, operator: str, arg: Any) -> Any:
        _current().tick()
        return self.unop_table[operator](arg)

    # -- where text accumulates ---------------------------------------------------------

    def concat(self, parts: Iterable[str]) -> str:  # type: ignore[override]
        """Joins block, macro and whole-template output; counts as it goes, so a runaway
        render stops at the limit instead of after building the whole list."""
        b = _current()
        total, buf = 0, []
        for part in parts:
            total += len(part)
            if total > b.limits.max_chars:
                raise _too_big("output", total, b.limits.max_chars)
            buf.append(part)
        return "".join(buf)

    def concat_values(self, values: tuple[Any, ...]) -> str:
        """``a ~ b``: stringify and join, refusing a result over the limit before making it."""
        b = _current()
        b.tick()
        limit = b.limits.max_chars
        size = sum(_text_len(v, limit) for v in values)
        if size > limit:
            raise _too_big("a string (~)", size, limit)
        return "".join(map(str, values))

    def _finalize(self, value: Any) -> Any:
        # Every {{ value }} is printed with str(): refuse one that would print too much.
        if not isinstance(value, str):
            b = _budget.get()
            if b is not None and _text_len(value, b.limits.max_chars) > b.limits.max_chars:
                raise _too_big("a printed value", _text_len(value, b.limits.max_chars),
                               b.limits.max_chars)
        return value

"""Render chat templates (the model's, or one a client sends) safely, as transformers would.

The one renderer behind ``LLM.chat`` and the server's ``/v1/chat/completions``. It gives
templates what ``transformers``' ``apply_chat_template`` gives them (the special-token
variables, ``messages``, ``tools``, ``documents``, ``add_generation_prompt``,
``raise_exception``, ``strftime_now``, a JSON ``tojson``, loop controls, trimmed blocks), so
real templates render to the same text; and it renders under :class:`TemplateLimits`, so a
hostile template fails with :class:`ChatTemplateError` instead of hanging or eating memory.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2

from sagellm._jinja_sandbox import ChatTemplateError, HardenedEnvironment, TemplateLimits, budget

__all__ = ["DEFAULT_LIMITS", "ChatTemplateError", "TemplateLimits", "apply_chat_template",
           "render_chat_template", "resolve_chat_template", "special_token_variables"]

DEFAULT_LIMITS = TemplateLimits()

#: Names a message's reasoning arrives under; templates read the first (and gpt-oss "thinking").
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@functools.lru_cache(maxsize=1)
def _environment() -> HardenedEnvironment:
    return HardenedEnvironment()


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    # A model's template is compiled once; clients that send one usually resend the same one.
    return _environment().from_string(source)


def _plain(value: Any) -> Any:
    """A copy made of JSON types only: templates then cannot reach methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_message(message: Any) -> dict[str, Any]:
    msg = _plain(message)
    if not isinstance(msg, dict):
        raise ChatTemplateError(f"a chat message must be a dict, got {type(message).__name__}")
    # A missing key, not a None one: templates test `'content' in message` or print "None".
    msg = {k: v for k, v in msg.items() if v is not None}
    reasoning = next((msg[k] for k in _REASONING_KEYS if k in msg), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool = False,
                         tools: Sequence[Mapping[str, Any]] | None = None,
                         documents: Sequence[Mapping[str, Any]] | None = None,
                         limits: TemplateLimits = DEFAULT_LIMITS, **variables: Any) -> str:
    """Render ``template`` for one conversation; ``variables`` (``bos_token``, ...) are
    visible to it. Raises :class:`ChatTemplateError` for anything the template does wrong."""
    if len(template) > limits.max_template_chars:
        raise ChatTemplateError(f"the chat template has {len(template)} characters; the limit is "
                                f"{limits.max_template_chars}")
    with budget(limits):
        try:
            compiled = _compile(template)
            return compiled.render(messages=[_normalize_message(m) for m in messages],
                                   tools=_plain(tools), documents=_plain(documents),
                                   add_generation_prompt=add_generation_prompt,
                                   **_plain(variables))
        except ChatTemplateError:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): "
                                    f"{exc.message}") from None
        except RecursionError:
            raise ChatTemplateError("the chat template recursed too deeply") from None
        except MemoryError:
            raise ChatTemplateError("the chat template ran out of memory") from None
        except jinja2.TemplateError as exc:  # raise_exception(...) and sandbox refusals
            raise ChatTemplateError(f"the chat template refused: {exc}") from None
        except Exception as exc:  # the template's own bug (a type error, a missing key...)
            raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None,
                          tools: Sequence[Any] | None = None) -> str:
    """The template to use: ``chat_template`` (a template, or the name of one of the model's),
    else the model's (its ``tool_use`` one when there are tools and it has one)."""
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, Mapping):
        if chat_template is not None:
            return str(own.get(chat_template, chat_template))
        if tools and "tool_use" in own:
            return str(own["tool_use"])
        if "default" in own:
            return str(own["default"])
        raise ChatTemplateError(f"the model has several chat templates and none is the default; "
                                f"name one of {sorted(own)}")
    if chat_template is not None:
        return chat_template
    if not own:
        raise ChatTemplateError("the model has no chat template; pass one (chat_template)")
    return str(own)


def special_token_variables(tokenizer: Any) -> dict[str, str]:
    """``bos_token``, ``eos_token``, ... as templates see them in transformers."""
    tokens = getattr(tokenizer, "special_tokens_map", None) or {}
    return {k: str(v) for k, v in tokens.items() if isinstance(k, str) and v is not None}


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
                        chat_template: str | None = None, add_generation_prompt: bool = True,
                        tools: Sequence[Mapping[str, Any]] | None = None,
                        documents: Sequence[Mapping[str, Any]] | None = None,
                        limits: TemplateLimits = DEFAULT_LIMITS, **variables: Any) -> str:
    """The prompt text for ``messages`` with ``tokenizer``'s template (or ``chat_template``)."""
    template = resolve_chat_template(tokenizer, chat_template, tools)
    return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                tools=tools, documents=documents, limits=limits,
                                **{**special_token_variables(tokenizer), **variables})

"""The hardened chat-template renderer: the same text as transformers for real templates, and
a prompt ChatTemplateError (not a hang, not a memory blow-up) for hostile ones."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sagellm.chat_template import (
    ChatTemplateError,
    TemplateLimits,
    apply_chat_template,
    render_chat_template,
)

# Written in the style of the Llama 3 / Qwen 2 templates on the Hub (system-message handling,
# tools as JSON, header tokens, namespace state, loop controls), to check that we give them what
# transformers gives them.
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = 'Today is ' + strftime_now('%Y') + '.' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{%- if tools is not none %}\n"
    "    {{- 'You may call these functions:\\n' }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- '\\n\\n' }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role not in ['user', 'assistant', 'tool'] %}\n"
    "        {{- raise_exception('unexpected role ' ~ message.role) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN2_STYLE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}\n"
    "    {{- '\\n\\n# Tools\\n\\n<tools>' }}\n"
    "    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "    {{- '\\n</tools><|im_end|>\\n' }}\n"
    "{%- elif messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(last_user=-1) %}\n"
    "{%- for message in messages %}{%- if message.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and tools %}{%- continue %}{%- endif %}\n"
    "    {%- if message.reasoning_content is defined and loop.index0 > ns.last_user %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n<think>' + message.reasoning_content"
    " + '</think>' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}"
    "{% generation %}{{ message.content }}{% endgeneration %}{{ '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "    {%- if loop.index > 50 %}{%- break %}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "  Be terse.  "}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! ünïcödé ✓"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "4", "reasoning": "2 and 2"},
     {"role": "user", "content": "And 3 + 3?", "name": None}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE, QWEN2_STYLE], ids=["smollm2", "llama3", "qwen2"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_same_text_as_transformers(smol_tokenizer: Any, template: str | None, conv: int,
                                   add_generation_prompt: bool, tools: Any) -> None:
    messages = CONVERSATIONS[conv]
    ours = apply_chat_template(smol_tokenizer, messages, chat_template=template,
                               add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = smol_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=add_generation_prompt, tools=tools)
    assert ours == theirs
    assert "<|im_start|>" in ours or "<|start_header_id|>" in ours


def test_template_errors_are_chat_template_errors(smol_tokenizer: Any) -> None:
    with pytest.raises(ChatTemplateError, match="unexpected role wizard"):
        apply_chat_template(smol_tokenizer, [{"role": "wizard", "content": "x"}], chat_template=LLAMA3_STYLE)
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="has no attribute"):
        render_chat_template("{{ messages[0].content.nothing() }}", [{"role": "user", "content": "x"}])
    assert issubclass(ChatTemplateError, ValueError)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        apply_chat_template(object(), [{"role": "user", "content": "x"}])


def test_sandbox_still_blocks_escapes() -> None:
    # Jinja's sandbox makes an unsafe attribute undefined (printed empty, an error when used).
    for t in ("{{ ''.__class__.__mro__ }}", "{{ messages.__class__ }}", "{{ cycler.__init__.__globals__ }}",
              "{{ dict.__call__.__globals__ }}"):
        try:
            out = render_chat_template(t, [{"role": "user", "content": "x"}])
        except ChatTemplateError as exc:
            assert "unsafe" in str(exc)
        else:
            assert out == ""
    with pytest.raises(ChatTemplateError, match="_x"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [])


LIMITS = TemplateLimits(timeout_s=0.5)
HOSTILE = {
    "huge string repetition": "{% set s = 'x' * 200000000 %}{{ s }}",
    "huge list repetition": "{% set l = [0] * 200000000 %}{{ l|length }}",
    "nested huge loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops over a long string": "{% set s = 'x' * 5000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "deep macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential macro calls": ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}x"
                                "{% endif %}{% endmacro %}{{ f(60) }}"),
    "huge output": "{% set s = 'x' * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
    "huge macro output": ("{% macro m() %}{% for i in range(100000) %}{{ caller() }}{% endfor %}{% endmacro %}"
                          "{% call m() %}{{ 'y' * 1000000 }}{% endcall %}"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}"),
    "nested list printed": ("{% set ns = namespace(l=[1]) %}{% for i in range(50) %}{% set ns.l = [ns.l, ns.l] %}"
                            "{% endfor %}{{ ns.l }}"),
    "join of many copies": "{% set s = 'x' * 1000000 %}{{ ([s] * 100000)|join }}",
    "ljust": "{{ 'x'.ljust(10 ** 10) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "replace empty": "{{ ('x' * 1000000).replace('', 'yyyyyyyyyy') }}",
    "center filter": "{{ 'x'|center(10 ** 10) }}",
    "tojson indent": "{{ ([[1]] * 100000)|tojson(indent=100000) }}",
    "big integer power": "{{ 7 ** 10000000 }}",
    "squaring integers": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
                          "{% endfor %}"),
    "sum of lists": "{{ ([[1]] * 100000)|sum(start=[]) }}",
    "deeply nested expression": "{{ " + "(" * 10000 + "1" + ")" * 10000 + " }}",
    "too long a template": "x" * (LIMITS.max_template_chars + 1),
}


@pytest.mark.parametrize("template", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_fails_fast(template: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        render_chat_template(template, [{"role": "user", "content": "hi"}], limits=LIMITS)
    # The deadline is 0.5 s; the slack is for a loaded machine, not a performance claim.
    assert time.monotonic() - t0 < 10
    assert "chat template" in str(info.value)


def test_limits_are_per_render_and_per_thread() -> None:
    """Renders in several threads at once each keep their own deadline and give correct text."""
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    good = "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}"

    def run(i: int) -> str:
        if i % 2:
            with pytest.raises(ChatTemplateError, match="longer than"):
                render_chat_template(slow, [], limits=LIMITS)
            return "slow"
        return render_chat_template(good, [{"role": "user", "content": str(i)}] * 3)

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(run, range(8)))
    assert out == [f"user={i};user={i};user={i};" if i % 2 == 0 else "slow" for i in range(8)]


def test_generous_templates_within_limits_render() -> None:
    """Large but bounded work stays allowed: the limits are for runaways, not real templates."""
    t = "{% for m in messages %}{{ m.content * 2 }}{% endfor %}{{ (range(1000)|list)|length }}"
    out = render_chat_template(t, [{"role": "user", "content": "ab" * 100000}] * 5)
    assert len(out) == 5 * 400000 + 4


def test_llm_chat_uses_the_hardened_renderer(smol_llm: Any) -> None:
    ids = smol_llm.apply_chat_template([{"role": "user", "content": "hi"}])
    text = smol_llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)
    assert ids == smol_llm.tokenizer(text, add_special_tokens=False).input_ids
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="repetition"):
        smol_llm.chat([{"role": "user", "content": "hi"}], chat_template=HOSTILE["huge string repetition"])
    assert time.monotonic() - t0 < 10

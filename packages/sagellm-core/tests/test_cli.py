"""The ``sagellm`` command line: start-up cost, output formats, threads, streaming chat."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.cli import main
from sagellm.engine.llm_engine import LLMEngine
from sagellm.testing import make_tiny_llama

HEAVY = ("torch", "transformers", "numpy", "pydantic", "safetensors", "gguf", "tokenizers")


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tok"), tokenizer=True)


def test_help_imports_nothing_heavy() -> None:
    """`sagellm --help` (and each subcommand's) parses without torch, transformers or pydantic."""
    code = (
        "import sys, contextlib, io\n"
        "from sagellm.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['chat', '--help'], ['cache', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: main(argv)\n"
        "        except SystemExit: pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bench_is_dispatched_whole() -> None:
    out = subprocess.run([sys.executable, "-m", "sagellm.cli", "bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: sagellm bench" in out.stdout and "--baseline-dir" in out.stdout


def test_generate_separates_outputs_and_prints_json(tiny_chat_model: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    prompts = ["hello", "the second prompt"]
    args = ["generate", "--model", str(tiny_chat_model), "--no-chat", "--max-tokens", "5", *prompts]
    want = LLM(model=str(tiny_chat_model)).generate(
        prompts, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)

    assert main(args) == 0
    out = capsys.readouterr().out
    assert out == (f"--- [1/2] hello\n{want[0].text}\n\n"
                   f"--- [2/2] the second prompt\n{want[1].text}\n")

    assert main([*args, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts and [r["index"] for r in rows] == [0, 1]
    assert [r["text"] for r in rows] == [w.text for w in want]
    # The byte-level tokenizer has one token per byte.
    assert [r["prompt_tokens"] for r in rows] == [len(p.encode()) for p in prompts]
    assert [r["completion_tokens"] for r in rows] == [len(w.token_ids) for w in want]
    assert [r["finish_reason"] for r in rows] == [w.finish_reason for w in want]


def test_one_output_is_printed_bare(tiny_chat_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(tiny_chat_model), "--max-tokens", "3", "hi"]) == 0
    assert not capsys.readouterr().out.startswith("---")


def test_threads_sets_torch_threads(tiny_chat_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        assert main(["generate", "--model", str(tiny_chat_model), "--threads", "1",
                     "--max-tokens", "2", "hi"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["generate", "--model", str(tiny_chat_model), "--threads", "0", "hi"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_chat_streams_and_ctrl_c_stops_only_the_reply(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Text reaches stdout step by step while the request runs; Ctrl-C aborts one reply only."""
    question, story = "What is the capital of France?", "Tell me a long story."
    lines = iter([question, story, question])
    state = {"story_steps": -1}

    def fake_input(prompt: str = "") -> str:
        try:
            line = next(lines)
        except StopIteration:
            raise EOFError from None
        state["story_steps"] = 0 if line == story else -1
        return line

    stdout = io.StringIO()
    seen: list[str] = []  # stdout as it was before each engine step
    engines: list[LLMEngine] = []
    conversations: list[list[dict[str, str]]] = []
    real_step, real_template = LLMEngine.step, LLM.apply_chat_template

    def step(self: LLMEngine):  # type: ignore[no-untyped-def]
        engines.append(self)
        seen.append(stdout.getvalue())
        if state["story_steps"] >= 0:
            state["story_steps"] += 1
            if state["story_steps"] == 3:
                state["story_steps"] = -1
                raise KeyboardInterrupt
        return real_step(self)

    def template(self: LLM, messages, *args, **kwargs):  # type: ignore[no-untyped-def]
        conversations.append([dict(m) for m in messages])
        return real_template(self, messages, *args, **kwargs)

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr(LLMEngine, "step", step)
    monkeypatch.setattr(LLM, "apply_chat_template", template)
    assert main(["chat", "--max-tokens", "16"]) == 0
    text = stdout.getvalue()
    first_reply = text.split("\n")[0]
    assert "Paris" in first_reply and text.count("Paris") == 2
    # Before the first reply was complete, stdout already held growing prefixes of it.
    assert len({s for s in seen if s and first_reply.startswith(s) and s != first_reply}) >= 3
    assert "(reply stopped)" in capsys.readouterr().err
    assert not engines[-1].has_unfinished_requests()  # the interrupted request was aborted
    # The interrupted turn left the conversation: the third prompt follows the first exchange.
    assert [m["content"] for m in conversations[2]] == [question, first_reply, question]

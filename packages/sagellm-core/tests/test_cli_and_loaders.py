"""The ``sagellm`` CLI, the offline API surface and the loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.cli import main
from sagellm.config import EngineConfig
from sagellm.loader.gguf_loader import _unpermute, hf_name


def test_cli_generate_answers_the_capital_of_france() -> None:
    out = subprocess.run([sys.executable, "-m", "sagellm.cli", "generate",
                          "What is the capital of France?", "--max-tokens", "24"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_generate_raw_completion_on_a_local_model(tiny_llama_dir: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--max-tokens" in capsys.readouterr().out
    code = main(["generate", "--model", str(tiny_llama_dir), "--no-chat", "hello"])
    assert code == 2  # the tiny model has no tokenizer: a clear error, not a traceback
    assert "no tokenizer" in capsys.readouterr().err


def test_cli_backend_errors_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--backend", "nosuch", "hi"]) == 2
    assert "'nosuch' is not installed" in capsys.readouterr().err


def test_cli_backends_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {b["name"] for b in data["backends"]}
    assert "cpu" in names and data["auto"] in names


def test_chat_template_and_string_prompts(smol_llm: LLM) -> None:
    ids = smol_llm.apply_chat_template([{"role": "user", "content": "hi"}])
    text = smol_llm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    a = smol_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5),
                          use_tqdm=False)[0]
    b = smol_llm.generate([smol_llm.tokenizer("The capital of France is").input_ids],
                          SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert a.token_ids == b.token_ids and a.text == smol_llm.tokenizer.decode(a.token_ids)
    assert a.prompt == "The capital of France is"


def test_stop_strings_cut_text_and_streamed_deltas_add_up(smol_llm: LLM) -> None:
    eng = smol_llm.engine
    prompt = smol_llm.apply_chat_template([{"role": "user", "content": "Count from 1 to 20."}])
    free = smol_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert len(free.text) > 12
    stop = free.text[8:11]
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))
    pieces, final = [], None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.request_id == rid:
                pieces.append(o.new_text)
                final = o
    assert final is not None and final.finished and final.stop_reason == stop
    assert final.text == free.text[: free.text.index(stop)]
    assert "".join(pieces) == final.text


def test_generate_checks_argument_lengths(smol_llm: LLM) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        smol_llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError):
        EngineConfig(max_prefill_tokens=10_000, max_num_batched_tokens=8192)
    with pytest.raises(ValueError):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError):
        EngineConfig(unknown_field=1)  # type: ignore[call-arg]


def test_dummy_load_format_needs_only_config(tmp_path: Path, tiny_qwen2_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_qwen2_dir / "config.json").read_text())
    llm = LLM(model=str(tmp_path), load_format="dummy", num_kv_blocks=32)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.token_ids) == 4
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(model=str(tmp_path))


def test_missing_model_and_bad_dtype_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LLM(model=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype 'int3'"):
        LLM(model=str(tiny_llama_dir), dtype="int3")


def test_bfloat16_on_cpu_stays_close_to_fp32(tiny_llama_dir: Path) -> None:
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    a = LLM(model=str(tiny_llama_dir), num_kv_blocks=16).generate([[4, 5, 6, 7]], sp, use_tqdm=False)
    b = LLM(model=str(tiny_llama_dir), num_kv_blocks=16, dtype="bfloat16").generate(
        [[4, 5, 6, 7]], sp, use_tqdm=False)
    assert a[0].token_ids[0] == b[0].token_ids[0]


def test_gguf_names_and_rotary_unpermute() -> None:
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.1.attn_k_norm.weight") == "model.layers.1.self_attn.k_norm.weight"
    with pytest.raises(ValueError):
        hf_name("blk.0.mystery.weight")
    # llama.cpp's converter interleaves each head's rotary halves; undoing it restores the rows.
    n_head, rows = 2, 8
    w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    permuted = w.reshape(n_head, 2, rows // n_head // 2, 3).swapaxes(1, 2).reshape(rows, 3)
    assert np.array_equal(_unpermute(permuted, n_head), w)


def test_rope_scaling_variants() -> None:
    from sagellm.layers.rotary import RotaryEmbedding

    base = RotaryEmbedding(8, 64, 10000.0)
    lin = RotaryEmbedding(8, 64, 10000.0, {"rope_type": "linear", "factor": 2.0})
    assert torch.allclose(lin.cos_sin[2], base.cos_sin[1])
    RotaryEmbedding(8, 64, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="not supported"):
        RotaryEmbedding(8, 64, 10000.0, {"rope_type": "yarn", "factor": 2.0})

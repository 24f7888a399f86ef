"""The ``sagellm-server`` command line: every flag the issue names, explained, key never shown."""

from __future__ import annotations

import pytest

from sagellm_server.cli import build_parser, main

FLAGS = ["--model", "--backend", "--host", "--port", "--served-model-name", "--api-key", "--max-model-len",
         "--max-num-seqs", "--max-queued-requests", "--gpu-memory-utilization", "--dtype", "--load-format"]


def test_help_explains_every_flag(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_API_KEY", "s3cret-value")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "s3cret-value" not in out
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings}
    for flag in FLAGS:
        assert flag in out
        assert actions[flag].help and len(actions[flag].help) > 10, flag


def test_safe_defaults() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model, args.backend) == ("127.0.0.1", 8000, None, "auto")
    assert args.api_key is None and args.max_request_body_bytes > 0


def test_bad_engine_config_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-num-seqs", "0"]) == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_every_engine_config_field_is_a_flag() -> None:
    from sagellm.config import EngineConfig
    from sagellm_server.cli import ENGINE_FLAGS

    args = build_parser().parse_args(["--block-size", "32", "--no-enable-prefix-caching",
                                      "--enforce-eager", "--max-prefill-tokens", "64", "--seed", "3"])
    kwargs = ENGINE_FLAGS.config_kwargs(args)
    assert set(kwargs) == set(EngineConfig.model_fields)
    config = EngineConfig(**kwargs)
    assert (config.block_size, config.enable_prefix_caching, config.enforce_eager,
            config.max_prefill_tokens, config.seed) == (32, False, True, 64, 3)
    assert EngineConfig(**ENGINE_FLAGS.config_kwargs(build_parser().parse_args([]))) == EngineConfig()

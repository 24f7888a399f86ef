"""Engine flags generated from EngineConfig: the table stays in sync, every field has a flag with
the right type, and both CLIs build the config from them."""

from __future__ import annotations

import argparse

import pytest

from sagellm import cli
from sagellm.config import EngineConfig
from sagellm.engine_flags import TABLE_PATH, EngineFlags, derive, flag_specs, render


def test_the_generated_table_matches_the_model() -> None:
    assert flag_specs() == derive(), ("sagellm/_engine_fields.py is out of date with EngineConfig: "
                                      "run `python -m sagellm.engine_flags`")
    assert TABLE_PATH.read_text() == render(derive())


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings}


def test_every_field_is_a_flag_of_the_matching_type() -> None:
    p = argparse.ArgumentParser()
    EngineFlags().add_to(p)
    actions = _actions(p)
    assert set(actions) >= set(EngineConfig.model_fields)
    for name, info in EngineConfig.model_fields.items():
        a = actions[name]
        assert a.option_strings[0] == "--" + name.replace("_", "-")
        assert a.default == info.default and a.help and info.description in a.help
    assert actions["block_size"].type is int and actions["gpu_memory_utilization"].type is float
    assert actions["model"].type is str and actions["max_model_len"].type is int
    assert isinstance(actions["enable_prefix_caching"], argparse.BooleanOptionalAction)
    assert actions["load_format"].choices == ["auto", "hf", "safetensors", "gguf", "dummy"]


def test_parsed_flags_build_the_config() -> None:
    flags = EngineFlags()
    p = argparse.ArgumentParser()
    flags.add_to(p)
    assert EngineConfig(**flags.config_kwargs(p.parse_args([]))) == EngineConfig()
    args = p.parse_args(["--block-size", "32", "--no-enable-prefix-caching", "--enforce-eager",
                         "--max-prefill-tokens", "64", "--load-format", "dummy",
                         "--gpu-memory-utilization", "0.5", "--max-model-len", "128"])
    config = EngineConfig(**flags.config_kwargs(args))
    assert (config.block_size, config.enable_prefix_caching, config.enforce_eager) == (32, False, True)
    assert (config.max_prefill_tokens, config.load_format) == (64, "dummy")
    assert (config.gpu_memory_utilization, config.max_model_len) == (0.5, 128)
    with pytest.raises(SystemExit):
        p.parse_args(["--load-format", "pickle"])


def test_renames_and_defaults_and_their_guard() -> None:
    flags = EngineFlags(rename={"seed": "--engine-seed"}, defaults={"max_model_len": 4096})
    p = argparse.ArgumentParser()
    flags.add_to(p)
    args = p.parse_args(["--engine-seed", "7"])
    assert flags.config_kwargs(args)["seed"] == 7 and flags.config_kwargs(args)["max_model_len"] == 4096
    with pytest.raises(AssertionError, match="not EngineConfig fields"):
        EngineFlags(rename={"sede": "--x"})


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_sagellm_command_has_every_field(command: str) -> None:
    parser = cli.build_parser()
    args = parser.parse_args([command, "--block-size", "8", "--engine-seed", "3", "--seed", "5",
                              "--no-enable-prefix-caching"])
    kwargs = cli.ENGINE_FLAGS.config_kwargs(args)
    assert set(kwargs) == set(EngineConfig.model_fields)
    assert (kwargs["block_size"], kwargs["seed"], kwargs["enable_prefix_caching"]) == (8, 3, False)
    assert args.seed == 5  # --seed stays the sampling seed


def test_excluded_fields_are_neither_flags_nor_config_kwargs() -> None:
    flags = EngineFlags(exclude={"kv_eviction"})
    p = argparse.ArgumentParser()
    flags.add_to(p)
    p.add_argument("--kv-eviction", default="lru,lfu")  # the command's own flag of that name
    args = p.parse_args(["--kv-eviction", "lfu,s3fifo", "--tensor-parallel-size", "2"])
    kwargs = flags.config_kwargs(args)
    assert "kv_eviction" not in kwargs and kwargs["tensor_parallel_size"] == 2
    with pytest.raises(AssertionError, match="not EngineConfig fields"):
        EngineFlags(exclude={"kv_evictoin"})

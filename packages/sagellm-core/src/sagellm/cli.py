"""The ``sagellm`` command: ``backends``, ``models``, ``generate``, ``chat``, ``cache``, ``bench``.

Nothing heavy is imported at module level or while parsing: ``sagellm --help`` and ``sagellm
cache`` must answer in a fraction of a second, so torch and transformers load only inside the
commands that run a model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from sagellm.engine_flags import EngineFlags

#: Generated from EngineConfig (no pydantic import: see sagellm.engine_flags). ``--seed`` is the
#: sampling seed here (``SamplingParams.seed``), as it was before the engine's flags were
#: generated, so the engine's own seed is ``--engine-seed``.
ENGINE_FLAGS = EngineFlags(rename={"seed": "--engine-seed"})


def _engine_args(p: argparse.ArgumentParser) -> None:
    ENGINE_FLAGS.add_to(p.add_argument_group("engine"))
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads; default: torch's choice, "
                        "usually one per core)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug (one line per step)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def _make_llm(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    from sagellm.llm import LLM

    return LLM(**ENGINE_FLAGS.config_kwargs(args))


def _params(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from sagellm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)


def cmd_backends(args: argparse.Namespace) -> int:
    from sagellm.plugins import get_registry

    reg = get_registry()
    if args.json:
        choice = reg.auto_choice()
        print(json.dumps({
            "backends": [b.as_dict() for b in reg.backends.values()],
            "failures": [{"entry_point": f.entry_point, "distribution": f.distribution,
                          "version": f.version, "error": f.error} for f in reg.failures],
            "clashes": {n: [b.distribution for b in bs] for n, bs in reg.clashes.items()},
            "auto": choice.name if choice else None,
        }, indent=2))
    else:
        print(reg.describe())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sagellm.cli_models import run_models

    return run_models(args)


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    prompts = args.prompt or [sys.stdin.read()]
    params = _params(args)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if args.json:
            # One object per line (JSON Lines), so scripts can stream-parse several outputs.
            print(json.dumps({"index": i, "prompt": prompt, "text": out.text,
                              "prompt_tokens": out.num_prompt_tokens,
                              "completion_tokens": out.num_output_tokens,
                              "finish_reason": out.finish_reason}))
        elif len(prompts) > 1:
            print(f"{'' if i == 0 else chr(10)}--- [{i + 1}/{len(prompts)}] {_one_line(prompt)}")
            print(out.text)
        else:
            print(out.text)
    return 0


def _one_line(text: str, width: int = 72) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def cmd_chat(args: argparse.Namespace) -> int:
    from sagellm.cli_chat import run_chat

    return run_chat(_make_llm(args), _params(args), args.system)


def cmd_cache(args: argparse.Namespace) -> int:
    from sagellm.cli_cache import run_cache

    return run_cache(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sagellm", description="sageLLM inference engine")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backends", help="list discovered backends and which one auto picks")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backends)
    m = sub.add_parser("models", help="list the supported model architectures and which "
                       "backends run their sliding-window and soft-capped attention")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)
    g = sub.add_parser("generate", help="generate for one or more prompts")
    g.add_argument("prompt", nargs="*", help="prompt text (default: read stdin)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the chat template (default on; --no-chat for raw completion)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object per output (prompt, text, token counts, "
                        "finish_reason), one per line")
    _engine_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model")
    c.add_argument("--system", default=None, help="system prompt")
    _engine_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    from sagellm.cli_cache import add_arguments as cache_args

    k = sub.add_parser("cache", help="list, measure or clear the converted-model cache")
    cache_args(k)
    k.set_defaults(func=cmd_cache)
    # Listed for --help only: `sagellm bench ...` is handed to sagellm.bench.main whole (see
    # main), whose module imports the engine and torch.
    sub.add_parser("bench", help="run the benchmark workloads and compare with a baseline "
                   "(sagellm bench --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from sagellm.bench.main import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0), logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from sagellm.plugins import BackendError

        if isinstance(exc, (BackendError, FileNotFoundError, ValueError)):
            print(f"sagellm: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

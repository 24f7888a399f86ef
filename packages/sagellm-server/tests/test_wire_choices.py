"""The engine-process wire carries each choice's index, logprobs and prompt logprobs, and the
cache salt; a request's key lives until all of its ``n`` choices have finished."""

from __future__ import annotations

import json
import math

from scripted_engine import ScriptedEngine

from sagellm.outputs import TokenLogprob
from sagellm.sampling_params import SamplingParams
from sagellm_server.engine_core import EngineCore, decode_logprobs, encode_logprobs
from sagellm_server.engine_process import WireOutput


def test_logprobs_round_trip_including_minus_infinity() -> None:
    entries = [None, TokenLogprob(5, -math.inf, 3, ((1, -0.1), (2, -0.2)))]
    wire = json.loads(json.dumps(encode_logprobs(entries)))
    assert decode_logprobs(wire) == entries
    assert decode_logprobs(None) is None


def test_n_choices_cross_the_wire() -> None:
    engine = ScriptedEngine()
    core = EngineCore(engine, None, None)  # type: ignore[arg-type]
    params = SamplingParams(n=2, max_tokens=8, logprobs=1, prompt_logprobs=0)
    prompt = [ord(c) for c in "REPLY:ab"]
    assert core.apply(json.dumps(["add", 7, "r", prompt, params.model_dump(), "salt"]).encode())
    assert engine.added[0][3] == "salt" and engine.added[0][2].n == 2
    seen: list[WireOutput] = []
    while engine.has_unfinished_requests():
        _, items, errors = core.encode(engine.step())
        assert errors == []
        seen += [WireOutput("r", json.loads(json.dumps(it)), len(prompt)) for it in items]
    assert sorted(o.index for o in seen) == [0, 0, 1, 1]
    finals = [o for o in seen if o.finished]
    assert [o.text for o in finals] == ["ab", "ab"]
    assert all(o.new_logprobs[0].top == ((o.new_token_ids[0] + 1, -1.0),) for o in seen)
    first = [o for o in seen if o.prompt_logprobs is not None]
    assert first and first[0].prompt_logprobs[0] is None and len(first[0].prompt_logprobs) == len(prompt)
    assert core.keys == {} and core.unfinished == {}

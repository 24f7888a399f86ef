"""The engine-process wire carries each choice's index, logprobs and prompt logprobs, and the
cache salt; a request's key lives until all of its ``n`` choices have finished."""

from __future__ import annotations

import json
import math
import struct

from scripted_engine import ScriptedEngine

from sagellm.outputs import TokenLogprob
from sagellm.sampling_params import SamplingParams
from sagellm_server.engine_core import EngineCore, decode_logprobs, encode_logprobs
from sagellm_server.engine_process import WireOutput


def test_logprobs_round_trip_including_minus_infinity() -> None:
    """Float32 values (what the engine computes) cross exactly, -inf and NaN included; no
    float is written as JSON."""
    f32 = [float(struct.unpack("f", struct.pack("f", x))[0]) for x in (-0.1, -0.2, -1e-30)]
    entries = [None, TokenLogprob(5, -math.inf, 3, ((1, f32[0]), (2, f32[1]))),
               TokenLogprob(7, f32[2], 1, ()), TokenLogprob(8, -0.5, 2, ((9, math.nan),))]
    text = json.dumps(encode_logprobs(entries))
    assert "." not in text and "Infinity" not in text and "NaN" not in text
    back = decode_logprobs(json.loads(text))
    assert back is not None and back[:3] == entries[:3]
    last = back[3]
    assert last is not None and last.logprob == -0.5 and math.isnan(last.top[0][1])
    assert decode_logprobs(None) is None
    rounded = decode_logprobs(json.loads(json.dumps(encode_logprobs(
        [TokenLogprob(1, -0.1, 1, ())]))))
    assert rounded is not None and rounded[0] is not None and rounded[0].logprob == f32[0]


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

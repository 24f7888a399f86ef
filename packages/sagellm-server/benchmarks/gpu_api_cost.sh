#!/usr/bin/env bash
# What the OpenAI features cost on one GPU: serve_c16 (16 streaming clients, 64 requests,
# 512-token prompts, 256 tokens out) against one sagellm-server, once plain and once with each
# feature on every request: a small JSON schema (structured_outputs), presence/frequency/
# repetition penalties, logprobs=5.
#
#   packages/sagellm-server/benchmarks/gpu_api_cost.sh MODEL_DIR
#
# Run from the repository root; carry .whl (shared/device/wheels.sh plus the llguidance wheel)
# and the model folder. Writes $OUT/api_<variant>.json and $OUT/api_cost.txt (the table).
# Time: server start-up (~45 s) + about 10-20 s per variant on an H200.
set -u
MODEL=${1:?usage: gpu_api_cost.sh MODEL_DIR}
OUT=${OUT:-bench-results}; PORT=${PORT:-8766}; mkdir -p "$OUT"
source "$(dirname "$0")/../../sagellm-core/benchmarks/device_env.sh"
start_server "$OUT/api_server.log" --model "$MODEL" --load-format dummy --backend cuda \
  --max-model-len 4096 --log-interval 0
URL=http://127.0.0.1:$PORT
SCHEMA='{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"}},"required":["name","age"]}'
declare -A BODY=(
  [plain]=''
  [json_schema]="{\"structured_outputs\": {\"json\": $SCHEMA}}"
  [penalties]='{"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}'
  [logprobs5]='{"logprobs": 5}'
)
for v in plain json_schema penalties logprobs5; do
  extra=()
  [ -n "${BODY[$v]}" ] && extra=(--serve-extra-body "${BODY[$v]}")
  python3 -m sagellm.bench --serve-url "$URL" --workloads serve_c16 --out "$OUT/api_$v.json" \
    "${extra[@]}" > /dev/null 2>&1 || echo "variant $v failed"
done
python3 - "$OUT" <<'PY' | tee "$OUT/api_cost.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = {v: json.loads((out / f"api_{v}.json").read_text())["serve_c16"]
        for v in ("plain", "json_schema", "penalties", "logprobs5") if (out / f"api_{v}.json").exists()}
base = rows.get("plain")
print(f"{'serve_c16':<12}{'tok/s':>10}{'TPOT p50':>10}{'TTFT p50':>10}{'errors':>8}{'vs plain':>10}")
for v, r in rows.items():
    ratio = r["out_tok_s"] / base["out_tok_s"] if base else float("nan")
    print(f"{v:<12}{r['out_tok_s']:>10,.0f}{r['tpot_ms']['p50']:>10.2f}{r['ttft_ms']['p50']:>10.1f}"
          f"{r['n_errors']:>8}{ratio:>10.3f}")
PY
stop_server
trap - EXIT

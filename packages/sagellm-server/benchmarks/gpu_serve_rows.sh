#!/usr/bin/env bash
# Serving rows on this GPU against one engine's OpenAI server, through `sagellm bench`'s client
# (the same requests for both engines): sageLLM's sagellm-server, or vLLM's server installed by
# ../shared/bench/peer/README.md into /tmp/vsite. Both start with the same settings (dummy
# weights, bfloat16, max_model_len 4096, 0.85 of the GPU's memory).
#
#   packages/sagellm-server/benchmarks/gpu_serve_rows.sh sagellm|vllm MODEL_DIR TAG [server args]
#
# Run from the repository root with the carried wheels (device_env.sh). WORKLOADS (default
# serve_c16,serve_c64,serve_mixed) run one after another against one server; writes
# $OUT/serve_<engine>_<TAG>.json (the bench JSON, with the server's start-up seconds) and
# $OUT/serve_<engine>_<TAG>.log (the server's log).
set -u
ENGINE=${1:?usage: gpu_serve_rows.sh sagellm|vllm MODEL_DIR TAG [server args]}
MODEL=${2:?model folder}; TAG=${3:?tag}; shift 3
OUT=${OUT:-bench-results}; PORT=${PORT:-8766}; mkdir -p "$OUT"
WORKLOADS=${WORKLOADS:-serve_c16,serve_c64,serve_mixed}
source "$(dirname "$0")/../../sagellm-core/benchmarks/device_env.sh"
LOG=$OUT/serve_${ENGINE}_$TAG.log
t0=$(date +%s)
if [ "$ENGINE" = vllm ]; then
  PYTHONPATH=/tmp/vsite:/tmp/vsite/nvidia_cutlass_dsl/dsl_packages \
    python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --load-format dummy \
    --dtype bfloat16 --max-model-len 4096 --gpu-memory-utilization 0.85 --port "$PORT" \
    --served-model-name bench "$@" > "$LOG" 2>&1 &
else
  python3 -m sagellm_server.cli --model "$MODEL" --load-format dummy --backend cuda \
    --max-model-len 4096 --gpu-memory-utilization 0.85 --port "$PORT" --log-interval 0 "$@" \
    > "$LOG" 2>&1 &
fi
SERVER=$!
stop() { kill -TERM "$SERVER" 2>/dev/null; for _ in $(seq 30); do kill -0 "$SERVER" 2>/dev/null || return 0; sleep 1; done; kill -KILL "$SERVER" 2>/dev/null; }
trap stop EXIT
until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/v1/models', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$SERVER" 2>/dev/null || (( $(date +%s) - t0 > ${STARTUP_TIMEOUT:-400} )); then
    echo "$ENGINE did not come up"; tail -30 "$LOG"; exit 2
  fi
  sleep 1
done
startup=$(( $(date +%s) - t0 ))
echo "$ENGINE up after $startup s"
python3 -m sagellm.bench --serve-url "http://127.0.0.1:$PORT" --workloads "$WORKLOADS" \
  --out "$OUT/serve_${ENGINE}_$TAG.json" 2>&1 | tail -12
python3 - "$OUT/serve_${ENGINE}_$TAG.json" "$ENGINE" "$startup" "$*" <<'PY'
import json, sys
path, engine, startup, args = sys.argv[1:]
d = json.load(open(path))
d["peer"] = {"engine": engine, "startup_s": int(startup), "server_args": args}
json.dump(d, open(path, "w"), indent=1)
PY

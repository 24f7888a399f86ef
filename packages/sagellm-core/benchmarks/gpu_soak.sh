#!/usr/bin/env bash
# The soak (sagellm bench --workloads soak) against a real sagellm-server on one GPU.
#
#   packages/sagellm-core/benchmarks/gpu_soak.sh MODEL_DIR [CLIENTS] [SECONDS]
#
# MODEL_DIR: the bench model's config directory (Qwen2.5-1.5B architecture, random weights via
# --load-format dummy), e.g. .benchmodel/qwen2.5-1.5b-arch. CLIENTS: the levels, default
# 64,128,256. SECONDS: per level, default 180. Run from the repository root. Writes
# $OUT/soak.json (the bench JSON, soak under "soak"), $OUT/soak.log (the table) and
# $OUT/soak_server.log; exits 1 if a level failed, 2 if the server did not come up.
#
# Warm-up: at the highest concurrency, not judged, in 30 s slices until the server's and the
# engine's RSS grew < 0.2% over the last slice (the prefix cache fills the KV pool with indexed
# blocks over the first ~7-10k requests, and the engine's RSS climbs until it is full): at least
# SOAK_WARMUP (30 s), at most SOAK_WARMUP_MAX (240 s); the table's [warm] row says which
# ("steady after 90 s" / "cap reached"). If the cap is reached, the first judged level may still
# fail rss_growth on the fill-up: raise SOAK_WARMUP_MAX (or SOAK_WARMUP) rather than read it as
# a leak. A fixed warm-up: SOAK_WARMUP_MAX=$SOAK_WARMUP.
#
# Time: server start-up (~15-60 s) + warm-up (SOAK_WARMUP to SOAK_WARMUP_MAX, plus a few s of
# drain per slice) + per level SECONDS + the drain of the last requests (a few s) + the idle wait.
# One 10-minute device call fits start-up, the worst-case 240 s warm-up and at most
# ~300 s of levels, so give each call one level (every call starts a fresh server, so each warms
# up again, at that call's highest concurrency, so a 64-client call fills the cache slower):
#     gpu_soak.sh .benchmodel/qwen2.5-1.5b-arch 64          (~4.5-8 min)
#     gpu_soak.sh .benchmodel/qwen2.5-1.5b-arch 128
#     gpu_soak.sh .benchmodel/qwen2.5-1.5b-arch 256
# (each writes $OUT/soak.json again; fetch a call's files before the next), or shorten the
# levels: gpu_soak.sh MODEL 64,128 120 (~5.5-9 min).
#
# Device call (packages/sagellm-cuda/README.md): carry ".whl" (shared/device/wheels.sh) and the
# model folder, e.g. ".benchmodel", with timeout_s 600:
#     bash packages/sagellm-core/benchmarks/gpu_soak.sh .benchmodel/qwen2.5-1.5b-arch 64
# Environment: OUT (default bench-results), PORT (8765), SOAK_WARMUP (30 s: the warm-up's
# minimum), SOAK_WARMUP_MAX (240 s: its cap), SOAK_ARGS (more sagellm bench options, e.g.
# "--soak-bad-kinds invalid_json,chat_bad_role" or "--soak-warmup-steady 0.001"), SERVER_ARGS
# (more sagellm-server options), STARTUP_TIMEOUT (400 s), BACKEND (cuda).
set -u
MODEL=${1:?usage: gpu_soak.sh MODEL_DIR [CLIENTS] [SECONDS]}
CLIENTS=${2:-64,128,256}
LEVEL_S=${3:-180}
OUT=${OUT:-bench-results}; PORT=${PORT:-8765}; mkdir -p "$OUT"
source "$(dirname "$0")/device_env.sh"
python3 -c "import fastapi, uvicorn, pydantic, prometheus_client" || {
  echo "gpu_soak.sh: the server's dependencies are missing: carry .whl (shared/device/wheels.sh)"; exit 2; }
KEY=soak-$RANDOM$RANDOM
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

start_server "$OUT/soak_server.log" --model "$MODEL" --load-format dummy \
  --backend "${BACKEND:-cuda}" --max-model-len 4096 --max-num-seqs 256 --api-key "$KEY" \
  --log-interval 10 ${SERVER_ARGS:-}
echo "levels $CLIENTS x ${LEVEL_S} s"

SAGELLM_API_KEY=$KEY python3 -m sagellm.bench --workloads soak --serve-url "http://127.0.0.1:$PORT" \
  --soak-clients "$CLIENTS" --soak-seconds "$LEVEL_S" --soak-warmup-seconds "${SOAK_WARMUP:-30}" \
  --soak-warmup-max-seconds "${SOAK_WARMUP_MAX:-240}" --soak-warmup-slice-seconds 30 \
  --soak-warmup-steady 0.002 \
  --soak-disconnect 0.3 --out "$OUT/soak.json" ${SOAK_ARGS:-} 2>&1 | tee "$OUT/soak.log"
RC=${PIPESTATUS[0]}
stop_server
trap - EXIT
tail -5 "$OUT/soak_server.log"
exit "$RC"

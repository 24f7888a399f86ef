#!/usr/bin/env bash
# One device call: GPU tests, decode profile, full benchmark. Run from the repository root on
# the GPU machine with .whl and .benchmodel carried (see packages/sagellm-cuda/README.md).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | tr '\n' ':')
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
STEPS=${STEPS:-tests,profile,bench}
if [[ $STEPS == *tests* ]]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu packages/sagellm-cuda/tests -p no:cacheprovider \
    -x --tb=short ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | grep -E "passed|failed|Error|error|assert" | tail -30
fi
if [[ $STEPS == *profile* ]]; then
  timeout 150 python3 packages/sagellm-cuda/tools/profile_decode.py .benchmodel/qwen2.5-1.5b-arch "$OUT/profile.json" 2>&1 | tee "$OUT/profile.log" | tail -60
fi
if [[ $STEPS == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-300} python3 -m sagellm.bench --model .benchmodel/qwen2.5-1.5b-arch \
    --platform-class sagellm_cuda.plugin:CudaPlatform --backend cuda \
    --baseline-dir .benchmodel/baselines --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -25
fi

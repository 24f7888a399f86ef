#!/usr/bin/env bash
# One device call: GPU tests, decode profile, full benchmark. Run from the repository root on
# the GPU machine with .whl and .benchmodel carried (see packages/sagellm-cuda/README.md).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$(ls -d packages/*/src | tr '\n' ':')
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Entry points for the packages on PYTHONPATH (not pip-installed here), so discovery finds them.
for spec in "sagellm_core:sagellm-core:cpu = sagellm.backends.cpu" "sagellm_cuda:sagellm-cuda:cuda = sagellm_cuda.plugin"; do
  IFS=: read -r mod dist ep <<<"$spec"; d=/tmp/site/$mod-0.1.0.dist-info; mkdir -p $d
  printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "$dist" > $d/METADATA
  printf '[sagellm.backends]\n%s\n' "$ep" > $d/entry_points.txt
done
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
if [[ $STEPS == *serve* ]]; then
  python3 -m sagellm_server.cli --model .benchmodel/qwen2.5-1.5b-arch --load-format dummy --backend cuda \
    --max-model-len 4096 --port 8011 > "$OUT/server.log" 2>&1 &
  SP=$!
  for i in $(seq 150); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health', timeout=2)" 2>/dev/null && break; sleep 1; done
  echo "server up after ${i}s"
  timeout ${SERVE_TIMEOUT:-150} python3 -m sagellm.bench --model .benchmodel/qwen2.5-1.5b-arch --workloads serve_c1,serve_c16 \
    --serve-url http://127.0.0.1:8011 --baseline-dir .benchmodel/baselines --out "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log" | tail -12
  kill $SP; wait $SP 2>/dev/null; tail -5 "$OUT/server.log"
fi

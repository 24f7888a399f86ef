#!/usr/bin/env bash
# The MoE benchmark row: Qwen3-30B-A3B architecture (random weights) on one GPU, the
# batch16_512_256 and nano256_random workloads, through `sagellm bench`.
#
#   packages/sagellm-core/benchmarks/gpu_moe_row.sh [OUT_DIR [more sagellm bench options]]
#
# Run from the repository root on an H200 (the model is ~61 GB in bf16; an 80 GB card leaves
# little KV room at 0.85). Writes OUT_DIR/qwen3-30b-a3b.json (default $OUT, else
# bench-results). Time: start-up (dummy init of 30.5B parameters, Triton JIT of the MoE kernels,
# graph capture) plus the two rows; budget one 10-minute device call.
#
# Side by side with vLLM (../shared/bench/peer/README.md): after installing its bundle, the same
# directory works with `python3 /tmp/vb/offline.py --engine vllm --model MODEL_DIR
# --workloads batch,nano --out v.json` (and `--engine sagellm` through the same harness).
# SAGELLM_CUDA_NO_FUSION=1 runs core's torch experts path instead of the fused kernel (slow: a
# per-expert loop with a host sync; a baseline, not a contender).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
MODEL="$HERE/models/qwen3-30b-a3b-arch"
DEST="${1:-${OUT:-bench-results}}"
shift || true
mkdir -p "$DEST"
PYTHONPATH="$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}" \
  python3 -m sagellm.bench --model "$MODEL" --workloads batch16_512_256,nano256_random \
  --platform-class "${PLATFORM_CLASS:-sagellm_cuda.plugin:CudaPlatform}" \
  --out "$DEST/qwen3-30b-a3b.json" "$@"

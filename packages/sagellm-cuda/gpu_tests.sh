#!/usr/bin/env bash
# The GPU test suite on the device machine: every test marked gpu, in the CUDA package and in
# core (tests that need CUDA), with the carried wheels (../sagellm-core/benchmarks/device_env.sh).
#   packages/sagellm-cuda/gpu_tests.sh [pytest args]      (from the repository root)
set -u
source packages/sagellm-core/benchmarks/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -m gpu packages/sagellm-cuda/tests packages/sagellm-core/tests -q -rs -p no:cacheprovider "$@"

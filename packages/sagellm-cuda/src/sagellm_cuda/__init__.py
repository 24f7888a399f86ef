"""sagellm-cuda: NVIDIA CUDA backend for sageLLM (Triton kernels, CUDA graphs, NCCL)."""

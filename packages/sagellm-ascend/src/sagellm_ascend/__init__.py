"""sagellm-ascend: Huawei Ascend NPU backend for sageLLM (torch_npu, HCCL)."""

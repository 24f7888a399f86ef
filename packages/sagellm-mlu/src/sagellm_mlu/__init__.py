"""sagellm-mlu: Cambricon MLU backend for sageLLM (torch_mlu, CNCL)."""

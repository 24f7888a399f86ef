"""Per-step host values to the device: values, dtypes and the whole-batch shortcut."""

from __future__ import annotations

import torch

from sagellm.layers.step_tensors import row_index, step_tensor

CPU = torch.device("cpu")


def test_step_tensor_keeps_values_and_dtype() -> None:
    t = step_tensor([3, 1, 2], torch.int64, CPU)
    assert t.dtype == torch.int64 and t.tolist() == [3, 1, 2] and t.device == CPU
    f = step_tensor([0.5, -1.25], torch.float32, CPU)
    assert f.dtype == torch.float32 and f.tolist() == [0.5, -1.25]
    assert step_tensor([], torch.int64, CPU).numel() == 0


def test_row_index_is_none_for_the_whole_batch() -> None:
    assert row_index([0, 1, 2], 3, CPU) is None
    idx = row_index([0, 2], 3, CPU)
    assert idx is not None and idx.tolist() == [0, 2] and idx.dtype == torch.int64

"""NcclComm on a one-rank process group: it refuses any group that is not NCCL, and on an NCCL
group it is core's torch.distributed communication waiting on its own CUDA device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sagellm_cuda import comm
from sagellm_cuda.comm import NcclComm
from sagellm_cuda.plugin import CudaPlatform


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_non_nccl_group_is_refused_by_name(gloo_group: None) -> None:
    with pytest.raises(RuntimeError, match="needs an nccl process group, this one is 'gloo'"):
        CudaPlatform(0).make_comm_backend(0, 1)


def test_on_an_nccl_group_it_syncs_its_own_device(gloo_group: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[torch.device] = []
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    c = CudaPlatform(1).make_comm_backend(0, 1)
    assert isinstance(c, NcclComm)
    assert (c.rank, c.world_size, c.device) == (0, 1, torch.device("cuda", 1))
    t = torch.ones(3)
    assert c.all_reduce(t) is t  # one rank: nothing to reduce, nothing to wait for
    assert waited == []
    # Two ranks whose collective is faked: with sync=True each op waits for its own device.
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: tensor.mul_(2))
    timed = NcclComm(torch.device("cuda", 1), sync=True)
    assert timed.all_reduce(torch.ones(3)).tolist() == [2.0, 2.0, 2.0]
    assert waited == [torch.device("cuda", 1)]
    assert timed.get_bandwidth_stats().as_dict()

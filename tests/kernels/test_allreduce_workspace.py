"""When the one-shot all-reduce kernel may serve a group, and what happens when it may not."""

import logging

import pytest
import torch
import torch.distributed as dist

from gemma4_passes.kernels import allreduce_dispatch as dispatch
from gemma4_passes.kernels import allreduce_workspace as workspaces

CUDA = torch.device("cuda", 0)  # only its type is read: no GPU needed


@pytest.fixture(scope="module")
def gloo_world():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD.group_name
    if created:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(workspaces.ENV_SWITCH, raising=False)
    dispatch._GROUPS.clear()
    dispatch._REASONS_LOGGED.clear()
    yield
    workspaces.release_all()


def test_reason_without_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this session")
    assert "not initialised" in workspaces.fusion_unavailable_reason("0", CUDA)


def test_reasons(monkeypatch, gloo_world):
    assert "needs CUDA" in workspaces.fusion_unavailable_reason(gloo_world, torch.device("cpu"))
    assert "cannot be resolved" in workspaces.fusion_unavailable_reason("no-such-group", CUDA)
    assert "world size 1" in workspaces.fusion_unavailable_reason(gloo_world, CUDA)
    monkeypatch.setenv(workspaces.ENV_SWITCH, "0")
    assert workspaces.fusion_unavailable_reason(gloo_world, CUDA) == f"{workspaces.ENV_SWITCH}=0"
    monkeypatch.setenv(workspaces.ENV_SWITCH, "force")
    assert workspaces.fusion_unavailable_reason("no-such-group", torch.device("cpu")) is None


def test_dispatch_falls_back_with_one_log_line(caplog, gloo_world):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        assert dispatch.oneshot_workspace(x, gloo_world) is None
        assert dispatch.oneshot_workspace(x, gloo_world) is None
        assert dispatch.oneshot_workspace(x.float(), gloo_world) is None
    lines = [r.getMessage() for r in caplog.records if "NCCL + fused-epilogue path" in r.getMessage()]
    assert len(lines) == 2, lines  # one per distinct reason: the device, then the dtype
    assert "device cpu" in lines[0] and "float32" in lines[1]


def test_thresholds_table():
    assert dispatch.THRESHOLDS[("H200", 2)].oneshot_max_tokens >= 128
    assert dispatch.thresholds_for(torch.device("cpu"), 2) == dispatch.DEFAULT


def test_no_allocation_under_capture(monkeypatch, gloo_world):
    monkeypatch.setattr(workspaces, "_capturing", lambda: True)
    with pytest.raises(workspaces.SymmetricMemoryUnavailable, match="before CUDA-graph capture"):
        workspaces.get(gloo_world, CUDA, 1024)


def test_allocation_failure_is_a_clear_error(gloo_world):
    # symmetric memory cannot be set up on CPU: the error names the group and the way out
    with pytest.raises(workspaces.SymmetricMemoryUnavailable, match=workspaces.ENV_SWITCH) as err:
        workspaces._allocate(gloo_world, torch.device("cpu"), 1024)
    assert repr(gloo_world) in str(err.value)

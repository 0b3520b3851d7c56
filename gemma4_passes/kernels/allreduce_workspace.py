"""Symmetric-memory workspaces for the one-shot all-reduce epilogue kernels.

One workspace per (process group, CUDA device): a torch symmetric-memory buffer that every rank of
the group can write into, split as ``[3 slots][world ranks][capacity elements]``.  A call pushes its
rows into ``slot = calls % 3`` of every rank's buffer (see :mod:`.oneshot_allreduce`); empty slots
hold the sentinel -0.0 (bits 0x8000 for bf16 and fp16, the only dtypes the kernel takes), so the
buffer is filled with it once at allocation and each call puts it back behind itself.

Lifecycle: a workspace is allocated once per group on the first call made outside CUDA-graph
capture (or ahead of time with :func:`prepare`), sized for the largest call it must serve, reused by
every graph and capture afterwards, grown (again outside capture) if a later call is wider, and
freed by :func:`release_all` (registered at exit).  Allocation is collective: every rank of the
group must reach it, which holds because every rank runs the same model step.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger("gemma4_passes")

#: Ranks the kernel is built for (one push per peer; the grid is the same on every rank).
SUPPORTED_WORLD_SIZES = (2, 4, 8)
#: The sentinel is -0.0 in a 16-bit float; fp32 calls take the all-reduce + epilogue fallback.
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
#: Rotating slots: a rank can be at most one call ahead of a peer, so slot n+3 == n is free again.
SLOTS = 3
#: Default capacity: rows x hidden elements per rank per slot (2048 rows of Gemma-4 31B's 5376).
DEFAULT_CAPACITY_ELEMS = 2048 * 5376
#: ``0``: keep the all-reduce unfused (the pass leaves the graph alone).  ``force``: fold it even
#: where the kernel cannot run (the op then takes the all-reduce + fused-epilogue fallback): for
#: CPU (gloo) harnesses and tests of the matching itself.
ENV_SWITCH = "GEMMA4_PASSES_ONESHOT_AR"


class SymmetricMemoryUnavailable(RuntimeError):
    """torch symmetric memory cannot be set up for this group (the message says why)."""


def fusion_unavailable_reason(group_name: str, device: torch.device) -> Optional[str]:
    """Why the one-shot kernel cannot serve an all-reduce over ``group_name`` on ``device``.

    Static checks only (no collective, safe at compile time): None means the pass may fold the
    all-reduce; the workspace itself is allocated at the first eager call.
    """
    from ..envflags import env_flag, switched_off

    if switched_off(ENV_SWITCH):
        return f"{ENV_SWITCH}=0"
    if env_flag(ENV_SWITCH) == "force":
        return None
    if device.type != "cuda":
        return f"the all-reduce runs on {device.type}; the one-shot kernel needs CUDA"
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return "torch.distributed is not initialised"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        from torch.distributed.distributed_c10d import _resolve_process_group
    except ImportError as exc:  # pragma: no cover - every supported torch has both
        return f"torch symmetric memory is missing ({exc})"
    try:
        pg = _resolve_process_group(group_name)
    except Exception as exc:  # noqa: BLE001 - an unknown name raises differently across versions
        return f"process group {group_name!r} cannot be resolved ({exc})"
    world = pg.size()
    if world not in SUPPORTED_WORLD_SIZES:
        return f"world size {world} (the kernel takes {SUPPORTED_WORLD_SIZES})"
    if world > torch.cuda.device_count():
        return f"the group spans {world} ranks but this host has {torch.cuda.device_count()} GPUs"
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and local.isdigit() and int(local) < world:
        return f"the group spans hosts (LOCAL_WORLD_SIZE={local} < {world}); symmetric memory is intra-node"
    try:
        backend = str(dist.get_backend(pg)).lower()
    except Exception:  # noqa: BLE001
        backend = "unknown"
    if "nccl" not in backend:
        return f"the group's backend is {backend}, not nccl"
    return None


@dataclass
class Workspace:
    group_name: str
    device: torch.device
    world: int
    rank: int
    capacity: int  # elements per rank per slot
    buffer: torch.Tensor  # symmetric, int16 [SLOTS * world * capacity]
    handle: object
    peer_ptrs: torch.Tensor  # int64 [world] on the device: every rank's buffer base address
    state: torch.Tensor  # int32 [2] on the device: call counter, programs finished this call
    calls: int = field(default=0)

    def fits(self, rows: int, n: int) -> bool:
        return rows * n <= self.capacity


_WORKSPACES: dict[tuple[str, int], Workspace] = {}


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _allocate(group_name: str, device: torch.device, capacity: int) -> Workspace:
    import torch.distributed._symmetric_memory as symm_mem
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group_name)
    world, rank = pg.size(), pg.rank()
    try:
        buf = symm_mem.empty(SLOTS * world * capacity, dtype=torch.int16, device=device)
        buf.fill_(-32768)  # 0x8000: -0.0 in bf16 and fp16, the "no data yet" sentinel
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(buf, group_name)  # collective: after it every peer's fill is done
    except Exception as exc:  # noqa: BLE001 - backends raise RuntimeError, ValueError, ...
        raise SymmetricMemoryUnavailable(
            f"gemma4_passes: torch symmetric memory could not be set up for group {group_name!r} on {device} "
            f"({type(exc).__name__}: {exc}); set {ENV_SWITCH}=0 to keep the all-reduce unfused"
        ) from exc
    ptrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
    state = torch.zeros(2, dtype=torch.int32, device=device)
    torch.cuda.synchronize(device)
    log.info("gemma4_passes: one-shot all-reduce workspace for group %r: %d ranks, %.1f MiB per rank",
             group_name, world, buf.numel() * 2 / 2**20)
    return Workspace(group_name, device, world, rank, capacity, buf, handle, ptrs, state)


def prepare(group_name: str, device, capacity_elems: int = DEFAULT_CAPACITY_ELEMS) -> Workspace:
    """Allocate (collectively) the group's workspace ahead of CUDA-graph capture."""
    return get(group_name, torch.device(device), capacity_elems)


def get(group_name: str, device: torch.device, need_elems: int) -> Workspace:
    """The group's workspace on ``device`` holding at least ``need_elems`` per rank and slot."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (group_name, device.index)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.capacity >= need_elems:
        return ws
    if _capturing():
        raise SymmetricMemoryUnavailable(
            f"gemma4_passes: the one-shot all-reduce workspace for group {group_name!r} must be allocated "
            f"before CUDA-graph capture (run one step eagerly first, or call "
            f"gemma4_passes.kernels.allreduce_workspace.prepare({group_name!r}, device, {need_elems}))"
        )
    capacity = max(need_elems, DEFAULT_CAPACITY_ELEMS if ws is None else 2 * ws.capacity)
    if ws is not None:
        torch.cuda.synchronize(device)
        release(group_name, device)
    ws = _allocate(group_name, device, capacity)
    _WORKSPACES[key] = ws
    return ws


def release(group_name: str, device: torch.device) -> None:
    _WORKSPACES.pop((group_name, device.index), None)


def release_all() -> None:
    """Free every workspace (at exit; call before ``destroy_process_group`` to free earlier)."""
    _WORKSPACES.clear()


atexit.register(release_all)

"""Which kernel serves an ``allreduce_*`` epilogue op call: one table of measured thresholds.

Per (GPU, world size): up to ``oneshot_max_tokens`` rows the one-shot symmetric-memory kernel
(:mod:`.oneshot_allreduce`) runs; above it one-shot loses to the graph's own all-reduce (every rank
reads every peer's rows), so the op runs NCCL's all-reduce followed by the spine's fused epilogue
kernel.  Figures behind each entry are in benchmarks/RESULTS.md (bench_allreduce.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from . import allreduce_workspace as workspaces
from .norm_residual import MAX_BLOCK

log = logging.getLogger("gemma4_passes")


@dataclass(frozen=True)
class Thresholds:
    oneshot_max_tokens: int


#: (device-name substring, world size) -> thresholds; the first matching entry wins.
THRESHOLDS: dict[tuple[str, int], Thresholds] = {
    # 2x H200, hidden 5376, bf16 (RESULTS.md, 2026-11-23), post-FFN site: one-shot (16 warps) 62.9 us
    # vs NCCL + fused epilogue 82.8 at 1024 tokens, 129.1 vs 141.7 at 2048; 4096+ not measured with
    # 16 warps (8 warps lost from 2048 on)
    ("H200", 2): Thresholds(oneshot_max_tokens=2048),
}
#: GPUs and world sizes not measured yet: a conservative decode-sized limit.
DEFAULT = Thresholds(oneshot_max_tokens=256)

_REASONS_LOGGED: set[tuple[str, str]] = set()
_GROUPS: dict[tuple[str, str], tuple[Optional[str], int]] = {}


def thresholds_for(device: torch.device, world: int) -> Thresholds:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    for (gpu, ws), t in THRESHOLDS.items():
        if ws == world and gpu in name:
            return t
    return DEFAULT


def _log_once(group_name: str, reason: str) -> None:
    if (group_name, reason) not in _REASONS_LOGGED:
        _REASONS_LOGGED.add((group_name, reason))
        log.info("gemma4_passes: all-reduce over group %r takes the NCCL + fused-epilogue path: %s",
                 group_name, reason)


def oneshot_workspace(x: torch.Tensor, group_name: str):
    """The workspace to run ``x``'s all-reduce epilogue with the one-shot kernel, or None (fallback)."""
    if x.dtype not in workspaces.SUPPORTED_DTYPES:
        _log_once(group_name, f"dtype {x.dtype} (the one-shot kernel takes bf16/fp16)")
        return None
    n = x.shape[-1]
    rows = x.numel() // max(n, 1)
    key = (group_name, str(x.device))
    if key not in _GROUPS:
        _GROUPS[key] = _group_check(group_name, x.device)
    reason, world = _GROUPS[key]
    if reason is not None:
        _log_once(group_name, reason)
        return None
    if triton_block(n) > MAX_BLOCK:
        _log_once(group_name, f"hidden size {n} above the kernel's {MAX_BLOCK}")
        return None
    limit = thresholds_for(x.device, world).oneshot_max_tokens
    if rows > limit:
        return None  # a size where NCCL + the fused epilogue measured faster
    return workspaces.get(group_name, x.device, max(limit * n, rows * n))


def _group_check(group_name: str, device: torch.device) -> tuple[Optional[str], int]:
    """(why the one-shot kernel cannot run for this group and device, or None; the world size)."""
    if device.type != "cuda":
        return f"device {device.type}", 0
    reason = workspaces.fusion_unavailable_reason(group_name, device)
    if reason is not None:
        return reason, 0
    from torch.distributed.distributed_c10d import _resolve_process_group

    world = _resolve_process_group(group_name).size()
    if world not in workspaces.SUPPORTED_WORLD_SIZES:
        return f"world size {world}", world
    return None, world


def triton_block(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())

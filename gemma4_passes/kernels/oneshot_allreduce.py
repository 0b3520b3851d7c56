"""One-shot all-reduce with the Gemma-4 norm-before-residual epilogue in the same launch.

``out = round(residual + rms(AR(x), w)) [* scalar]`` and optionally ``normed = rms(out, next_w)``,
where ``AR(x)`` is the sum of ``x`` over the ranks of a process group, accumulated in fp32 in rank
order 0..W-1 and rounded once to the io dtype (as the all-reduce's own output is), so every rank
gets bitwise-identical results and, for two ranks, the same bits as NCCL + the spine's kernel.

Protocol (push, no barrier on the hot path).  Every rank owns a symmetric buffer
``[3 slots][W ranks][capacity]`` (:mod:`.allreduce_workspace`) whose empty elements hold the
sentinel -0.0.  A call with slot ``s``:

1. push: each program copies its rows of ``x`` (a -0.0 turned into +0.0, so data never looks
   empty) into ``buf[s][my_rank]`` of every rank, itself included, with plain stores over NVLink;
2. reduce: it spins (volatile loads) on ``buf[s][r]`` of its own buffer until no element of its
   rows is the sentinel, sums r = 0..W-1 in fp32, writes the sentinel back, and runs the epilogue;
3. the last program to finish advances the slot ``s -> (s + 1) % 3`` (a device counter: replays
   of a captured CUDA graph need no host-side state).

Why three slots and no barrier: a rank leaves call n only after every peer has pushed call n, which
each did after finishing call n-1; so when any rank pushes call n+1 (slot s+1) nobody still reads
slot s-1 == s+2, and slot s (still being read) is not written until call n+3.  The grid is the
same on every rank and at most one program per SM, so all programs are resident and the spin
cannot starve a peer's push.

A rank that never arrives (a skipped call) makes its peers spin: after ``timeout_s`` the waiting
program prints which rank it was waiting for and traps, so the process fails with a CUDA error
instead of hanging.

``phase`` (tests only): 1 runs the push alone, 2 the reduce alone, so the CPU interpreter can play
several ranks in turn; 0 (production) runs both in one launch.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .allreduce_workspace import SUPPORTED_DTYPES, SUPPORTED_WORLD_SIZES
from .norm_residual import (MAX_BLOCK, _check_out, _check_scalar, _check_vector, _epilogue_params, _io_code,
                            _norm_residual_tile, _round_io)

__all__ = ["oneshot_allreduce_norm", "DEFAULT_TIMEOUT_S"]

#: How long a program waits for a peer's rows before it traps.  Generous: a peer may still be
#: compiling its first graph while this rank already waits in its first call.
DEFAULT_TIMEOUT_S = float(os.environ.get("GEMMA4_PASSES_AR_TIMEOUT_S", "600"))

_SENTINEL = tl.constexpr(-32768)  # 0x8000 as int16: -0.0 in bf16 and fp16


@triton.jit
def _globaltimer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _trap():
    tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _oneshot_allreduce_norm_kernel(
    x_ptr, r_ptr, w_ptr, scalar_ptr, nw_ptr, out_ptr, normed_ptr,
    peers_ptr,  # int64 [WORLD]: every rank's buffer base address
    state_ptr,  # int32 [2] (this rank): current slot, programs finished in this call
    M, N, cap, rank, eps, next_eps, timeout_ns,
    WORLD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    SECOND_NORM: tl.constexpr,
    HAS_NEXT_W: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
    PHASE: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    nblocks = tl.cdiv(M, ROWS)
    dt = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N

    slot = tl.load(state_ptr, volatile=True)
    slot_off = slot.to(tl.int64) * WORLD * cap
    # buffer bases are 16-byte aligned allocations and every offset below is a multiple of 8
    # elements (N and cap are): say so, or each 2-byte element is its own load/store
    mine = tl.multiple_of(tl.load(peers_ptr + rank).to(tl.pointer_type(dt)), 16)

    if PHASE != 2:  # push this program's rows into every rank's buffer, ours included
        for b in range(pid, nblocks, nprog):
            rows = b * ROWS + tl.arange(0, ROWS)
            mask = (rows < M)[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            v = tl.load(x_ptr + offs, mask=mask, other=0.0)
            v = tl.where(v.to(tl.int16, bitcast=True) == _SENTINEL, tl.zeros_like(v), v)
            for r in tl.static_range(WORLD):
                dst = tl.multiple_of(tl.load(peers_ptr + r).to(tl.pointer_type(dt)), 16)
                tl.store(dst + slot_off + rank * cap + offs, v, mask=mask)

    if PHASE != 1:  # wait for every rank's rows, sum in rank order, epilogue
        for b in range(pid, nblocks, nprog):
            rows = b * ROWS + tl.arange(0, ROWS)
            mask = (rows < M)[:, None] & col_ok[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            # everything the epilogue reads besides the sum is loaded before the wait, to overlap it
            res = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w, sc, nw = _epilogue_params(w_ptr, scalar_ptr, nw_ptr, cols, col_ok, HAS_SCALAR, HAS_NEXT_W)
            empty = tl.full([ROWS, BLOCK_N], _SENTINEL, tl.int16).to(dt, bitcast=True)
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for r in tl.static_range(WORLD):
                src = mine + slot_off + r * cap + offs
                v = tl.load(src, mask=mask, other=0.0, volatile=True)
                pending = tl.sum((v.to(tl.int16, bitcast=True) == _SENTINEL).to(tl.int32))
                if pending > 0:  # rank r has not pushed these rows yet: spin, with a deadline
                    start = _globaltimer()
                    while pending > 0:
                        v = tl.load(src, mask=mask, other=0.0, volatile=True)
                        pending = tl.sum((v.to(tl.int16, bitcast=True) == _SENTINEL).to(tl.int32))
                        if pending > 0:
                            if _globaltimer() - start > timeout_ns:
                                tl.device_print("gemma4_passes one-shot all-reduce TIMED OUT waiting for rank ", r)
                                _trap()
                acc += v.to(tl.float32)
                tl.store(src, empty, mask=mask)  # the slot is empty again for call n+3
            reduced = _round_io(acc, IO)  # the all-reduce's own output dtype
            _norm_residual_tile(reduced, res, w, sc, nw, col_ok, mask, offs, out_ptr, normed_ptr, N, eps, next_eps,
                                IO, HAS_SCALAR, SECOND_NORM, HAS_NEXT_W, UNROUNDED_SUM)
        # the last program out advances the slot (all programs read it at their start)
        # relaxed: the count only finds the last program; the slot it stores is read by the next
        # launch, which the kernel boundary orders
        done = tl.atomic_add(state_ptr + 1, 1, sem="relaxed")
        if done == nprog - 1:
            tl.store(state_ptr + 1, 0)
            tl.store(state_ptr, (slot + 1) % 3)


def _grid_programs(device: torch.device) -> int:
    """One program per SM at most (all resident: a spinning program never waits on an unscheduled one)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def _warps(block: int) -> int:
    """2x H200, N=5376 (block 8192): 16 warps 5.5 / 9.6 / 129 us at 1 / 128 / 2048 rows vs 8 warps
    5.9 / 9.9 / 152 and 4 warps 7.8 / 12.1 / 213 (benchmarks/RESULTS.md)."""
    if block >= 8192:
        return 16
    return 8 if block >= 4096 else 4


def oneshot_allreduce_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor],
    next_weight: Optional[torch.Tensor],
    eps: float,
    next_eps: float,
    second: bool,
    workspace,
    *,
    unrounded_sum: bool = False,
    timeout_s: Optional[float] = None,
    phase: int = 0,
    programs: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    normed_out: Optional[torch.Tensor] = None,
    num_warps: Optional[int] = None,
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(normed, residual_out)`` of the epilogue applied to the sum of ``x`` over the workspace's group.

    ``x``, ``residual``: [..., N] bf16/fp16, same shape (made contiguous).  ``workspace``: an
    :class:`~.allreduce_workspace.Workspace` (or any object with ``world``, ``rank``, ``capacity``,
    ``peer_ptrs``, ``state``) holding at least ``rows * N`` elements.  ``normed`` is None unless
    ``second``.  Every rank must make the same call (same shape, flags and ``programs``).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"one-shot all-reduce: dtype {x.dtype} unsupported (bf16/fp16 only)")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {residual.dtype} {tuple(residual.shape)} does not match x {x.dtype} "
                         f"{tuple(x.shape)}")
    if workspace.world not in SUPPORTED_WORLD_SIZES:
        raise ValueError(f"world size {workspace.world} unsupported ({SUPPORTED_WORLD_SIZES})")
    if phase not in (0, 1, 2):
        raise ValueError("phase must be 0, 1 or 2")
    n = x.shape[-1]
    m = x.numel() // max(n, 1)
    if m * n > workspace.capacity:
        raise ValueError(f"{m} rows of {n} exceed the workspace ({workspace.capacity} elements per rank)")
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        raise ValueError(f"hidden size {n} too large for the one-shot kernel (max {MAX_BLOCK})")
    weight = _check_vector(weight, n, "weight", x)
    if scalar is not None:
        _check_scalar(scalar, "scalar", x)
    if next_weight is not None:
        next_weight = _check_vector(next_weight, n, "next_weight", x)
    if unrounded_sum and scalar is not None:
        raise ValueError("unrounded_sum=True takes no scalar")
    x = x.contiguous()
    residual = residual.contiguous()
    out = _check_out(out, x.shape, x.dtype, x, "out")
    if second:
        normed_out = _check_out(normed_out, x.shape, x.dtype, x, "normed_out")
    if m == 0:
        return (normed_out if second else None), out
    rows = 1 if block >= 1024 else max(1, 1024 // block)
    nblocks = triton.cdiv(m, rows)
    grid = min(nblocks, programs or _grid_programs(x.device))
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
    _oneshot_allreduce_norm_kernel[(grid,)](
        x, residual, weight,
        scalar if scalar is not None else weight,
        next_weight if next_weight is not None else weight,
        out, normed_out if second else out,
        workspace.peer_ptrs, workspace.state,
        m, n, workspace.capacity, workspace.rank, float(eps), float(next_eps), int(timeout * 1e9),
        WORLD=workspace.world, BLOCK_N=block, ROWS=rows, IO=_io_code(x, "x"),
        HAS_SCALAR=scalar is not None, SECOND_NORM=bool(second), HAS_NEXT_W=next_weight is not None,
        UNROUNDED_SUM=bool(unrounded_sum), PHASE=phase,
        num_warps=num_warps or _warps(block),
        enable_fp_fusion=False,  # round like the unfused all-reduce + epilogue, op by op
    )
    return (normed_out if second else None), out

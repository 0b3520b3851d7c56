"""Triton kernel for the index work of an MoE expert dispatch (transformers' ``grouped_mm`` path).

From the flat expert ids of ``S = T * k`` (token, slot) pairs, transformers computes, before and
around its two grouped GEMMs (see :func:`gemma4_passes.kernels.reference.moe_dispatch_ref`)::

    sorted_ids, perm = sort(ids)                       # entries grouped by expert
    hidden_sorted    = hidden[perm // k]               # the GEMM input rows, in expert order
    weights_sorted   = weights[perm]
    offsets          = cumsum(histc(ids, bins=E, min=0, max=E-1), dtype=int32)
    inv_perm         = empty_like(perm); inv_perm[perm] = arange(S)

Under Inductor that is a sort, a gather, histc (memset + kernel), a scan and a scatter: several
launches per MoE layer, whatever the token count.  This kernel produces all six in ONE launch.

Sorting by counting.  The sorted position of entry ``j`` with id ``x`` is its stable rank:
``#{ids < x} + #{i < j : ids[i] == x}``.  Grid ``(E + 2, NSPLIT)``; program ``(b, s)``:

* ``b <= E`` ("bucket" b: the entries whose id equals b; bucket E holds transformers' expert-
  parallel sentinel, which is E): pass 1 scans all ids counting ``< b``, ``== b`` and ``< 0``
  (the run of bucket b starts at ``#{< b}``; ``offsets[b] = #{< b} + #{== b} - #{< 0}`` for
  b < E, i.e. histc's counts with out-of-range ids dropped, cumulated).  Pass 2 scans again; a
  cumsum of ``ids == b`` inside each block ranks the bucket's entries in original order, and the
  program stores perm / sorted ids / inv_perm / the weights of the ranks ``[lo, hi)`` that are its
  share (split ``s`` of ``NSPLIT``: heavy buckets are copied by several programs).  Then it copies
  the hidden rows of its share: it reads its own ``perm`` stores back after a CTA barrier (so the
  copy runs over the bucket's rows only, ``ROWS x BLOCK_H`` tiles) instead of scanning masked
  tiles of all S entries.
* ``b == E + 1``: every other id (negative, or above E: no Gemma-4 code produces them) by the
  general rank formula, ``O(S)`` per entry, in ``BLOCK_J``-entry blocks skipped when they hold
  none.  Correct for any int ids, slow only if many such ids exist.

So the output equals ``torch.sort(ids, stable=True)`` (ties in original order; torch.sort without
``stable`` is free to order ties otherwise, which no consumer of the dispatch observes: each row's
GEMM output goes back to its own slot through inv_perm), histc's semantics for ids outside
``[0, E)`` (dropped from the offsets) and sort's (they sit before / after the in-range ids, by
value).  ``zero_sentinel_rows``: the hidden rows of ids ``>= E`` are written as zeros (transformers
5.17 masks those rows right after the gather: ``masked_fill(ids_sorted >= E, 0)``).

Cost: every program reads all S ids twice (bucket programs with no rows in their share: once), so
``2 * S * (E + 2) * NSPLIT`` id loads, from L2.  For decode-sized S (T <= 64, k = 8: S <= 512) that
is a few microseconds' latency-bound work in one launch; the row copy moves the same bytes as
Inductor's gather.  Large S (prefill) still runs in one launch, with the scans' L2 traffic growing
with S * E; block sizes and NSPLIT are untuned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .norm_residual import _check_out, _check_same_device, _require_launchable

__all__ = ["moe_dispatch_triton", "IDS_DTYPES", "MAX_TOP_K"]

IDS_DTYPES = (torch.int64, torch.int32)
#: k is a compile-time constant of the kernel (the row index is ``perm // k``)
MAX_TOP_K = 64
_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_NAMES = ("sorted_ids", "perm", "offsets", "inv_perm", "hidden_sorted", "weights_sorted")


@triton.jit
def _copy_rows(
    perm_ptr, h_ptr, h_stride, hout_ptr, H,
    start, lo, hi, zero,
    TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """hidden_sorted[start + r] = hidden[perm[start + r] // k] for ranks r in [lo, hi) (0 if zero)."""
    rr = tl.arange(0, ROWS)
    cc = tl.arange(0, BLOCK_H)
    for r0 in range(lo, hi, ROWS):
        r = r0 + rr
        r_ok = r < hi
        slot = (start + r).to(tl.int64)
        src = tl.load(perm_ptr + slot, mask=r_ok, other=0, cache_modifier=".cg")  # own stores, L2
        row = (src // TOP_K).to(tl.int64)
        read = r_ok & ((rr * 0 + zero) == 0)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + cc
            c_ok = (cols < H)[None, :]
            v = tl.load(h_ptr + row[:, None] * h_stride + cols[None, :], mask=read[:, None] & c_ok, other=0.0)
            tl.store(hout_ptr + slot[:, None] * H + cols[None, :], v, mask=r_ok[:, None] & c_ok)


@triton.jit
def _moe_dispatch_kernel(
    ids_ptr, ids_stride,
    h_ptr, h_stride, H,
    w_ptr, w_stride,
    sorted_ptr, perm_ptr, offs_ptr, inv_ptr, hout_ptr, wout_ptr,
    S, E,
    TOP_K: tl.constexpr,
    NSPLIT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_J: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_HIDDEN: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ZERO_SENTINEL: tl.constexpr,
):
    b = tl.program_id(0)
    s = tl.program_id(1)
    if b <= E:
        offs = tl.arange(0, BLOCK_S)
        # pass 1: where bucket b starts in the sorted order, its size, the negative ids
        below = 0
        n_b = 0
        neg = 0
        for i0 in range(0, S, BLOCK_S):
            idx = i0 + offs
            ok = idx < S
            x = tl.load(ids_ptr + idx.to(tl.int64) * ids_stride, mask=ok, other=0)
            below += tl.sum(((x < b) & ok).to(tl.int32), axis=0)
            n_b += tl.sum(((x == b) & ok).to(tl.int32), axis=0)
            neg += tl.sum(((x < 0) & ok).to(tl.int32), axis=0)
        if (b < E) & (s == 0):
            tl.store(offs_ptr + b, below + n_b - neg)  # cumsum of histc: ids in [0, b]
        chunk = tl.cdiv(n_b, NSPLIT)
        lo = s * chunk
        hi = tl.minimum(n_b, lo + chunk)
        if lo < hi:
            # pass 2: rank the bucket's entries in original order, store this split's share
            seen = 0
            for i0 in range(0, S, BLOCK_S):
                idx = i0 + offs
                ok = idx < S
                x = tl.load(ids_ptr + idx.to(tl.int64) * ids_stride, mask=ok, other=0)
                hit = (x == b) & ok
                rank = seen + tl.cumsum(hit.to(tl.int32), axis=0) - 1
                mine = hit & (rank >= lo) & (rank < hi)
                dest = (below + rank).to(tl.int64)
                tl.store(perm_ptr + dest, idx.to(tl.int64), mask=mine)
                tl.store(sorted_ptr + dest, x, mask=mine)
                tl.store(inv_ptr + idx, dest, mask=mine)
                if HAS_WEIGHTS:
                    wv = tl.load(w_ptr + idx.to(tl.int64) * w_stride, mask=mine, other=0.0)
                    tl.store(wout_ptr + dest, wv, mask=mine)
                seen += tl.sum(hit.to(tl.int32), axis=0)
            if HAS_HIDDEN:
                tl.debug_barrier()  # this program's perm stores, visible to all of its threads
                if ZERO_SENTINEL:
                    zero = (b == E).to(tl.int32)  # bucket E: the sentinel rows
                else:
                    zero = b * 0
                _copy_rows(perm_ptr, h_ptr, h_stride, hout_ptr, H, below, lo, hi, zero, TOP_K, ROWS, BLOCK_H)
    else:
        # ids < 0 or > E: the general stable rank, block by block (skipped where there are none)
        jj = tl.arange(0, BLOCK_J)
        cc = tl.arange(0, BLOCK_H)
        for j0 in range(s * BLOCK_J, S, NSPLIT * BLOCK_J):
            j = j0 + jj
            ok_j = j < S
            xj = tl.load(ids_ptr + j.to(tl.int64) * ids_stride, mask=ok_j, other=0)
            odd = ok_j & ((xj < 0) | (xj > E))
            if tl.sum(odd.to(tl.int32), axis=0) > 0:
                rank = tl.zeros([BLOCK_J], dtype=tl.int32)
                for i0 in range(0, S, BLOCK_J):
                    i = i0 + jj
                    ok_i = i < S
                    xi = tl.load(ids_ptr + i.to(tl.int64) * ids_stride, mask=ok_i, other=0)
                    before = (xi[None, :] < xj[:, None]) | ((xi[None, :] == xj[:, None]) & (i[None, :] < j[:, None]))
                    rank += tl.sum((before & ok_i[None, :]).to(tl.int32), axis=1)
                dest = rank.to(tl.int64)
                tl.store(perm_ptr + dest, j.to(tl.int64), mask=odd)
                tl.store(sorted_ptr + dest, xj, mask=odd)
                tl.store(inv_ptr + j, dest, mask=odd)
                if HAS_WEIGHTS:
                    wv = tl.load(w_ptr + j.to(tl.int64) * w_stride, mask=odd, other=0.0)
                    tl.store(wout_ptr + dest, wv, mask=odd)
                if HAS_HIDDEN:  # masked BLOCK_J-row tiles: a rare path
                    keep = odd
                    if ZERO_SENTINEL:
                        keep = odd & (xj < E)
                    row = (j // TOP_K).to(tl.int64)
                    for h0 in range(0, H, BLOCK_H):
                        cols = h0 + cc
                        c_ok = (cols < H)[None, :]
                        v = tl.load(h_ptr + row[:, None] * h_stride + cols[None, :], mask=keep[:, None] & c_ok,
                                    other=0.0)
                        tl.store(hout_ptr + dest[:, None] * H + cols[None, :], v, mask=odd[:, None] & c_ok)


def _launch_shape(s: int, e: int, h: int) -> dict:
    """Block sizes and the split of heavy buckets (untuned: decode sizes first)."""
    block_h = min(triton.next_power_of_2(max(h, 1)), 1024)
    return dict(
        NSPLIT=max(1, min(4, triton.next_power_of_2(triton.cdiv(s, 16 * e)))),  # ~16+ rows per split
        BLOCK_S=max(16, min(1024, triton.next_power_of_2(s))),
        BLOCK_J=32,
        ROWS=max(1, min(8, 4096 // block_h)),
        BLOCK_H=block_h,
    )


def _as_vector(t: torch.Tensor, n: int, what: str, ref: torch.Tensor) -> torch.Tensor:
    if t.numel() != n:
        raise ValueError(f"{what} has {t.numel()} elements (shape {tuple(t.shape)}), expected S={n}")
    _check_same_device(ref, t, what)
    return t.reshape(n)


def moe_dispatch_triton(
    expert_ids: torch.Tensor,
    hidden: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    num_experts: int,
    top_k: int,
    zero_sentinel_rows: bool = False,
    *,
    out: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> tuple[torch.Tensor, ...]:
    """``(sorted_ids, perm, offsets, inv_perm, hidden_sorted, weights_sorted)`` in one launch.

    ``expert_ids``: S int64/int32 ids (any shape, flattened; values outside ``[0, E)`` allowed, see
    the module docstring).  ``hidden``: [T, H] bf16/fp16/fp32 with ``T * top_k == S`` (last dim
    contiguous, any row stride), or None (no row gather; ``hidden_sorted`` is then None).
    ``weights``: S floats (any shape) or None (``weights_sorted`` None).  Returns contiguous
    ``sorted_ids`` [S] (ids' dtype), ``perm`` [S] int64, ``offsets`` [E] int32, ``inv_perm`` [S]
    int64, ``hidden_sorted`` [S, H], ``weights_sorted`` [S]; or writes into ``out`` (six contiguous
    tensors of exactly those shapes and dtypes, None for the ones not computed).
    """
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in IDS_DTYPES:
        got = expert_ids.dtype if isinstance(expert_ids, torch.Tensor) else type(expert_ids).__name__
        raise ValueError(f"expert_ids must be an int64 or int32 tensor, got {got}")
    for name, v, upper in (("num_experts", num_experts, 2**30), ("top_k", top_k, MAX_TOP_K)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= upper:
            raise ValueError(f"{name} must be an int in [1, {upper}], got {v!r}")
    ids = expert_ids.reshape(-1)
    s, e = ids.numel(), num_experts
    dev = ids.device
    if hidden is not None:
        if hidden.dim() != 2 or hidden.dtype not in _ROW_DTYPES:
            raise ValueError(f"hidden must be a 2-D float tensor [T, H], got {hidden.dtype} {tuple(hidden.shape)}")
        if hidden.shape[0] * top_k != s:
            raise ValueError(f"hidden has {hidden.shape[0]} rows; expected S / top_k = {s} / {top_k}")
        _check_same_device(ids, hidden, "hidden")
        if hidden.shape[1] > 1 and hidden.stride(1) != 1:
            hidden = hidden.contiguous()
    if weights is not None:
        if weights.dtype not in _ROW_DTYPES:
            raise ValueError(f"weights: unsupported dtype {weights.dtype}")
        weights = _as_vector(weights, s, "weights", ids)
    h = hidden.shape[1] if hidden is not None else 0
    want = (
        ((s,), ids.dtype), ((s,), torch.int64), ((e,), torch.int32), ((s,), torch.int64),
        ((s, h), hidden.dtype) if hidden is not None else None,
        ((s,), weights.dtype) if weights is not None else None,
    )
    given = tuple(out) if out is not None else (None,) * 6
    if len(given) != 6:
        raise ValueError(f"out must hold 6 tensors {_OUT_NAMES}, got {len(given)}")
    res = [None if w is None else _check_out(o, w[0], w[1], ids, f"out[{n}]")
           for o, w, n in zip(given, want, _OUT_NAMES)]
    if s == 0:
        res[2].zero_()  # histc of nothing
        return tuple(res)
    _require_launchable(_moe_dispatch_kernel, ids)
    cfg = _launch_shape(s, e, h)
    dummy = res[0]  # any pointer for the absent tensors (never dereferenced)
    _moe_dispatch_kernel[(e + 2, cfg["NSPLIT"])](
        ids, ids.stride(0) if s > 1 else 1,
        hidden if hidden is not None else dummy, hidden.stride(0) if hidden is not None else 0, h,
        weights if weights is not None else dummy, weights.stride(0) if weights is not None and s > 1 else 1,
        res[0], res[1], res[2], res[3],
        res[4] if res[4] is not None else dummy, res[5] if res[5] is not None else dummy,
        s, e,
        TOP_K=top_k,
        HAS_HIDDEN=hidden is not None,
        HAS_WEIGHTS=weights is not None,
        ZERO_SENTINEL=bool(zero_sentinel_rows),
        num_warps=4,
        **cfg,
    )
    return tuple(res)

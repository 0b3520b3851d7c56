"""Triton kernel for the Gemma-4 MoE router epilogue (26B-A4B): softmax, top-k, renormalise, scale.

The router's projection GEMM produces ``logits`` [T, E]; everything after it runs in one launch
and writes ``weights`` [T, k] fp32 and ``ids`` [T, k] (int64 by default).  Two forms, each in the
eager code's order of fp32 operations (see :func:`gemma4_passes.kernels.reference.moe_router_ref`)::

    "softmax_topk"  (transformers' Gemma4TextRouter)
        p = softmax(logits.float(), -1)             # over all E: max, exp(x - max), sum, divide
        w, ids = topk(p, k)                         # sorted, largest first
        w = w / w.sum(-1, keepdim=True)
        w = w * per_expert_scale[ids].float()

    "topk_softmax"  (SGLang's torch fallback / vLLM's torch path)
        v, ids = topk(logits, k)
        w = softmax(v.float(), -1)
        w = w * per_expert_scale[ids].float()

The two are equal in exact arithmetic and differ in rounding only.

Kernel: a 1-D grid over token rows; each program holds ``ROWS`` whole rows as a
``[ROWS, next_pow2(E)]`` fp32 tile (one row per program for decode-sized T, several rows per
program for small E / large T, as the other kernels of this package).  All math is fp32; the
divisions are IEEE round-to-nearest (``tl.math.div_rn``, what eager's ``/`` and CUDA softmax do);
FMA contraction is off (``enable_fp_fusion=False``).  The sums over the k selected values (the
renormalisation, and the softmax of the second form) are taken left to right in selection order.

Top-k: k iterations (k is a compile-time constant, at most 16) of "take the row maximum of a
packed int64 key, then mask that one key out".  The key of element ``j`` with fp32 value ``v`` is
``(ordered_bits(v) << 32) | (0x7FFFFFFF - j)`` where ``ordered_bits`` maps fp32 to int32
monotonically (``-0.0`` is first folded into ``+0.0``, as torch compares them equal).  Keys are
unique, so one ``max`` reduction per step yields both the value (decoded from the high half,
bit-exact) and the index, and **among equal values the lowest index is selected first**; the
output is sorted by value, descending, ties by ascending index -- exactly
``torch.sort(v, descending=True, stable=True)[:k]``.  ``-inf`` logits (softmax probability 0;
in "topk_softmax" the value ``-inf`` itself) are ordinary values: selected only when fewer than
k larger entries exist, ties among them by lowest index.

Ties and torch.topk.  torch.topk has no index tie rule.  On CPU (ATen ``topk_impl_loop``, read
and measured with torch 2.13) it selects with ``std::partial_sort`` when ``64 * k <= E`` and with
``std::nth_element`` then ``std::sort`` otherwise (libstdc++ heap-select / introselect, neither
stable): which of several equal values wins depends on k, E and where the equal values sit.  Only
k == 1 with E >= 64 always gives the lowest index (the heap replaces its top on a strict ``>``).
On rows of logits drawn from 5 values, all k ids are the lowest-index choice in 44% of the rows
for E=8, k=2 (the highest-index choice: 40%), 0.7% for E=64, k=2, 4% for E=256, k=2, and 0% for
E=128, k=8 (highest-index: 0% too).  Exact ties are not rare with bf16/fp16 logits (the random
bf16/fp16 tests hit some in the top 8 of E >= 64).  The SELECTED VALUES always agree with torch.topk, and so do the
weights divided by ``per_expert_scale[ids]``; the ids (and weights) agree whenever a row has no
tie inside or across the top k.  The tests compare ids exactly with a stable-sort reference, and
values with torch.topk.  CUDA torch.topk (radix select, then a sort of the k winners) is to be
checked on the GPU separately.

Unsupported: NaN logits (no special handling: the result is unspecified); a row whose logits are
all ``-inf`` gives NaN weights, as eager does.  On the GPU ``tl.exp`` compiles to
``ex2.approx.f32`` of ``x * log2(e)`` (checked in the sm_90 PTX, with ``div.rn.f32`` and no FMA):
a couple of fp32 ulp plus the rounding of the product, which grows with ``|x - max|``, so the
probabilities of entries far below the row maximum differ from eager in the last bits.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .norm_residual import (
    _check_out,
    _check_same_device,
    _io_code,
    _num_warps,
    _require_launchable,
    _rows_per_program,
)

__all__ = ["moe_router_triton", "MAX_EXPERTS", "MAX_TOP_K", "FORMS"]

#: Widest router (experts per row) the kernel accepts; Gemma-4 26B-A4B has 128.
MAX_EXPERTS = 512
#: Largest k (the selected values and ids live in a ``[ROWS, next_pow2(k)]`` tile).
MAX_TOP_K = 16
#: The supported orders of operations (see the module docstring).
FORMS = ("softmax_topk", "topk_softmax")

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_IDS_DTYPES = (torch.int64, torch.int32)

#: Below every key of a non-NaN value: padding columns and already selected entries.
_NO_KEY = tl.constexpr(-0x7FFFFFFFFFFFFFFF)


@triton.jit
def _desc_keys(v, cols, col_ok):
    """Unique int64 keys whose order is (value, then lower index first); padding gets _NO_KEY."""
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 == +0.0 in torch's comparisons
    b = v.to(tl.int32, bitcast=True)
    ob = b ^ ((b >> 31) & 0x7FFFFFFF)  # monotone fp32 -> int32 (negative values: flip magnitude)
    key = (ob.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)[None, :]
    return tl.where(col_ok[None, :], key, _NO_KEY)


@triton.jit
def _moe_router_kernel(
    x_ptr, x_stride,
    s_ptr,
    w_ptr, ids_ptr,
    M, E,
    BLOCK_E: tl.constexpr,
    ROWS: tl.constexpr,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TOPK_FIRST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < M
    col_ok = cols < E

    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * x_stride + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))
    mx = tl.max(x, axis=1)
    if TOPK_FIRST:
        keys = _desc_keys(x, cols, col_ok)  # select on the logits themselves
    else:
        e = tl.exp(x - mx[:, None])
        p = tl.math.div_rn(e, tl.sum(e, axis=1)[:, None])
        keys = _desc_keys(p, cols, col_ok)

    kcols = tl.arange(0, BLOCK_K)
    sel = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([ROWS, BLOCK_K], dtype=tl.int32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        kmax = tl.max(keys, axis=1)
        keys = tl.where(keys == kmax[:, None], _NO_KEY, keys)
        hi = (kmax >> 32).to(tl.int32)
        val = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        idx = 0x7FFFFFFF - kmax.to(tl.int32)  # low half
        if TOPK_FIRST:
            val = tl.exp(val - mx)  # softmax over the k values: their max is the row max
        total = total + val  # left to right, in selection order
        sel = tl.where(kcols[None, :] == j, val[:, None], sel)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)

    k_ok = kcols < TOP_K
    mask = row_ok[:, None] & k_ok[None, :]
    w = tl.math.div_rn(sel, total[:, None])
    sc = tl.load(s_ptr + ids, mask=mask, other=0.0).to(tl.float32)
    w = w * sc

    o_off = rows.to(tl.int64)[:, None] * TOP_K + kcols[None, :]
    tl.store(w_ptr + o_off, w, mask=mask)
    tl.store(ids_ptr + o_off, ids.to(ids_ptr.dtype.element_ty), mask=mask)


def moe_router_triton(
    logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    form: str = "softmax_topk",
    *,
    weights_out: Optional[torch.Tensor] = None,
    ids_out: Optional[torch.Tensor] = None,
    ids_dtype: torch.dtype = torch.int64,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, ids)`` of the Gemma-4 router after its projection, in one launch.

    ``logits``: [T, E] bf16/fp16/fp32, E <= 512, any row stride (a non-contiguous last dim is
    copied first).  ``per_expert_scale``: E elements, fp32/bf16/fp16/fp64 (upcast / rounded to
    fp32, as ``.float()``).  ``top_k``: 1 <= k <= min(E, 16).  ``form``: ``"softmax_topk"``
    (transformers) or ``"topk_softmax"`` (SGLang / vLLM torch paths); see the module docstring
    for both and for the tie rule (lowest index first).  Returns contiguous ``weights`` [T, k]
    fp32 and ``ids`` [T, k] of ``ids_dtype`` (int64 or int32), or ``weights_out`` / ``ids_out``
    if given (contiguous, exactly those shapes and dtypes).  ``rows_per_program`` (a power of
    two) overrides the rows each program holds.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D [T, E] tensor, got {shape}")
    _io_code(logits, "logits")
    t, e = logits.shape
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"number of experts E={e} out of range: 1 <= E <= {MAX_EXPERTS}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int, got {top_k!r}")
    if not 1 <= top_k <= min(e, MAX_TOP_K):
        raise ValueError(f"top_k={top_k} out of range: 1 <= top_k <= min(E={e}, {MAX_TOP_K})")
    if per_expert_scale.dtype not in _SCALE_DTYPES:
        raise ValueError(
            f"per_expert_scale: unsupported dtype {per_expert_scale.dtype}; "
            "expected float32, bfloat16, float16 or float64"
        )
    if per_expert_scale.numel() != e:
        raise ValueError(
            f"per_expert_scale has {per_expert_scale.numel()} elements (shape {tuple(per_expert_scale.shape)}), "
            f"expected E={e} to match logits {tuple(logits.shape)}"
        )
    _check_same_device(logits, per_expert_scale, "per_expert_scale")
    if ids_dtype not in _IDS_DTYPES:
        raise ValueError(f"ids_dtype must be torch.int64 or torch.int32, got {ids_dtype}")
    weights = _check_out(weights_out, (t, top_k), torch.float32, logits, "weights_out")
    ids = _check_out(ids_out, (t, top_k), ids_dtype, logits, "ids_out")
    if t == 0:
        return weights, ids
    _require_launchable(_moe_router_kernel, logits)

    scale = per_expert_scale.reshape(e)
    if e > 1 and scale.stride(0) != 1:
        scale = scale.contiguous()
    if e > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    block = triton.next_power_of_2(e)
    rows = _rows_per_program(t, block, rows_per_program)
    _moe_router_kernel[(triton.cdiv(t, rows),)](
        logits, logits.stride(0),
        scale,
        weights, ids,
        t, e,
        BLOCK_E=block,
        ROWS=rows,
        TOP_K=top_k,
        BLOCK_K=triton.next_power_of_2(top_k),
        TOPK_FIRST=form == "topk_softmax",
        num_warps=max(1, min(rows, _num_warps(rows * block))),  # untuned; never more warps than rows
        enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
    )
    return weights, ids

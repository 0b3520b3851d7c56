"""Triton kernels for the norms around a Gemma-4 MoE block (26B-A4B), one launch each.

``moe_input_norms``: the post-attention epilogue of an MoE layer, where the new residual feeds
three norms (the dense MLP's, the experts' and the router's)::

    s      = round(residual + rms(x, w))                          (new residual, returned)
    pre    = rms(s, w_pre)         pre2 = rms(s, w_pre2)          (one row variance, shared)
    router = round(round(rms(s) * router_scale) * root)           (router norm has no weight;
                                                                    root = hidden ** -0.5)

``moe_branch_combine``: the end of an MoE layer, where the dense and expert branches are normed,
summed, normed again and added to the residual::

    h   = round(rms(h1, w1) + rms(h2, w2))
    s   = round(residual + rms(h, w3));  s = round(s * scalar)    (scalar optional)
    out = rms(s, next_w)                                          (the next layer's input norm, optional)

``rms(x, w) = round((x * (mean(x^2) + eps)^-0.5) * w)`` as everywhere in this package: fp32 math,
one rounding to the io dtype where the eager code rounds.  Whole rows are held in registers
(Gemma-4's MoE hidden size is 2816); each input is read once and each output written once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .norm_residual import (
    MAX_BLOCK,
    _check_out,
    _check_same_device,
    _check_scalar,
    _check_vector,
    _collapse_rows,
    _io_code,
    _require_launchable,
    _round_io,
    _rows_per_program,
    _tile_warps,
)

__all__ = ["moe_input_norms_triton", "moe_branch_combine_triton"]


@triton.jit
def _row_offsets(rows, d1, s0, s1):
    return (rows // d1).to(tl.int64) * s0 + (rows % d1).to(tl.int64) * s1


@triton.jit
def _inv_rms(v, N, eps):
    return tl.math.rsqrt(tl.sum(v * v, axis=1) / N + eps)[:, None]


@triton.jit
def _moe_input_norms_kernel(
    x_ptr, x_d1, x_s0, x_s1,
    r_ptr, r_d1, r_s0, r_s1,
    w_ptr, wp_ptr, wp2_ptr, rs_ptr,
    res_out_ptr, pre_ptr, pre2_ptr, router_ptr,
    M, N, eps, eps_pre, eps_pre2, eps_router, root,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + _row_offsets(rows, x_d1, x_s0, x_s1)[:, None] + cols[None, :], mask=mask,
                other=0.0, eviction_policy="evict_first").to(tl.float32)
    res = tl.load(r_ptr + _row_offsets(rows, r_d1, r_s0, r_s1)[:, None] + cols[None, :], mask=mask,
                  other=0.0, eviction_policy="evict_first").to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    n = _round_io(x * _inv_rms(x, N, eps) * w, IO)
    s = _round_io(res + n, IO)
    s = tl.where(mask, s, 0.0)
    o_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    ty = res_out_ptr.dtype.element_ty
    tl.store(res_out_ptr + o_off, s.to(ty), mask=mask)

    sumsq = tl.sum(s * s, axis=1) / N
    wp = tl.load(wp_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pre = _round_io(s * tl.math.rsqrt(sumsq + eps_pre)[:, None] * wp, IO)
    tl.store(pre_ptr + o_off, pre.to(ty), mask=mask)
    wp2 = tl.load(wp2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    pre2 = _round_io(s * tl.math.rsqrt(sumsq + eps_pre2)[:, None] * wp2, IO)
    tl.store(pre2_ptr + o_off, pre2.to(ty), mask=mask)
    rs = tl.load(rs_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rn = _round_io(s * tl.math.rsqrt(sumsq + eps_router)[:, None], IO)
    rn = _round_io(_round_io(rn * rs, IO) * root, IO)
    tl.store(router_ptr + o_off, rn.to(ty), mask=mask)


@triton.jit
def _moe_branch_combine_kernel(
    a_ptr, a_d1, a_s0, a_s1,
    b_ptr, b_d1, b_s0, b_s1,
    r_ptr, r_d1, r_s0, r_s1,
    w1_ptr, w2_ptr, w3_ptr, scalar_ptr, nw_ptr,
    res_out_ptr, normed_ptr,
    M, N, eps1, eps2, eps3, next_eps,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    HAS_NEXT: tl.constexpr,
    HAS_NEXT_W: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    a = tl.load(a_ptr + _row_offsets(rows, a_d1, a_s0, a_s1)[:, None] + cols[None, :], mask=mask,
                other=0.0, eviction_policy="evict_first").to(tl.float32)
    b = tl.load(b_ptr + _row_offsets(rows, b_d1, b_s0, b_s1)[:, None] + cols[None, :], mask=mask,
                other=0.0, eviction_policy="evict_first").to(tl.float32)
    w1 = tl.load(w1_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w2_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w3_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    a = _round_io(a * _inv_rms(a, N, eps1) * w1, IO)
    b = _round_io(b * _inv_rms(b, N, eps2) * w2, IO)
    h = tl.where(mask, _round_io(a + b, IO), 0.0)
    n3 = _round_io(h * _inv_rms(h, N, eps3) * w3, IO)
    res = tl.load(r_ptr + _row_offsets(rows, r_d1, r_s0, r_s1)[:, None] + cols[None, :], mask=mask,
                  other=0.0, eviction_policy="evict_first").to(tl.float32)
    s = _round_io(res + n3, IO)
    if HAS_SCALAR:
        s = _round_io(s * tl.load(scalar_ptr).to(tl.float32), IO)
    o_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    ty = res_out_ptr.dtype.element_ty
    tl.store(res_out_ptr + o_off, s.to(ty), mask=mask)
    if HAS_NEXT:
        s = tl.where(mask, s, 0.0)
        y = s * _inv_rms(s, N, next_eps)
        if HAS_NEXT_W:
            y = y * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(normed_ptr + o_off, _round_io(y, IO).to(ty), mask=mask)


def _rows_like(t: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{what} dtype {t.dtype} does not match x dtype {ref.dtype}")
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{what} shape {tuple(t.shape)} does not match {tuple(ref.shape)}")
    _check_same_device(ref, t, what)


def _grid(m: int, n: int, rows_per_program: Optional[int]):
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        raise ValueError(f"hidden size {n} too large for the MoE norm kernels (max {MAX_BLOCK})")
    rows = _rows_per_program(m, block, rows_per_program)
    return block, rows, (triton.cdiv(m, rows),), _tile_warps(rows, block)


def moe_input_norms_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    pre_weight: torch.Tensor,
    pre2_weight: torch.Tensor,
    router_scale: torch.Tensor,
    root: float,
    eps: float = 1e-6,
    pre_eps: float = 1e-6,
    pre2_eps: float = 1e-6,
    router_eps: float = 1e-6,
    *,
    outs: Optional[tuple] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residual_out, pre, pre2, router_in)`` of an MoE layer's post-attention epilogue, one launch.

    ``x``/``residual``: same shape and io dtype, last dim N contiguous; weights [N]; ``root`` is
    the router's ``hidden ** -0.5`` (a Python float).  ``outs``: four preallocated contiguous
    outputs, else fresh ones.
    """
    io = _io_code(x, "x")
    _rows_like(residual, x, "residual")
    n = x.shape[-1]
    weight = _check_vector(weight, n, "weight", x)
    pre_weight = _check_vector(pre_weight, n, "pre_weight", x)
    pre2_weight = _check_vector(pre2_weight, n, "pre2_weight", x)
    router_scale = _check_vector(router_scale, n, "router_scale", x)
    outs = outs or (None, None, None, None)
    if len(outs) != 4:
        raise ValueError("outs must hold four tensors: residual_out, pre, pre2, router_in")
    outs = tuple(_check_out(o, x.shape, x.dtype, x, name)
                 for o, name in zip(outs, ("residual_out", "pre", "pre2", "router_in")))
    if x.numel() == 0:
        return outs
    _require_launchable(_moe_input_norms_kernel, x)
    m = x.numel() // n
    block, rows, grid, warps = _grid(m, n, rows_per_program)
    x, x_d1, x_s0, x_s1 = _collapse_rows(x)
    residual, r_d1, r_s0, r_s1 = _collapse_rows(residual)
    _moe_input_norms_kernel[grid](
        x, x_d1, x_s0, x_s1,
        residual, r_d1, r_s0, r_s1,
        weight, pre_weight, pre2_weight, router_scale,
        *outs,
        m, n, float(eps), float(pre_eps), float(pre2_eps), float(router_eps), float(root),
        BLOCK_N=block, ROWS=rows, IO=io,
        num_warps=warps,
        enable_fp_fusion=False,  # round like eager, op by op
    )
    return outs


def moe_branch_combine_triton(
    h1: torch.Tensor,
    h2: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    scalar: Optional[torch.Tensor] = None,
    next_weight: Optional[torch.Tensor] = None,
    eps1: float = 1e-6,
    eps2: float = 1e-6,
    eps3: float = 1e-6,
    next_eps: Optional[float] = 1e-6,
    *,
    out: Optional[torch.Tensor] = None,
    normed_out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, residual_out)`` of an MoE layer's branch combine, one launch.

    ``residual_out = round(residual + rms(round(rms(h1, w1) + rms(h2, w2)), w3))`` [``* scalar``];
    ``normed = rms(residual_out, next_weight, next_eps)`` when ``next_eps`` is not None (else
    an empty tensor: the custom op's schema has no optional outputs; ``next_weight`` None = a norm
    without weight).
    """
    io = _io_code(h1, "h1")
    _rows_like(h2, h1, "h2")
    _rows_like(residual, h1, "residual")
    n = h1.shape[-1]
    w1 = _check_vector(w1, n, "w1", h1)
    w2 = _check_vector(w2, n, "w2", h1)
    w3 = _check_vector(w3, n, "w3", h1)
    if scalar is not None:
        _check_scalar(scalar, "scalar", h1)
    has_next = next_eps is not None
    if next_weight is not None:
        if not has_next:
            raise ValueError("next_weight given without next_eps")
        next_weight = _check_vector(next_weight, n, "next_weight", h1)
    out = _check_out(out, h1.shape, h1.dtype, h1, "out")
    if has_next:
        normed_out = _check_out(normed_out, h1.shape, h1.dtype, h1, "normed_out")
    else:
        normed_out = h1.new_empty(0)
    if h1.numel() == 0:
        return normed_out, out
    _require_launchable(_moe_branch_combine_kernel, h1)
    m = h1.numel() // n
    block, rows, grid, warps = _grid(m, n, rows_per_program)
    h1, a_d1, a_s0, a_s1 = _collapse_rows(h1)
    h2, b_d1, b_s0, b_s1 = _collapse_rows(h2)
    residual, r_d1, r_s0, r_s1 = _collapse_rows(residual)
    _moe_branch_combine_kernel[grid](
        h1, a_d1, a_s0, a_s1,
        h2, b_d1, b_s0, b_s1,
        residual, r_d1, r_s0, r_s1,
        w1, w2, w3,
        scalar if scalar is not None else w1,
        next_weight if next_weight is not None else w1,
        out, normed_out if has_next else out,
        m, n, float(eps1), float(eps2), float(eps3), float(next_eps if has_next else 0.0),
        BLOCK_N=block, ROWS=rows, IO=io,
        HAS_SCALAR=scalar is not None, HAS_NEXT=has_next, HAS_NEXT_W=next_weight is not None,
        num_warps=warps,
        enable_fp_fusion=False,  # round like eager, op by op
    )
    return normed_out, out

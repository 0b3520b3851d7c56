"""Triton kernel for Gemma-4's attention-input tail: q/k norms with RoPE and the v norm, one launch.

Per (b, s, h) row of ``head_dim`` D (all arithmetic fp32, ``round`` = cast to the io dtype)::

    q, k:  n   = rms(x, w, eps)                                   (rounded, as HF's q_norm/k_norm)
           out = round(round(n * cos) + round(rotate_half(n) * sin))   rotate_half(n) = cat(-n2, n1)
    v:     out = rms(v, no weight, v_eps)                              (no RoPE)

``q`` is [B, S, Hq, D], ``k``/``v`` are [B, S, Hk, D] (views of GEMM outputs, any strides on the
leading dims, last dim contiguous), ``cos``/``sin`` are [B, S, D] (or broadcastable to it; a batch
of 1 is read with stride 0; any strides, Inductor may hand them over transposed) shared by all heads.  Outputs are contiguous [B, S, H, D] in the io
dtype.

The grid covers the rows of q, then k, then v; each program handles ``ROWS`` rows of one tensor.
A row is loaded once, as its two halves ``x[:D/2]`` and ``x[D/2:]``, which are exactly the operands
``rotate_half`` needs, so no second read of the row happens.  When ``v`` is the same tensor as ``k``
(Gemma-4's ``attention_k_eq_v`` layers pass the raw k projection as v) the k programs also write
the v output from the rows they already hold and the v rows are not read again.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .norm_residual import (
    _check_out,
    _check_same_device,
    _check_vector,
    _io_code,
    _num_warps,
    _require_launchable,
    _round_io,
    _rows_per_program,
    _FLOAT_DTYPES,
)

__all__ = ["q_norm_rope_triton", "qkv_norm_rope_triton"]


@triton.jit
def _norm_rope_rows(
    x_ptr, x_sb, x_ss, x_sh,
    out_ptr, w_ptr,
    cos_ptr, c_sb, c_ss, c_sd,
    sin_ptr, s_sb, s_ss, s_sd,
    v_out_ptr,
    row0, R, H, S, eps, v_eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
    HAS_W: tl.constexpr,
    ROPE: tl.constexpr,
    V_OUT: tl.constexpr,
):
    rows = row0 + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_H)
    col_ok = c < HALF
    mask = (rows < R)[:, None] & col_ok[None, :]

    h = rows % H
    t = rows // H
    b = (t // S).to(tl.int64)
    s = (t % S).to(tl.int64)
    x_base = b * x_sb + s * x_ss + h.to(tl.int64) * x_sh
    x_ptrs = x_ptr + x_base[:, None] + c[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    sumsq = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)

    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + c[None, :]
    if V_OUT:
        # k_eq_v: v = rms(same rows, no weight, v_eps), written from the registers we hold
        inv_v = tl.math.rsqrt(sumsq / (2 * HALF) + v_eps)[:, None]
        v_ptrs = v_out_ptr + rows.to(tl.int64)[:, None] * (2 * HALF) + c[None, :]
        vt = v_out_ptr.dtype.element_ty
        tl.store(v_ptrs, _round_io(x1 * inv_v, IO).to(vt), mask=mask)
        tl.store(v_ptrs + HALF, _round_io(x2 * inv_v, IO).to(vt), mask=mask)

    inv = tl.math.rsqrt(sumsq / (2 * HALF) + eps)[:, None]
    n1 = x1 * inv
    n2 = x2 * inv
    if HAS_W:
        n1 = n1 * tl.load(w_ptr + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        n2 = n2 * tl.load(w_ptr + HALF + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    n1 = _round_io(n1, IO)
    n2 = _round_io(n2, IO)
    if ROPE:
        # the tables may come with any last-dim stride: Inductor can lay out the cos/sin buffer
        # transposed ([B, S, D] with stride (S*D, 1, S)); reading it strided beats a copy kernel
        cs_ptrs = cos_ptr + (b * c_sb + s * c_ss)[:, None] + c[None, :] * c_sd
        sn_ptrs = sin_ptr + (b * s_sb + s * s_ss)[:, None] + c[None, :] * s_sd
        c1 = tl.load(cs_ptrs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cs_ptrs + HALF * c_sd, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sn_ptrs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sn_ptrs + HALF * s_sd, mask=mask, other=0.0).to(tl.float32)
        o1 = _round_io(_round_io(n1 * c1, IO) + _round_io(-n2 * s1, IO), IO)
        o2 = _round_io(_round_io(n2 * c2, IO) + _round_io(n1 * s2, IO), IO)
    else:
        o1 = n1
        o2 = n2
    ot = out_ptr.dtype.element_ty
    tl.store(o_ptrs, o1.to(ot), mask=mask)
    tl.store(o_ptrs + HALF, o2.to(ot), mask=mask)


@triton.jit
def _qkv_norm_rope_kernel(
    q_ptr, q_sb, q_ss, q_sh,
    k_ptr, k_sb, k_ss, k_sh,
    v_ptr, v_sb, v_ss, v_sh,
    qo_ptr, ko_ptr, vo_ptr,
    qw_ptr, kw_ptr,
    cos_ptr, c_sb, c_ss, c_sd,
    sin_ptr, s_sb, s_ss, s_sd,
    S, HQ, HK, RQ, RK, q_progs, k_progs,
    q_eps, k_eps, v_eps,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
    HAS_KV: tl.constexpr,
    KV_SAME: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_progs:
        _norm_rope_rows(
            q_ptr, q_sb, q_ss, q_sh, qo_ptr, qw_ptr,
            cos_ptr, c_sb, c_ss, c_sd, sin_ptr, s_sb, s_ss, s_sd, qo_ptr,
            pid * ROWS, RQ, HQ, S, q_eps, v_eps,
            HALF=HALF, BLOCK_H=BLOCK_H, ROWS=ROWS, IO=IO, HAS_W=True, ROPE=True, V_OUT=False,
        )
    else:
        if HAS_KV:
            pid_kv = pid - q_progs
            if pid_kv < k_progs:
                _norm_rope_rows(
                    k_ptr, k_sb, k_ss, k_sh, ko_ptr, kw_ptr,
                    cos_ptr, c_sb, c_ss, c_sd, sin_ptr, s_sb, s_ss, s_sd, vo_ptr,
                    pid_kv * ROWS, RK, HK, S, k_eps, v_eps,
                    HALF=HALF, BLOCK_H=BLOCK_H, ROWS=ROWS, IO=IO, HAS_W=True, ROPE=True, V_OUT=KV_SAME,
                )
            else:
                if not KV_SAME:
                    _norm_rope_rows(
                        v_ptr, v_sb, v_ss, v_sh, vo_ptr, kw_ptr,
                        cos_ptr, c_sb, c_ss, c_sd, sin_ptr, s_sb, s_ss, s_sd, vo_ptr,
                        (pid_kv - k_progs) * ROWS, RK, HK, S, v_eps, v_eps,
                        HALF=HALF, BLOCK_H=BLOCK_H, ROWS=ROWS, IO=IO, HAS_W=False, ROPE=False, V_OUT=False,
                    )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _heads_view(t: torch.Tensor, what: str, io_dtype: torch.dtype, b: int, s: int, d: int) -> torch.Tensor:
    if t.dim() != 4:
        raise ValueError(f"{what} must be [B, S, H, D], got shape {tuple(t.shape)}")
    if t.dtype != io_dtype:
        raise ValueError(f"{what} dtype {t.dtype} does not match q dtype {io_dtype}")
    if t.shape[-1] != d:
        raise ValueError(f"last-dim mismatch: {what} has head_dim {t.shape[-1]}, q has {d}")
    if tuple(t.shape[:2]) != (b, s):
        raise ValueError(f"{what} has [B, S] = {tuple(t.shape[:2])}, q has {(b, s)}")
    if d > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _rope_table(t: torch.Tensor, what: str, ref: torch.Tensor, b: int, s: int, d: int) -> torch.Tensor:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {t.dtype}; expected bfloat16, float16 or float32")
    _check_same_device(ref, t, what)
    if t.dim() == 0 or t.shape[-1] != d:
        raise ValueError(f"last-dim mismatch: {what} has shape {tuple(t.shape)}, head_dim is {d}")
    try:
        t = t.expand(b, s, d)
    except RuntimeError as e:
        raise ValueError(f"{what} of shape {tuple(t.shape)} does not broadcast to [B, S, D] = {(b, s, d)}") from e
    return t  # any strides (a zero last-dim stride only if the table really is constant)


def _launch(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps, q_out, k_out, v_out, rows_per_program):
    io = _io_code(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, S, Hq, D], got shape {tuple(q.shape)}")
    bsz, seq, hq, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    q = _heads_view(q, "q", q.dtype, bsz, seq, d)
    q_weight = _check_vector(q_weight, d, "q_weight", q)
    cos = _rope_table(cos, "cos", q, bsz, seq, d)
    sin = _rope_table(sin, "sin", q, bsz, seq, d)
    q_out = _check_out(q_out, q.shape, q.dtype, q, "q_out")

    has_kv = k is not None
    kv_same = False
    hk = 0
    if has_kv:
        kv_same = k is v or (
            k.data_ptr() == v.data_ptr() and k.shape == v.shape and k.stride() == v.stride() and k.dtype == v.dtype
        )
        k = _heads_view(k, "k", q.dtype, bsz, seq, d)
        v = k if kv_same else _heads_view(v, "v", q.dtype, bsz, seq, d)
        if v.shape != k.shape:
            raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
        _check_same_device(q, k, "k")
        _check_same_device(q, v, "v")
        k_weight = _check_vector(k_weight, d, "k_weight", q)
        k_out = _check_out(k_out, k.shape, q.dtype, q, "k_out")
        v_out = _check_out(v_out, v.shape, q.dtype, q, "v_out")
        hk = k.shape[2]
    else:
        k = v = q
        k_weight = q_weight
        k_out = v_out = q_out

    rq = bsz * seq * hq
    rk = bsz * seq * hk
    if rq + rk == 0 or d == 0:
        return q_out, k_out, v_out
    _require_launchable(_qkv_norm_rope_kernel, q)

    half = d // 2
    block_h = triton.next_power_of_2(half)
    # ~2048 elements per program for head_dim 256, 1024 for 512 (H100 sweep); q alone (KV-shared
    # layers) is best at 2 rows of 256 per program: H100, Hq=8, T=512/2048: 3.2/8.7 us vs 4.6/11.0
    # at 8 rows (Inductor 3.1/9.1; benchmarks/RESULTS.md)
    target = (2048 if block_h <= 128 else 1024) if has_kv else 512
    rows = _rows_per_program(rq + (rk if kv_same else 2 * rk), 2 * block_h, rows_per_program, target=target)
    q_progs = triton.cdiv(rq, rows)
    k_progs = triton.cdiv(rk, rows)
    grid = (q_progs + (k_progs if kv_same else 2 * k_progs),)
    _qkv_norm_rope_kernel[grid](
        q, q.stride(0), q.stride(1), q.stride(2),
        k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2),
        q_out, k_out, v_out,
        q_weight, k_weight,
        cos, cos.stride(0), cos.stride(1), cos.stride(2),
        sin, sin.stride(0), sin.stride(1), sin.stride(2),
        seq, hq, max(hk, 1), rq, rk, q_progs, k_progs,
        float(q_eps), float(k_eps), float(v_eps),
        HALF=half,
        BLOCK_H=block_h,
        ROWS=rows,
        IO=io,
        HAS_KV=has_kv,
        KV_SAME=kv_same,
        num_warps=_num_warps(rows * 2 * block_h),
        enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
    )
    return q_out, k_out, v_out


def q_norm_rope_triton(
    q: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """RoPE(rms(q, weight, eps)) for q [B, S, Hq, D]; returns contiguous [B, S, Hq, D] (or ``out``).

    Used for q alone (KV-shared layers, which read K/V from an earlier layer)."""
    return _launch(q, None, None, weight, None, cos, sin, eps, eps, eps, out, None, None, rows_per_program)[0]


def qkv_norm_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_eps: float = 1e-6,
    k_eps: float = 1e-6,
    v_eps: float = 1e-6,
    *,
    q_out: Optional[torch.Tensor] = None,
    k_out: Optional[torch.Tensor] = None,
    v_out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(RoPE(rms(q, q_weight)), RoPE(rms(k, k_weight)), rms(v))`` in ONE launch.

    q [B, S, Hq, D], k and v [B, S, Hk, D] (v may be the very tensor k), cos/sin [B, S, D].
    Returns three contiguous tensors (or the given ``*_out`` buffers) in q's dtype."""
    if v is None or k is None:
        raise ValueError("k and v are required (use q_norm_rope_triton for q alone)")
    return _launch(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps, q_out, k_out, v_out, rows_per_program)

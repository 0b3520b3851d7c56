"""Triton kernels for the Gemma-4 norm/residual family.

``rmsnorm_add``          s = round(residual + rms(x, w));  s = round(s * scalar)   (scalar optional)
``rmsnorm_add_rmsnorm``  the same, plus normed = rms(s, next_w)  (the ROUNDED s; next_w optional)

with ``rms(x, w, eps) = round((x * (mean(x^2) + eps)^-0.5) * w)`` (Gemma-4: ``w``, not ``1 + w``),
all arithmetic in fp32 and ``round`` = cast to the io dtype (identity for fp32).  See
:mod:`gemma4_passes.kernels.reference` for the plain-torch definitions.

One program normalises ``ROWS`` rows held in registers as a ``[ROWS, next_pow2(N)]`` tile: one
row per program for hidden sizes (N > 512), several rows per program for small N so that tiny
rows still fill the GPU.  Each input is read once and each output written once.

This module also holds the small helpers shared by the other kernel modules
(:func:`_round_io`, the stride/row bookkeeping and the launch heuristics).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["rmsnorm_add_triton", "rmsnorm_add_rmsnorm_triton"]

# --------------------------------------------------------------------------------------------
# shared helpers (also used by gelu_mul.py and qkv_norm_rope.py)
# --------------------------------------------------------------------------------------------

#: io dtype -> the ``IO`` constexpr the kernels take.
_IO_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_FLOAT_DTYPES = tuple(_IO_CODE)

#: Largest row the single-tile norm kernels keep in registers (Gemma-4's largest hidden is 5376).
MAX_BLOCK = 32768

#: Rows per program are capped so that there are at least this many programs (~2 per SM on H100).
_MIN_PROGRAMS = 264


@triton.jit
def _round_io(y, IO: tl.constexpr):
    """Round an fp32 tensor to the io dtype and return it as fp32 (``IO``: 0 fp32, 1 fp16, 2 bf16).

    bf16 uses explicit round-to-nearest-even on the bits: identical to the hardware cast on the
    GPU, and the Triton CPU interpreter's own fp32->bf16 cast truncates instead of rounding.
    NaN stays NaN; overflow rounds to inf like the hardware cast.
    """
    if IO == 2:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))
    elif IO == 1:
        y = y.to(tl.float16).to(tl.float32)
    return y


def _io_code(t: torch.Tensor, what: str) -> int:
    code = _IO_CODE.get(t.dtype)
    if code is None:
        raise ValueError(f"{what}: unsupported dtype {t.dtype}; expected one of bfloat16, float16, float32")
    return code


def _check_same_device(ref: torch.Tensor, t: torch.Tensor, what: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{what} is on {t.device}, expected {ref.device}")


def _check_vector(w: torch.Tensor, n: int, what: str, ref: torch.Tensor) -> torch.Tensor:
    """A per-channel weight: 1-D (any size-1 leading dims squeezed), ``n`` elements, float dtype."""
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {w.dtype}; expected bfloat16, float16 or float32")
    if w.numel() != n or (w.dim() >= 1 and w.shape[-1] != n):
        raise ValueError(f"{what} has shape {tuple(w.shape)}, expected ({n},) to match the last dim")
    _check_same_device(ref, w, what)
    w = w.reshape(n)
    if n > 1 and w.stride(0) != 1:
        w = w.contiguous()
    return w


def _check_scalar(s: torch.Tensor, what: str, ref: torch.Tensor) -> None:
    if s.numel() != 1:
        raise ValueError(f"{what} must have exactly one element, got shape {tuple(s.shape)}")
    if s.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: unsupported dtype {s.dtype}; expected bfloat16, float16 or float32")
    _check_same_device(ref, s, what)


def _check_out(out: Optional[torch.Tensor], shape, dtype, ref: torch.Tensor, what: str) -> torch.Tensor:
    """Validate a caller-provided output buffer, or allocate a fresh contiguous one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=ref.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"{what}: expected a {dtype} tensor of shape {tuple(shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    _check_same_device(ref, out, what)
    return out


def _collapse_rows(t: torch.Tensor):
    """View ``t`` (last dim contiguous) as rows: returns ``(t, d1, s0, s1)``.

    Row ``r`` of the flattened leading dims starts at element ``(r // d1) * s0 + (r % d1) * s1``.
    Leading dims that merge (``stride[i] == stride[i+1] * size[i+1]``) are merged, size-1 dims
    dropped; arbitrary strides on up to two remaining leading dims are addressed in place.  Only
    a non-contiguous last dim or more than two unmergeable leading dims costs a copy.
    """
    n = t.shape[-1]
    if n > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    dims: list[list[int]] = []
    for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
        if size == 1:
            continue
        if dims and dims[-1][1] == stride * size:
            dims[-1][0] *= size
            dims[-1][1] = stride
        else:
            dims.append([size, stride])
    if len(dims) > 2:
        t = t.contiguous()
        return t, 1, n, 0
    if len(dims) == 2:
        return t, dims[1][0], dims[0][1], dims[1][1]
    if len(dims) == 1:
        return t, 1, dims[0][1], 0
    return t, 1, n, 0


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def _rows_per_program(total_rows: int, block: int, rows: Optional[int] = None, target: int = 2048) -> int:
    """Rows per program for a row-tiled kernel whose rows are ``block`` wide (power of two).

    ``target`` elements per program when rows are short (e.g. N <= 512), but never so many rows
    that fewer than ~2 programs per SM remain.  ``rows`` overrides (must be a power of two).
    """
    if rows is not None:
        if rows < 1 or rows & (rows - 1):
            raise ValueError(f"rows_per_program must be a power of two >= 1, got {rows}")
        return rows
    r = max(1, min(16, target // block))
    return max(1, min(r, _prev_pow2(total_rows // _MIN_PROGRAMS)))


def _num_warps(elems: int) -> int:
    """Warps for a program holding ``elems`` elements: ~16 per thread (4 warps for 2048, 8 for 4096...)."""
    return max(1, min(16, elems // 512))


def _require_launchable(kernel, t: torch.Tensor) -> None:
    """A compiled (non-interpreted) Triton kernel cannot take CPU tensors: say so clearly."""
    if t.device.type == "cpu" and isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError(
            "gemma4_passes Triton kernels need GPU tensors; to run them on CPU through the Triton "
            "interpreter set TRITON_INTERPRET=1 before gemma4_passes.kernels is imported "
            "(the CPU custom-op implementations use the torch reference instead)"
        )


# --------------------------------------------------------------------------------------------
# kernel
# --------------------------------------------------------------------------------------------


@triton.jit
def _rmsnorm_residual_kernel(
    x_ptr, x_d1, x_s0, x_s1,
    r_ptr, r_d1, r_s0, r_s1,
    w_ptr, scalar_ptr, nw_ptr,
    out_ptr, normed_ptr,
    M, N, eps, next_eps,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    SECOND_NORM: tl.constexpr,
    HAS_NEXT_W: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]

    x_off = (rows // x_d1).to(tl.int64) * x_s0 + (rows % x_d1).to(tl.int64) * x_s1
    r_off = (rows // r_d1).to(tl.int64) * r_s0 + (rows % r_d1).to(tl.int64) * r_s1
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    res = tl.load(r_ptr + r_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    # rms(x, w): (x * (mean(x^2) + eps)^-0.5) * w, then one rounding
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    n = _round_io((x * inv[:, None]) * w[None, :], IO)
    s = _round_io(res + n, IO)
    if HAS_SCALAR:
        sc = tl.load(scalar_ptr).to(tl.float32)
        s = _round_io(s * sc, IO)

    o_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + o_off, s.to(out_ptr.dtype.element_ty), mask=mask)

    if SECOND_NORM:
        s = tl.where(col_ok[None, :], s, 0.0)
        inv2 = tl.math.rsqrt(tl.sum(s * s, axis=1) / N + next_eps)
        y = s * inv2[:, None]
        if HAS_NEXT_W:
            nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            y = y * nw[None, :]
        y = _round_io(y, IO)
        tl.store(normed_ptr + o_off, y.to(normed_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _launch(
    x, residual, weight, scalar, next_weight, eps, next_eps, second, out, normed_out, rows_per_program
):
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    io = _io_code(x, "x")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} does not match x dtype {x.dtype}")
    if tuple(residual.shape) != tuple(x.shape):
        if residual.shape[-1:] != x.shape[-1:]:
            raise ValueError(f"last-dim mismatch: x {tuple(x.shape)} vs residual {tuple(residual.shape)}")
        raise ValueError(f"residual shape {tuple(residual.shape)} does not match x shape {tuple(x.shape)}")
    _check_same_device(x, residual, "residual")
    n = x.shape[-1]
    weight = _check_vector(weight, n, "weight", x)
    if scalar is not None:
        _check_scalar(scalar, "scalar", x)
    if next_weight is not None:
        next_weight = _check_vector(next_weight, n, "next_weight", x)
    out = _check_out(out, x.shape, x.dtype, x, "out")
    if second:
        normed_out = _check_out(normed_out, x.shape, x.dtype, x, "normed_out")
    if x.numel() == 0:
        return normed_out, out
    block = triton.next_power_of_2(n)
    if block > MAX_BLOCK:
        raise ValueError(f"hidden size {n} too large for the single-tile norm kernel (max {MAX_BLOCK})")
    _require_launchable(_rmsnorm_residual_kernel, x)

    m = x.numel() // n
    x, x_d1, x_s0, x_s1 = _collapse_rows(x)
    residual, r_d1, r_s0, r_s1 = _collapse_rows(residual)
    rows = _rows_per_program(m, block, rows_per_program)
    grid = (triton.cdiv(m, rows),)
    _rmsnorm_residual_kernel[grid](
        x, x_d1, x_s0, x_s1,
        residual, r_d1, r_s0, r_s1,
        weight,
        scalar if scalar is not None else weight,
        next_weight if next_weight is not None else weight,
        out,
        normed_out if second else out,
        m, n, float(eps), float(next_eps),
        BLOCK_N=block,
        ROWS=rows,
        IO=io,
        HAS_SCALAR=scalar is not None,
        SECOND_NORM=second,
        HAS_NEXT_W=next_weight is not None,
        num_warps=_num_warps(rows * block),
        enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
    )
    return normed_out, out


def rmsnorm_add_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """``round(residual + rms(x, weight, eps))`` [``* scalar``, rounded]: one launch.

    ``x``/``residual``: same shape and io dtype (bf16/fp16/fp32), last dim N contiguous (other
    strides are addressed in place).  ``weight``: [N], io dtype or fp32.  ``scalar``: a 1-element
    device tensor (read inside the kernel; CUDA-graph safe).  Returns a contiguous tensor shaped
    like ``x`` (``out`` if given: it must be contiguous, same shape and dtype).
    """
    return _launch(x, residual, weight, scalar, None, eps, eps, False, out, None, rows_per_program)[1]


def rmsnorm_add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor] = None,
    next_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    next_eps: float = 1e-6,
    *,
    out: Optional[torch.Tensor] = None,
    normed_out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, residual_out)``: ``residual_out`` as :func:`rmsnorm_add_triton`, and
    ``normed = rms(residual_out, next_weight, next_eps)`` (no weight if ``next_weight`` is None)
    computed from the rounded ``residual_out``; one launch, both outputs contiguous."""
    return _launch(
        x, residual, weight, scalar, next_weight, eps, next_eps, True, out, normed_out, rows_per_program
    )

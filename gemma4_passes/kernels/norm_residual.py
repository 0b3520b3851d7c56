"""Triton kernels for the Gemma-4 norm/residual family.

``rmsnorm_add``          s = round(residual + rms(x, w));  s = round(s * scalar)   (scalar optional)
``rmsnorm_add_rmsnorm``  the same, plus normed = rms(s, next_w)  (the ROUNDED s; next_w optional;
                         ``unrounded_sum``: the fp32 sum before rounding, SGLang's residual norm)

with ``rms(x, w, eps) = round((x * (mean(x^2) + eps)^-0.5) * w)`` (Gemma-4: ``w``, not ``1 + w``),
all arithmetic in fp32 and ``round`` = cast to the io dtype (identity for fp32).  See
:mod:`gemma4_passes.kernels.reference` for the plain-torch definitions.

Two kernels, chosen by shape in the launcher:

* whole rows (default): one program normalises ``ROWS`` rows held in registers as a
  ``[ROWS, next_pow2(N)]`` tile -- one row per program for hidden sizes, several rows per program
  for small N so that tiny rows still fill the GPU.  Each input is read once from memory and each
  output written once.
* chunked (rows wider than 4096 in prefill-sized batches, or ``impl="loop"``): one row per
  program walked in ``CHUNK``-wide pieces; x is read a second time, from L2 (loaded with
  ``evict_last``), which costs less than the register pressure of a 5376-wide row padded to 8192.

Both launch once, keep all arithmetic in fp32 and round exactly where the eager code does.  FMA
contraction is disabled (``enable_fp_fusion=False``) so that ``a * b + c`` rounds like two eager ops.

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

#: io dtype -> the ``IO`` constexpr the kernels take (see :func:`_round_io`).
_IO_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: bf16 on CPU, i.e. under the Triton interpreter: round to bf16 on the bits (see _round_io).
_IO_BF16_EMULATED = 3
_FLOAT_DTYPES = tuple(_IO_CODE)

#: Widest (power-of-two padded) row the whole-row kernel keeps in registers; wider rows always
#: take the chunked kernel (Gemma-4's largest hidden size is 5376).
MAX_BLOCK = 32768

#: Rows per program are capped so that there are at least this many programs (~2 per SM on H100).
_MIN_PROGRAMS = 264


@triton.jit
def _round_io(y, IO: tl.constexpr):
    """Round an fp32 tensor to the io dtype and return it as fp32.

    ``IO``: 0 fp32 (identity), 1 fp16, 2 bf16 (hardware round-to-nearest-even casts), 3 bf16 with
    the same rounding done on the bits: the Triton CPU interpreter's fp32->bf16 cast truncates
    instead of rounding, so the launchers pass 3 for CPU tensors (NaN stays NaN, overflow -> inf).
    """
    if IO == 3:
        u = y.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        y = tl.where(y != y, y, u.to(tl.float32, bitcast=True))
    elif IO == 2:
        y = y.to(tl.bfloat16).to(tl.float32)
    elif IO == 1:
        y = y.to(tl.float16).to(tl.float32)
    return y


def _io_code(t: torch.Tensor, what: str) -> int:
    code = _IO_CODE.get(t.dtype)
    if code is None:
        raise ValueError(f"{what}: unsupported dtype {t.dtype}; expected one of bfloat16, float16, float32")
    if code == 2 and t.device.type == "cpu":
        return _IO_BF16_EMULATED
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
    UNROUNDED_SUM: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]

    x_off = (rows // x_d1).to(tl.int64) * x_s0 + (rows % x_d1).to(tl.int64) * x_s1
    r_off = (rows // r_d1).to(tl.int64) * r_s0 + (rows % r_d1).to(tl.int64) * r_s1
    x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=mask, other=0.0,
                eviction_policy="evict_first").to(tl.float32)
    res = tl.load(r_ptr + r_off[:, None] + cols[None, :], mask=mask, other=0.0,
                  eviction_policy="evict_first").to(tl.float32)
    o_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    w, sc, nw = _epilogue_params(w_ptr, scalar_ptr, nw_ptr, cols, col_ok, HAS_SCALAR, HAS_NEXT_W)
    _norm_residual_tile(x, res, w, sc, nw, col_ok, mask, o_off, out_ptr, normed_ptr, N, eps, next_eps, IO,
                        HAS_SCALAR, SECOND_NORM, HAS_NEXT_W, UNROUNDED_SUM)


@triton.jit
def _epilogue_params(w_ptr, scalar_ptr, nw_ptr, cols, col_ok, HAS_SCALAR: tl.constexpr, HAS_NEXT_W: tl.constexpr):
    """(w, scalar, next_w) as fp32 (scalar 1.0 / next_w = w where absent: never read then)."""
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    sc = 1.0
    if HAS_SCALAR:
        sc = tl.load(scalar_ptr).to(tl.float32)
    nw = w
    if HAS_NEXT_W:
        nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return w, sc, nw


@triton.jit
def _norm_residual_tile(
    x, res, w, sc, nw, col_ok, mask, o_off,
    out_ptr, normed_ptr,
    N, eps, next_eps,
    IO: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    SECOND_NORM: tl.constexpr,
    HAS_NEXT_W: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
):
    """The epilogue on a ``[ROWS, BLOCK_N]`` fp32 tile of x and residual (masked lanes 0), with the
    parameters from :func:`_epilogue_params`: stores s (and the second norm) at ``o_off``.  Shared
    with the one-shot all-reduce kernel."""
    # rms(x, w): (x * (mean(x^2) + eps)^-0.5) * w, then one rounding
    inv = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    n = _round_io((x * inv[:, None]) * w[None, :], IO)
    s_f = res + n
    s = _round_io(s_f, IO)
    if HAS_SCALAR:
        s = _round_io(s * sc, IO)

    tl.store(out_ptr + o_off, s.to(out_ptr.dtype.element_ty), mask=mask)

    if SECOND_NORM:
        if UNROUNDED_SUM:  # SGLang's residual norm reads the fp32 sum, not the stored residual
            s = s_f
        s = tl.where(col_ok[None, :], s, 0.0)
        inv2 = tl.math.rsqrt(tl.sum(s * s, axis=1) / N + next_eps)
        y = s * inv2[:, None]
        if HAS_NEXT_W:
            y = y * nw[None, :]
        y = _round_io(y, IO)
        tl.store(normed_ptr + o_off, y.to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_residual_loop_kernel(
    x_ptr, x_d1, x_s0, x_s1,
    r_ptr, r_d1, r_s0, r_s1,
    w_ptr, scalar_ptr, nw_ptr,
    out_ptr, normed_ptr,
    M, N, eps, next_eps,
    CHUNK: tl.constexpr,
    IO: tl.constexpr,
    HAS_SCALAR: tl.constexpr,
    SECOND_NORM: tl.constexpr,
    HAS_NEXT_W: tl.constexpr,
    UNROUNDED_SUM: tl.constexpr,
):
    """One row per program, walked in ``CHUNK``-wide pieces (few registers, many rows in flight).

    Pass 1 reads x for the sum of squares; pass 2 re-reads x (from L2), reads residual and the
    weight, writes s; pass 3 (second norm only) reads back this program's s (after a block
    barrier) and writes the normed row.  With ``UNROUNDED_SUM`` the second norm needs the fp32
    sum, which was never stored: pass 3 recomputes it from x and residual (L2 hits) instead.
    """
    row = tl.program_id(0)
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + ((row // x_d1).to(tl.int64) * x_s0 + (row % x_d1).to(tl.int64) * x_s1)
    r_row = r_ptr + ((row // r_d1).to(tl.int64) * r_s0 + (row % r_d1).to(tl.int64) * r_s1)
    o_off = row.to(tl.int64) * N

    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        c = start + cols
        x = tl.load(x_row + c, mask=c < N, other=0.0, eviction_policy="evict_last").to(tl.float32)
        acc += x * x
    inv = tl.math.rsqrt(tl.sum(acc, axis=0) / N + eps)

    if HAS_SCALAR:
        sc = tl.load(scalar_ptr).to(tl.float32)
    acc2 = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        c = start + cols
        ok = c < N
        x = tl.load(x_row + c, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        res = tl.load(r_row + c, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
        w = tl.load(w_ptr + c, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
        n = _round_io((x * inv) * w, IO)
        s_f = res + n
        s = _round_io(s_f, IO)
        if HAS_SCALAR:
            s = _round_io(s * sc, IO)
        tl.store(out_ptr + o_off + c, s.to(out_ptr.dtype.element_ty), mask=ok)
        if SECOND_NORM:
            if UNROUNDED_SUM:
                s = s_f
            s = tl.where(ok, s, 0.0)
            acc2 += s * s

    if SECOND_NORM:
        inv2 = tl.math.rsqrt(tl.sum(acc2, axis=0) / N + next_eps)
        tl.debug_barrier()  # this program's stores of s are visible to all its threads
        for start in range(0, N, CHUNK):
            c = start + cols
            ok = c < N
            if UNROUNDED_SUM:
                x = tl.load(x_row + c, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                res = tl.load(r_row + c, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
                w = tl.load(w_ptr + c, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
                s = res + _round_io((x * inv) * w, IO)
            else:
                s = tl.load(out_ptr + o_off + c, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32)
            y = s * inv2
            if HAS_NEXT_W:
                y = y * tl.load(nw_ptr + c, mask=ok, other=0.0, eviction_policy="evict_last").to(tl.float32)
            tl.store(normed_ptr + o_off + c, _round_io(y, IO).to(normed_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


#: Wide rows in prefill-sized batches (at least ``_LOOP_MIN_ROWS`` rows of more than 4096) use the
#: chunked kernel.  H100, bf16, CUDA graphs: whole rows padded to 8192 hold too much per thread
#: (N=5376, M=16384: rmsnorm_add_rmsnorm 240 us chunked vs 283 us whole-row; Inductor 268 us);
#: for N <= 4096 and for decode sizes whole rows are as fast or faster.
_LOOP_MIN_ROWS = 512
_LOOP_MIN_N = 4097


#: Where Inductor's own fusion of the epilogue beats both kernels here, so the passes leave the
#: graph alone: rows wider than 4096 at 256-2047 rows.  H100, bf16, N=5376, cold inputs, us
#: tile/loop/Inductor: M=256 6.5/8.6/5.7, M=512 11.2/11.3/8.4, M=1024 20.5/21.4/16.9; at M=2048
#: the chunked kernel wins (34.8 vs 35.4) and at M<=128 the whole-row one (benchmarks/RESULTS.md).
INDUCTOR_WINS_MIN_N = 4097
INDUCTOR_WINS_ROWS = (256, 2048)


def prefer_inductor(rows, n) -> bool:
    """True for a static (rows, n) where Inductor's fusion of the same epilogue measured faster."""
    if not isinstance(rows, int) or not isinstance(n, int):
        return False  # symbolic sizes: the kernels win at the decode and long-prefill ends
    return n >= INDUCTOR_WINS_MIN_N and INDUCTOR_WINS_ROWS[0] <= rows < INDUCTOR_WINS_ROWS[1]


def _loop_config(n: int) -> tuple[int, int]:
    """(CHUNK, num_warps) of the chunked kernel for row width ``n`` (from an H100 sweep)."""
    if n <= 2560:
        return 512, 4
    if n <= 4096:
        return 1024, 4
    return 2048, 8


def _launch(
    x, residual, weight, scalar, next_weight, eps, next_eps, second, out, normed_out, rows_per_program,
    impl, chunk, unrounded_sum=False, num_warps=None,
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
    if unrounded_sum and scalar is not None:
        raise ValueError("unrounded_sum=True takes no scalar (the second norm reads the bare fp32 sum)")
    if impl not in (None, "tile", "loop"):
        raise ValueError(f"impl must be None, 'tile' or 'loop', got {impl!r}")
    if chunk is not None and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    out = _check_out(out, x.shape, x.dtype, x, "out")
    if second:
        normed_out = _check_out(normed_out, x.shape, x.dtype, x, "normed_out")
    if x.numel() == 0:
        return normed_out, out
    _require_launchable(_rmsnorm_residual_kernel, x)

    m = x.numel() // n
    block = triton.next_power_of_2(n)
    prefill_wide = rows_per_program is None and m >= _LOOP_MIN_ROWS and n >= _LOOP_MIN_N
    use_loop = impl == "loop" or (impl is None and (block > MAX_BLOCK or prefill_wide))
    if not use_loop and block > MAX_BLOCK:
        raise ValueError(f"hidden size {n} too large for the whole-row kernel (max {MAX_BLOCK}); use impl='loop'")
    x, x_d1, x_s0, x_s1 = _collapse_rows(x)
    residual, r_d1, r_s0, r_s1 = _collapse_rows(residual)
    common = (
        x, x_d1, x_s0, x_s1,
        residual, r_d1, r_s0, r_s1,
        weight,
        scalar if scalar is not None else weight,
        next_weight if next_weight is not None else weight,
        out,
        normed_out if second else out,
        m, n, float(eps), float(next_eps),
    )
    flags = dict(
        IO=io, HAS_SCALAR=scalar is not None, SECOND_NORM=second, HAS_NEXT_W=next_weight is not None,
        UNROUNDED_SUM=bool(unrounded_sum),
    )
    if use_loop:
        c, warps = _loop_config(n)
        if chunk is not None:
            c, warps = chunk, max(1, min(warps, chunk // 128))
        warps = num_warps or warps
        _rmsnorm_residual_loop_kernel[(m,)](
            *common,
            CHUNK=c,
            **flags,
            num_warps=warps,
            enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
        )
    else:
        rows = _rows_per_program(m, block, rows_per_program)
        _rmsnorm_residual_kernel[(triton.cdiv(m, rows),)](
            *common,
            BLOCK_N=block,
            ROWS=rows,
            **flags,
            num_warps=num_warps or _tile_warps(rows, block),
            enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
        )
    return normed_out, out


def _tile_warps(rows: int, block: int) -> int:
    """Warps of the whole-row kernel: 8 for one row of 4096/8192 (H100 sweep), else ~16 elements/thread."""
    if rows == 1 and block >= 4096:
        return 8
    return _num_warps(rows * block)


def rmsnorm_add_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    *,
    out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
    impl: Optional[str] = None,
    chunk: Optional[int] = None,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """``round(residual + rms(x, weight, eps))`` [``* scalar``, rounded]: one launch.

    ``x``/``residual``: same shape and io dtype (bf16/fp16/fp32), last dim N contiguous (other
    strides are addressed in place).  ``weight``: [N], io dtype or fp32.  ``scalar``: a 1-element
    device tensor (read inside the kernel; CUDA-graph safe).  Returns a contiguous tensor shaped
    like ``x`` (``out`` if given: it must be contiguous, same shape and dtype).

    Tuning knobs (the defaults choose by shape): ``impl="tile"`` holds ``rows_per_program`` whole
    rows per program, ``impl="loop"`` walks one row per program in ``chunk``-wide pieces.
    """
    return _launch(
        x, residual, weight, scalar, None, eps, eps, False, out, None, rows_per_program, impl, chunk
    )[1]


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
    impl: Optional[str] = None,
    chunk: Optional[int] = None,
    unrounded_sum: bool = False,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normed, residual_out)``: ``residual_out`` as :func:`rmsnorm_add_triton`, and
    ``normed = rms(residual_out, next_weight, next_eps)`` (no weight if ``next_weight`` is None)
    computed from the rounded ``residual_out``; one launch, both outputs contiguous.  With
    ``unrounded_sum=True`` (SGLang's fp32 residual add; no scalar) the second norm reads the fp32
    sum before rounding instead.  Tuning knobs as :func:`rmsnorm_add_triton`."""
    return _launch(
        x, residual, weight, scalar, next_weight, eps, next_eps, True, out, normed_out, rows_per_program,
        impl, chunk, unrounded_sum, num_warps,
    )

"""Triton kernel for ``round(round(gelu_tanh(gate)) * other)``.

Gemma-4 uses it twice: the MLP (``gelu(gate_proj(h)) * up_proj(h)``, where gate and up are often
the two halves of one merged GEMM output) and the per-layer-input (PLE) tail
(``gelu(per_layer_input_gate(x)) * per_layer_inputs[:, :, i, :]``, a strided slice).  Both inputs
are addressed in place through their strides (last dim contiguous); the output is contiguous.

Math (fp32, matching eager ``F.gelu(x, approximate="tanh")``, which rounds once)::

    inner = (x + (x*x*x) * 0.044715) * 0.7978845608028654
    g     = round((x * 0.5) * (tanh(inner) + 1))
    out   = round(g * other)

``tanh`` is not in ``triton.language`` (only in the per-backend ``extra`` libdevice, which this
package does not use), so it is computed as ``2 / (1 + exp(-2 * inner)) - 1``; adding the 1 back
afterwards keeps the same fp32 quantisation near ``tanh = -1`` as eager's ``tanh(inner) + 1``
(measured: closer to eager than the algebraically simpler ``2 * sigmoid(2 * inner)``).  fp32
results can differ from eager by a few fp32 ulp of the ``tanh + 1`` factor, i.e. a tiny absolute
error that is a large relative one where gelu is nearly 0 (x < -3).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .norm_residual import (
    _check_out,
    _check_same_device,
    _collapse_rows,
    _io_code,
    _require_launchable,
    _round_io,
    _rows_per_program,
)

__all__ = ["gelu_tanh_mul_triton"]

#: Column tile (wider rows, e.g. MLP intermediates 6144..21504, get a 2-D grid) and elements per
#: program (several short rows per program): 1024 and 4 warps measured best overall on H100.
_MAX_BLOCK_N = 1024
_ELEMS_PER_PROGRAM = 1024


@triton.jit
def _gelu_tanh_mul_kernel(
    g_ptr, g_d1, g_s0, g_s1,
    o_ptr, o_d1, o_s0, o_s1,
    out_ptr,
    M, N,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    IO: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]

    g_off = (rows // g_d1).to(tl.int64) * g_s0 + (rows % g_d1).to(tl.int64) * g_s1
    o_off = (rows // o_d1).to(tl.int64) * o_s0 + (rows % o_d1).to(tl.int64) * o_s1
    x = tl.load(g_ptr + g_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(o_ptr + o_off[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    inner = (x + (x * x * x) * 0.044715) * 0.7978845608028654
    # tanh(inner); the clamp only avoids exp overflow (tanh is -1.0 in fp32 long before 40)
    th = 2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * inner, 80.0))) - 1.0
    g = _round_io((x * 0.5) * (th + 1.0), IO)
    out = _round_io(g * y, IO)

    out_off = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


def gelu_tanh_mul_triton(
    gate: torch.Tensor,
    other: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> torch.Tensor:
    """``round(round(gelu_tanh(gate)) * other)`` in one launch.

    ``gate`` and ``other``: same shape, same io dtype (bf16/fp16/fp32); any strides on the leading
    dims (a non-contiguous last dim is copied first).  Returns a contiguous tensor shaped like
    ``gate`` (``out`` if given: contiguous, same shape and dtype).
    """
    io = _io_code(gate, "gate")
    if other.dtype != gate.dtype:
        raise ValueError(f"other dtype {other.dtype} does not match gate dtype {gate.dtype}")
    if tuple(other.shape) != tuple(gate.shape):
        if gate.dim() == 0 or other.dim() == 0 or other.shape[-1] != gate.shape[-1]:
            raise ValueError(f"last-dim mismatch: gate {tuple(gate.shape)} vs other {tuple(other.shape)}")
        raise ValueError(
            f"other shape {tuple(other.shape)} does not match gate shape {tuple(gate.shape)} "
            "(broadcasting is not supported)"
        )
    _check_same_device(gate, other, "other")
    out = _check_out(out, gate.shape, gate.dtype, gate, "out")
    if gate.numel() == 0:
        return out
    if gate.dim() == 0:
        gate, other = gate.reshape(1), other.reshape(1)
    _require_launchable(_gelu_tanh_mul_kernel, gate)

    n = gate.shape[-1]
    m = gate.numel() // n
    gate, g_d1, g_s0, g_s1 = _collapse_rows(gate)
    other, o_d1, o_s0, o_s1 = _collapse_rows(other)
    block = min(triton.next_power_of_2(n), _MAX_BLOCK_N)
    rows = _rows_per_program(m, block, rows_per_program, target=_ELEMS_PER_PROGRAM)
    grid = (triton.cdiv(m, rows), triton.cdiv(n, block))
    _gelu_tanh_mul_kernel[grid](
        gate, g_d1, g_s0, g_s1,
        other, o_d1, o_s0, o_s1,
        out,
        m, n,
        BLOCK_N=block,
        ROWS=rows,
        IO=io,
        num_warps=max(1, min(8, rows * block // 256)),
        enable_fp_fusion=False,  # no mul+add -> FMA contraction: round like eager, op by op
    )
    return out

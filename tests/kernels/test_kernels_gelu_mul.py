"""Triton gelu_tanh_mul launcher vs the torch reference (CUDA, or CPU through the interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.gelu_mul import gelu_tanh_mul_triton
from kernels_testutil import (
    DT_IDS,
    IO_DTYPES,
    assert_matches_reference,
    check_mismatch_fraction,
    poisoned,
    rand,
    ulp_distance,
)


def assert_gelu_matches(got, gate, other):
    """Compare with the reference, allowing for the one thing that cannot match bit for bit: tanh.

    The kernel's fp32 tanh (from exp) and torch's may differ in the last fp32 bit.  When the fp32
    gelu lands on a rounding tie/boundary of the io dtype, that moves the ROUNDED gelu ``g`` by one
    io ulp, which the final ``round(g * other)`` can turn into 2 ulp of the output.  So for
    bf16/fp16 each output must be within 1 ulp of the reference, or equal ``round(g' * other)``
    for a ``g'`` one ulp away from the reference's ``g``, or (far negative tail, where torch's
    vectorised CPU tanh returns exactly -1 and gelu is 0 instead of ~-1e-7) be within the fp32
    tanh error there: ``|gate * other| * 2**-21`` (a few fp32 ulp of ``tanh + 1`` near 0).
    And almost all elements must be bit-exact (see ``check_mismatch_fraction``).
    """
    gate, other = gate.cpu(), other.cpu()
    ref = R.gelu_tanh_mul_ref(gate, other)
    got = got.cpu()
    if got.dtype == torch.float32:
        assert_matches_reference(got, ref, "gelu_tanh_mul")
        return
    assert got.shape == ref.shape and got.dtype == ref.dtype and torch.isfinite(got).all()
    dt = gate.dtype
    g = F.gelu(gate, approximate="tanh")
    bits = g.view(torch.int16)
    ok = ulp_distance(got, ref) <= 1
    for step in (1, -1):
        g_nb = (bits + step).view(dt)
        ok |= got == (g_nb.float() * other.float()).to(dt)
    ok |= (got.float() - ref.float()).abs() <= (gate.float() * other.float()).abs() * 2.0**-21
    check_mismatch_fraction(got, ref, "gelu_tanh_mul")
    bad = ~ok
    assert not bad.any(), (
        f"gelu_tanh_mul: {int(bad.sum())} elements off, e.g. gate={gate[bad][:4].tolist()} "
        f"got={got[bad][:4].tolist()} ref={ref[bad][:4].tolist()}"
    )


def _operands(layout, lead, n, dtype, device):
    gate = rand((*lead, n), dtype, device, scale=3.0)
    if layout == "contig":
        other = rand((*lead, n), dtype, device)
    elif layout == "ple-slice":  # per_layer_inputs[:, :, i, :] of a [B, S, L, D] tensor
        other = rand((*lead, 3, n), dtype, device)[..., 1, :]
    elif layout == "merged-gate-up":  # gate and up are the two halves of one GEMM output
        gu = rand((*lead, 2 * n), dtype, device, scale=3.0)
        gate, other = gu[..., :n], gu[..., n:]
    elif layout == "transposed":  # leading dims that do not merge
        other = rand((lead[1], lead[0], n), dtype, device).transpose(0, 1)
    else:
        raise AssertionError(layout)
    return gate, other


CASES = {  # layout, leading shape, rows_per_program
    "contig-m1": ("contig", (1,), None),
    "ple-slice-2x3": ("ple-slice", (2, 3), None),
    "merged-gate-up-m7": ("merged-gate-up", (7,), 4),
    "transposed-3x2": ("transposed", (3, 2), 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [48, 72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_gelu_tanh_mul(dtype, n, case, device):
    layout, lead, rows = CASES[case]
    gate, other = _operands(layout, lead, n, dtype, device)
    out = poisoned(gate.shape, dtype, device)
    got = gelu_tanh_mul_triton(gate, other, out=out, rows_per_program=rows)
    assert got is out
    assert_gelu_matches(got, gate, other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_gelu_tanh_mul_wide_rows_fresh_output(dtype, device):
    """N wider than one column tile (2-D grid) and no ``out=``; extreme gate values included."""
    n = 2048 + 72
    gate = rand((2, n), dtype, device, scale=4.0)
    gate[0, :8] = torch.tensor([-30.0, -12.0, -6.0, -0.0, 0.0, 6.0, 12.0, 30.0], dtype=dtype)
    other = rand((2, n), dtype, device)
    got = gelu_tanh_mul_triton(gate, other)
    assert got.is_contiguous() and got.shape == gate.shape and got.dtype == dtype
    assert_gelu_matches(got, gate, other)


def test_validation_errors(device):
    g = torch.randn(3, 48, device=device)
    with pytest.raises(ValueError, match="last-dim mismatch"):
        gelu_tanh_mul_triton(g, torch.randn(3, 40, device=device))
    with pytest.raises(ValueError, match="broadcasting is not supported"):
        gelu_tanh_mul_triton(g, torch.randn(1, 48, device=device))
    with pytest.raises(ValueError, match="unsupported dtype"):
        gelu_tanh_mul_triton(g.double(), g.double())
    with pytest.raises(ValueError, match="other dtype"):
        gelu_tanh_mul_triton(g, g.half())
    with pytest.raises(ValueError, match="out"):
        gelu_tanh_mul_triton(g, g, out=torch.empty(3, 48, device=device, dtype=torch.half))

"""Triton rmsnorm_add / rmsnorm_add_rmsnorm launchers vs the torch reference.

Runs on CUDA when present, otherwise on CPU through the Triton interpreter (see conftest.py);
sizes stay tiny for the interpreter.
"""

import pytest
import torch

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton, rmsnorm_add_triton
from kernels_testutil import (
    DT_IDS,
    IO_DTYPES,
    assert_matches_reference,
    poisoned,
    rand,
    rand_scalar,
    rand_weight,
)

EPS = 1e-6
NEXT_EPS = 1e-5

# (leading shape, layout of x, scalar (dtype, shape) or None, next_weight dtype or None,
#  weight dtype, launcher knobs)
VARIANTS = {
    "m1-plain": ((1,), "contig", None, None, "io", {}),
    "m3-scalar-nextw32-rows2": ((3,), "contig", ("io", (1,)), "fp32", "io", {"rows_per_program": 2}),
    "m7-sliced-scalar0d32-nextw-w32": ((7,), "sliced", ("fp32", ()), "io", "fp32", {"rows_per_program": 4}),
    "m6-transposed-scalar": ((3, 2), "transposed", ("io", (1,)), None, "io", {}),
    # the chunked (prefill) kernel: chunks of 32 -> 2, 3 and 7 chunks, the last one masked
    "m3-loop-scalar-nextw": ((3,), "contig", ("io", (1,)), "io", "io", {"impl": "loop", "chunk": 32}),
    "m4-loop-transposed-w32": ((2, 2), "transposed", None, None, "fp32", {"impl": "loop", "chunk": 64}),
}


def _dt(spec, io):
    return io if spec == "io" else torch.float32


def _make_x(lead, layout, n, dtype, device):
    if layout == "contig":
        return rand((*lead, n), dtype, device, scale=3.0)
    if layout == "sliced":  # a column slice of a wider GEMM output: row stride n + 24
        return rand((*lead, n + 24), dtype, device, scale=3.0)[..., 5 : 5 + n]
    if layout == "transposed":  # two leading dims that cannot be merged
        a, b = lead
        return rand((b, a, n), dtype, device, scale=3.0).transpose(0, 1)
    raise AssertionError(layout)


def _inputs(dtype, n, variant, device):
    lead, layout, scalar_spec, nw_spec, w_spec, knobs = VARIANTS[variant]
    x = _make_x(lead, layout, n, dtype, device)
    residual = rand((*lead, n), dtype, device, scale=2.0)
    w = rand_weight(n, _dt(w_spec, dtype), device)
    scalar = None
    if scalar_spec is not None:
        scalar = rand_scalar(_dt(scalar_spec[0], dtype), scalar_spec[1], device)
    nw = rand_weight(n, _dt(nw_spec, dtype), device) if nw_spec is not None else None
    return x, residual, w, scalar, nw, knobs


def _cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [48, 72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_rmsnorm_add(dtype, n, variant, device):
    x, residual, w, scalar, _, knobs = _inputs(dtype, n, variant, device)
    out = poisoned(x.shape, dtype, device)
    got = rmsnorm_add_triton(x, residual, w, scalar, EPS, out=out, **knobs)
    assert got is out
    ref = R.rmsnorm_add_ref(_cpu(x), _cpu(residual), _cpu(w), _cpu(scalar), EPS)
    assert_matches_reference(got, ref, "rmsnorm_add")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [48, 72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_rmsnorm_add_rmsnorm(dtype, n, variant, device):
    x, residual, w, scalar, nw, knobs = _inputs(dtype, n, variant, device)
    out = poisoned(x.shape, dtype, device)
    normed_out = poisoned(x.shape, dtype, device)
    normed, s = rmsnorm_add_rmsnorm_triton(
        x, residual, w, scalar, nw, EPS, NEXT_EPS, out=out, normed_out=normed_out, **knobs
    )
    assert s is out and normed is normed_out
    ref_normed, ref_s = R.rmsnorm_add_rmsnorm_ref(
        _cpu(x), _cpu(residual), _cpu(w), _cpu(scalar), _cpu(nw), EPS, NEXT_EPS
    )
    assert_matches_reference(s, ref_s, "residual_out")
    assert_matches_reference(normed, ref_normed, "normed")


# variants without a scalar (SGLang's fp32 residual form has none): whole rows and chunked
UNROUNDED_VARIANTS = ["m1-plain", "m6-transposed-scalar", "m4-loop-transposed-w32", "m3-loop-scalar-nextw"]


@pytest.mark.parametrize("variant", UNROUNDED_VARIANTS)
@pytest.mark.parametrize("n", [72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_rmsnorm_add_rmsnorm_unrounded_sum(dtype, n, variant, device):
    x, residual, w, _, nw, knobs = _inputs(dtype, n, variant, device)
    out = poisoned(x.shape, dtype, device)
    normed_out = poisoned(x.shape, dtype, device)
    normed, s = rmsnorm_add_rmsnorm_triton(
        x, residual, w, None, nw, EPS, NEXT_EPS, out=out, normed_out=normed_out, unrounded_sum=True, **knobs
    )
    assert s is out and normed is normed_out
    ref_normed, ref_s = R.rmsnorm_add_rmsnorm_ref(
        _cpu(x), _cpu(residual), _cpu(w), None, _cpu(nw), EPS, NEXT_EPS, unrounded_sum=True
    )
    assert_matches_reference(s, ref_s, "residual_out")
    assert_matches_reference(normed, ref_normed, "normed")
    if dtype != torch.float32:  # the flag changes the result: the norm did not read the rounded sum
        rounded, _ = R.rmsnorm_add_rmsnorm_ref(_cpu(x), _cpu(residual), _cpu(w), None, _cpu(nw), EPS, NEXT_EPS)
        assert not torch.equal(rounded, ref_normed)


def test_unrounded_sum_rejects_scalar(device):
    x, r, w = (torch.randn(2, 48, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="unrounded_sum"):
        rmsnorm_add_rmsnorm_triton(x, r, w[0], torch.ones(1, device=device), None, unrounded_sum=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_fresh_outputs_hidden_size(dtype, device):
    """No ``out=``: fresh contiguous outputs; a real hidden size (1536: BLOCK 2048, masked)."""
    n = 1536
    x = rand((2, n), dtype, device, scale=3.0)
    residual = rand((2, n), dtype, device)
    w, nw = rand_weight(n, dtype, device), rand_weight(n, dtype, device)
    scalar = rand_scalar(dtype, (1,), device)
    s1 = rmsnorm_add_triton(x, residual, w, scalar, EPS)
    normed, s2 = rmsnorm_add_rmsnorm_triton(x, residual, w, scalar, nw, EPS, NEXT_EPS)
    for t in (s1, s2, normed):
        assert t.is_contiguous() and t.shape == x.shape and t.dtype == dtype and t.device == x.device
    ref_normed, ref_s = R.rmsnorm_add_rmsnorm_ref(x.cpu(), residual.cpu(), w.cpu(), scalar.cpu(), nw.cpu(), EPS, NEXT_EPS)
    assert_matches_reference(s1, ref_s, "rmsnorm_add")
    assert_matches_reference(s2, ref_s, "residual_out")
    assert_matches_reference(normed, ref_normed, "normed")


def test_validation_errors(device):
    x = torch.randn(3, 48, device=device)
    r = torch.randn(3, 48, device=device)
    w = torch.randn(48, device=device)
    with pytest.raises(ValueError, match="last-dim mismatch"):
        rmsnorm_add_triton(x, torch.randn(3, 40, device=device), w)
    with pytest.raises(ValueError, match="residual shape"):
        rmsnorm_add_triton(x, torch.randn(2, 48, device=device), w)
    with pytest.raises(ValueError, match="weight has shape"):
        rmsnorm_add_triton(x, r, torch.randn(40, device=device))
    with pytest.raises(ValueError, match="next_weight has shape"):
        rmsnorm_add_rmsnorm_triton(x, r, w, None, torch.randn(47, device=device))
    with pytest.raises(ValueError, match="unsupported dtype"):
        rmsnorm_add_triton(x.double(), r.double(), w)
    with pytest.raises(ValueError, match="unsupported dtype"):
        rmsnorm_add_triton(x, r, w.to(torch.int32))
    with pytest.raises(ValueError, match="residual dtype"):
        rmsnorm_add_triton(x, r.bfloat16(), w)
    with pytest.raises(ValueError, match="exactly one element"):
        rmsnorm_add_triton(x, r, w, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="out"):
        rmsnorm_add_triton(x, r, w, out=torch.empty(3, 47, device=device))
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm_add_triton(x, r, w, rows_per_program=3)
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm_add_triton(x, r, w, impl="loop", chunk=48)
    with pytest.raises(ValueError, match="impl"):
        rmsnorm_add_triton(x, r, w, impl="fast")

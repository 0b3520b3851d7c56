"""Triton moe_input_norms / moe_branch_combine launchers vs the torch reference (CUDA, or CPU interpreter)."""

import pytest
import torch

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.moe_norms import moe_branch_combine_triton, moe_input_norms_triton
from kernels_testutil import (
    DT_IDS,
    IO_DTYPES,
    assert_matches_reference,
    poisoned,
    rand,
    rand_scalar,
    rand_weight,
)

EPS = (1e-6, 1e-5, 2e-6, 3e-6)


def _cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("lead,layout", [((1,), "contig"), ((2, 3), "contig"), ((5,), "sliced")])
@pytest.mark.parametrize("n", [72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_moe_input_norms(dtype, n, lead, layout, device):
    if layout == "sliced":  # rows of a wider buffer (row stride n + 16)
        x = rand((*lead, n + 16), dtype, device, scale=3.0)[..., 8 : 8 + n]
    else:
        x = rand((*lead, n), dtype, device, scale=3.0)
    residual = rand((*lead, n), dtype, device, scale=2.0)
    ws = [rand_weight(n, dtype, device) for _ in range(4)]
    root = n ** -0.5
    outs = tuple(poisoned(x.shape, dtype, device) for _ in range(4))
    got = moe_input_norms_triton(x, residual, *ws, root, *EPS, outs=outs, rows_per_program=2)
    assert all(g is o for g, o in zip(got, outs))
    refs = R.moe_input_norms_ref(_cpu(x), _cpu(residual), *map(_cpu, ws), root, *EPS)
    for g, r, name in zip(got, refs, ("residual_out", "pre", "pre2", "router_in")):
        assert_matches_reference(g, r, name)


@pytest.mark.parametrize("scalar,next_w", [(True, True), (True, False), (False, True), ("nonext", None)])
@pytest.mark.parametrize("n", [72, 200])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_moe_branch_combine(dtype, n, scalar, next_w, device):
    h1 = rand((2, 3, n), dtype, device, scale=3.0)
    h2 = rand((6, n + 8), dtype, device, scale=3.0)[:, :n].reshape(2, 3, n)  # strided rows
    residual = rand((2, 3, n), dtype, device, scale=2.0)
    w1, w2, w3 = (rand_weight(n, dtype, device) for _ in range(3))
    sc = rand_scalar(dtype, (1,), device) if scalar is True else None
    nw = rand_weight(n, dtype, device) if next_w else None
    next_eps = None if scalar == "nonext" else 4e-6
    out = poisoned(h1.shape, dtype, device)
    normed_out = poisoned(h1.shape, dtype, device) if next_eps is not None else None
    normed, s = moe_branch_combine_triton(h1, h2, residual, w1, w2, w3, sc, nw, *EPS[:3], next_eps,
                                          out=out, normed_out=normed_out, rows_per_program=4)
    assert s is out
    ref_normed, ref_s = R.moe_branch_combine_ref(
        *map(_cpu, (h1, h2, residual, w1, w2, w3, sc, nw)), *EPS[:3], next_eps
    )
    assert_matches_reference(s, ref_s, "residual_out")
    if next_eps is None:
        assert normed.numel() == 0 and ref_normed.numel() == 0
    else:
        assert normed is normed_out
        assert_matches_reference(normed, ref_normed, "normed")


def test_validation_errors(device):
    x = torch.randn(3, 48, device=device)
    w = torch.randn(48, device=device)
    with pytest.raises(ValueError, match="residual shape"):
        moe_input_norms_triton(x, torch.randn(2, 48, device=device), w, w, w, w, 0.1)
    with pytest.raises(ValueError, match="router_scale has shape"):
        moe_input_norms_triton(x, x, w, w, w, torch.randn(40, device=device), 0.1)
    with pytest.raises(ValueError, match="h2 dtype"):
        moe_branch_combine_triton(x, x.half(), x, w, w, w)
    with pytest.raises(ValueError, match="exactly one element"):
        moe_branch_combine_triton(x, x, x, w, w, w, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="next_weight given without next_eps"):
        moe_branch_combine_triton(x, x, x, w, w, w, None, w, 1e-6, 1e-6, 1e-6, None)

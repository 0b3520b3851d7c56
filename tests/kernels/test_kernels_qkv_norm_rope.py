"""Triton q_norm_rope / qkv_norm_rope launchers vs the torch reference (CUDA, or CPU interpreter)."""

import pytest
import torch

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.qkv_norm_rope import q_norm_rope_triton, qkv_norm_rope_triton
from kernels_testutil import (
    DT_IDS,
    IO_DTYPES,
    assert_matches_reference,
    poisoned,
    rand,
    rand_weight,
    rope_tables,
)

Q_EPS, K_EPS, V_EPS = 1e-6, 1e-5, 1e-4

# name: (B, S, Hq, Hk, D, layout, v is k, weight dtype, cos batch, rows_per_program)
CASES = {
    "fused-qkv-4x2-d16": (1, 3, 4, 2, 16, "fused", False, "io", "B", 8),
    "k-is-v-4x2-d16": (1, 2, 4, 2, 16, "fused", True, "io", "B", None),
    "separate-2x1-d32-cos-b1-w32": (2, 2, 2, 1, 32, "separate", False, "fp32", 1, 4),
    "heads-major-k-is-v-2x1-d32": (2, 3, 2, 1, 32, "heads-major", True, "io", "B", 2),
}


def _make(bsz, seq, hq, hk, d, layout, v_is_k, dtype, device):
    if layout == "fused":  # views of one [B, S, (Hq + 2 Hk) * D] projection output
        width = (hq + (1 if v_is_k else 2) * hk) * d
        qkv = rand((bsz, seq, width), dtype, device, scale=2.0)
        q = qkv[..., : hq * d].view(bsz, seq, hq, d)
        k = qkv[..., hq * d : (hq + hk) * d].view(bsz, seq, hk, d)
        v = k if v_is_k else qkv[..., (hq + hk) * d :].view(bsz, seq, hk, d)
    elif layout == "separate":
        q = rand((bsz, seq, hq, d), dtype, device, scale=2.0)
        k = rand((bsz, seq, hk, d), dtype, device, scale=2.0)
        v = k if v_is_k else rand((bsz, seq, hk, d), dtype, device, scale=2.0)
    elif layout == "heads-major":  # [B, H, S, D] storage seen as [B, S, H, D]: unmergeable strides
        q = rand((bsz, hq, seq, d), dtype, device, scale=2.0).transpose(1, 2)
        k = rand((bsz, hk, seq, d), dtype, device, scale=2.0).transpose(1, 2)
        v = k if v_is_k else rand((bsz, hk, seq, d), dtype, device, scale=2.0).transpose(1, 2)
    else:
        raise AssertionError(layout)
    return q, k, v


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_qkv_norm_rope(dtype, case, device):
    bsz, seq, hq, hk, d, layout, v_is_k, w_spec, cos_b, rows = CASES[case]
    q, k, v = _make(bsz, seq, hq, hk, d, layout, v_is_k, dtype, device)
    assert (v is k) == v_is_k
    w_dt = dtype if w_spec == "io" else torch.float32
    qw, kw = rand_weight(d, w_dt, device), rand_weight(d, w_dt, device)
    cos, sin = rope_tables(bsz if cos_b == "B" else 1, seq, d, dtype, device)
    outs = [poisoned(t.shape, dtype, device) for t in (q, k, v)]
    got = qkv_norm_rope_triton(
        q, k, v, qw, kw, cos, sin, Q_EPS, K_EPS, V_EPS,
        q_out=outs[0], k_out=outs[1], v_out=outs[2], rows_per_program=rows,
    )
    assert all(g is o for g, o in zip(got, outs))
    cpu = [t.cpu() for t in (q, k, v if not v_is_k else k, qw, kw, cos, sin)]
    refs = R.qkv_norm_rope_ref(*cpu, Q_EPS, K_EPS, V_EPS)
    for name, g, r in zip("qkv", got, refs):
        assert_matches_reference(g, r, name)


@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
def test_q_norm_rope(dtype, device):
    bsz, seq, hq, d = 2, 2, 3, 16
    q = rand((bsz, seq, hq * d + 8), dtype, device, scale=2.0)[..., 8:].view(bsz, seq, hq, d)
    w = rand_weight(d, dtype, device)
    cos, sin = rope_tables(bsz, seq, d, dtype, device)
    out = poisoned(q.shape, dtype, device)
    got = q_norm_rope_triton(q, w, cos, sin, Q_EPS, out=out, rows_per_program=4)
    assert got is out
    ref = R.q_norm_rope_ref(q.cpu(), w.cpu(), cos.cpu(), sin.cpu(), Q_EPS)
    assert_matches_reference(got, ref, "q")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_transposed_rope_tables(dtype, device):
    # Inductor on torch 2.11 hands cos/sin over as [B, S, D] views of a [B, D, S] buffer (last-dim
    # stride S): the kernel reads them in place (no copy) and still matches the reference
    bsz, seq, hq, hk, d = 1, 5, 4, 2, 32
    q, k, v = _make(bsz, seq, hq, hk, d, "fused", False, dtype, device)
    qw, kw = rand_weight(d, dtype, device), rand_weight(d, dtype, device)
    cos_c, sin_c = rope_tables(bsz, seq, d, dtype, device)
    cos = cos_c.transpose(1, 2).contiguous().transpose(1, 2)
    sin = sin_c.transpose(1, 2).contiguous().transpose(1, 2)
    assert cos.stride(-1) == seq and torch.equal(cos, cos_c)
    outs = [poisoned(t.shape, dtype, device) for t in (q, k, v)]
    got = qkv_norm_rope_triton(q, k, v, qw, kw, cos, sin, Q_EPS, K_EPS, V_EPS,
                               q_out=outs[0], k_out=outs[1], v_out=outs[2])
    refs = R.qkv_norm_rope_ref(*(t.cpu() for t in (q, k, v, qw, kw, cos_c, sin_c)), Q_EPS, K_EPS, V_EPS)
    for g, r, name in zip(got, refs, "qkv"):
        assert_matches_reference(g, r, name)
    got_q = q_norm_rope_triton(q, qw, cos, sin, Q_EPS)
    assert_matches_reference(got_q, R.q_norm_rope_ref(q.cpu(), qw.cpu(), cos_c.cpu(), sin_c.cpu(), Q_EPS), "q")


def test_fresh_outputs_real_head_dim(device):
    """No ``out=``: fresh contiguous outputs; head_dim 256 as in the real models (decode shape)."""
    dtype = torch.bfloat16
    bsz, seq, hq, hk, d = 1, 1, 2, 1, 256
    q, k, v = _make(bsz, seq, hq, hk, d, "fused", False, dtype, device)
    qw, kw = rand_weight(d, dtype, device), rand_weight(d, dtype, device)
    cos, sin = rope_tables(bsz, seq, d, dtype, device)
    got = qkv_norm_rope_triton(q, k, v, qw, kw, cos, sin, Q_EPS, K_EPS, V_EPS)
    refs = R.qkv_norm_rope_ref(q.cpu(), k.cpu(), v.cpu(), qw.cpu(), kw.cpu(), cos.cpu(), sin.cpu(), Q_EPS, K_EPS, V_EPS)
    for name, g, r, src in zip("qkv", got, refs, (q, k, v)):
        assert g.is_contiguous() and g.shape == src.shape and g.dtype == dtype
        assert_matches_reference(g, r, name)


def test_validation_errors(device):
    q = torch.randn(1, 2, 4, 16, device=device)
    k = torch.randn(1, 2, 2, 16, device=device)
    w = torch.randn(16, device=device)
    cos = sin = torch.randn(1, 2, 16, device=device)
    with pytest.raises(ValueError, match="last-dim mismatch"):
        qkv_norm_rope_triton(q, torch.randn(1, 2, 2, 8, device=device), k, w, w, cos, sin)
    with pytest.raises(ValueError, match="v shape"):
        qkv_norm_rope_triton(q, k, torch.randn(1, 2, 1, 16, device=device), w, w, cos, sin)
    with pytest.raises(ValueError, match="k_weight has shape"):
        qkv_norm_rope_triton(q, k, k, w, torch.randn(8, device=device), cos, sin)
    with pytest.raises(ValueError, match="last-dim mismatch"):
        q_norm_rope_triton(q, w, torch.randn(1, 2, 8, device=device), sin)
    with pytest.raises(ValueError, match="does not broadcast"):
        q_norm_rope_triton(q, w, torch.randn(1, 3, 16, device=device), sin)
    with pytest.raises(ValueError, match="even"):
        q_norm_rope_triton(torch.randn(1, 2, 4, 15, device=device), torch.randn(15, device=device), cos[..., :15], sin[..., :15])
    with pytest.raises(ValueError, match="unsupported dtype"):
        q_norm_rope_triton(q.double(), w, cos, sin)
    with pytest.raises(ValueError, match="dtype"):
        qkv_norm_rope_triton(q, k.half(), k.half(), w, w, cos, sin)
    with pytest.raises(ValueError, match=r"\[B, S, Hq, D\]"):
        q_norm_rope_triton(q[0], w, cos, sin)

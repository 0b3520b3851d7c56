"""The references equal the literal unfused HF-style eager expressions, bit for bit (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from gemma4_passes.kernels import reference as R
from kernels_testutil import DT_IDS, rand, rand_scalar, rand_weight, rope_tables

DTYPES = [torch.bfloat16, torch.float32, torch.float16]
EPS = 1e-6


# ---- the literal HF (transformers Gemma-4) expressions ----------------------------------------


def hf_rmsnorm(x, w, eps):
    h = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        h = h * w.float()
    return h.type_as(x)


def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rope(x, cos, sin, unsqueeze_dim=2):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (hf_rotate_half(x) * sin)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(-1), b.reshape(-1)) or torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    ), f"max diff {(a.float() - b.float()).abs().max()}"


# ---- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("n", [200, 1536])
@pytest.mark.parametrize("with_scalar", [False, True])
def test_rmsnorm_add_ref_is_hf(dtype, n, with_scalar):
    x = rand((2, 5, n), dtype, scale=3.0)
    residual = rand((2, 5, n), dtype)
    w = rand_weight(n, dtype)
    scalar = rand_scalar(dtype) if with_scalar else None
    h = hf_rmsnorm(x, w, EPS)
    expect = residual + h
    if scalar is not None:
        expect = expect * scalar
    got = R.rmsnorm_add_ref(x, residual, w, scalar, EPS)
    assert got.is_contiguous()
    assert_bitwise(got, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("next_w", [False, True])
def test_rmsnorm_add_rmsnorm_ref_is_hf(dtype, next_w):
    n = 2560
    x = rand((7, n), dtype, scale=2.0)
    residual = rand((7, n), dtype, scale=4.0)
    w = rand_weight(n, dtype)
    nw = rand_weight(n, dtype) if next_w else None
    scalar = rand_scalar(dtype)
    s = (residual + hf_rmsnorm(x, w, EPS)) * scalar
    normed = hf_rmsnorm(s, nw, 1e-5)
    got_normed, got_s = R.rmsnorm_add_rmsnorm_ref(x, residual, w, scalar, nw, EPS, 1e-5)
    assert_bitwise(got_s, s)
    assert_bitwise(got_normed, normed)


def test_rmsnorm_add_ref_fp32_weight_and_0dim_scalar():
    """fp32 weight (HF multiplies by w.float()) and a 0-dim io-dtype scalar keep the io dtype."""
    x = rand((3, 72), torch.bfloat16, scale=3.0)
    residual = rand((3, 72), torch.bfloat16)
    w = rand_weight(72, torch.float32)
    scalar = rand_scalar(torch.bfloat16, shape=())
    expect = (residual + hf_rmsnorm(x, w, EPS)) * scalar
    assert_bitwise(R.rmsnorm_add_ref(x, residual, w, scalar, EPS), expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_gelu_tanh_mul_ref_is_hf(dtype):
    bsz, seq, layers, d = 2, 3, 4, 256
    gate = rand((bsz, seq, d), dtype, scale=3.0)
    per_layer_inputs = rand((bsz, seq, layers, d), dtype)
    other = per_layer_inputs[:, :, 2, :]  # strided view, as in the PLE tail
    expect = F.gelu(gate, approximate="tanh") * other
    got = R.gelu_tanh_mul_ref(gate, other)
    assert got.is_contiguous()
    assert_bitwise(got, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("k_eq_v", [False, True])
def test_qkv_norm_rope_ref_is_hf(dtype, k_eq_v):
    bsz, seq, hq, hk, d = 2, 3, 4, 2, 256
    qkv = rand((bsz, seq, (hq + 2 * hk) * d), dtype, scale=2.0)
    q = qkv[..., : hq * d].view(bsz, seq, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(bsz, seq, hk, d)
    v = k if k_eq_v else qkv[..., (hq + hk) * d :].view(bsz, seq, hk, d)
    qw, kw = rand_weight(d, dtype), rand_weight(d, dtype)
    cos, sin = rope_tables(bsz, seq, d, dtype)

    exp_q = hf_apply_rope(hf_rmsnorm(q, qw, EPS), cos, sin)
    exp_k = hf_apply_rope(hf_rmsnorm(k, kw, 1e-5), cos, sin)
    exp_v = hf_rmsnorm(v, None, 1e-4)
    got_q, got_k, got_v = R.qkv_norm_rope_ref(q, k, v, qw, kw, cos, sin, EPS, 1e-5, 1e-4)
    for got, exp in ((got_q, exp_q), (got_k, exp_k), (got_v, exp_v)):
        assert got.is_contiguous()
        assert_bitwise(got, exp)
    assert_bitwise(R.q_norm_rope_ref(q, qw, cos, sin, EPS), exp_q)

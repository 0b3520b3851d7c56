"""MoE-layer fusions (26B-A4B): moe_input_norms, moe_branch_combine, moe_router."""

import pytest
import torch
import torch.nn.functional as F

from .conftest import DT_IDS, FP32_REL_TOL, act, aten, g4, rms_hf, run_case, weight

B, S, H = 2, 5, 72
E, K = 16, 4
EPS = 1e-6


# ---- the transformers forms -------------------------------------------------------------------


def moe_input_hf(attn, residual, w1, w_pre, w_pre2, router_scale):
    h = residual + rms_hf(attn, w1, EPS)
    flat = h.reshape(-1, h.shape[-1])
    router_in = rms_hf(flat, None, EPS) * router_scale * (H ** -0.5)
    return h, rms_hf(h, w_pre, EPS), rms_hf(flat, w_pre2, EPS), router_in


def moe_input_router_norm_weighted(attn, residual, w1, w_pre, w_pre2, router_scale):
    # near miss: a router norm WITH weight (then * scale) rounds differently: not the router form
    h = residual + rms_hf(attn, w1, EPS)
    flat = h.reshape(-1, h.shape[-1])
    router_in = rms_hf(flat, w_pre, EPS) * router_scale * (H ** -0.5)
    return h, rms_hf(h, w_pre, EPS), rms_hf(flat, w_pre2, EPS), router_in


def moe_combine_hf(h1, h2, residual, w1, w2, w3, scalar, w_next):
    h = rms_hf(h1, w1, EPS) + rms_hf(h2, w2, EPS)
    x = (residual + rms_hf(h, w3, EPS)) * scalar
    return rms_hf(x, w_next, EPS), x


def moe_combine_one_branch_unnormed(h1, h2, residual, w1, w2, w3, scalar, w_next):
    # near miss: the expert branch is not normed
    h = rms_hf(h1, w1, EPS) + h2
    x = (residual + rms_hf(h, w3, EPS)) * scalar
    return rms_hf(x, w_next, EPS), x


def router_hf(logits, pes):
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, K, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * pes[ids], ids


def router_topk_first(logits, pes):
    v, ids = torch.topk(logits, K, dim=-1)
    w = F.softmax(v.float(), dim=-1)
    return w * pes[ids], ids


def router_no_renorm(logits, pes):
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, K, dim=-1)
    return w * pes[ids], ids


def router_no_scale(logits, pes):
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, K, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids


def _input_args(dtype):
    return (act(B, S, H, dtype=dtype, scale=3.0), act(B, S, H, dtype=dtype, scale=2.0),
            *(weight(H, dtype) for _ in range(4)))


def _combine_args(dtype):
    return (act(B, S, H, dtype=dtype, scale=3.0), act(B, S, H, dtype=dtype, scale=3.0),
            act(B, S, H, dtype=dtype, scale=2.0), *(weight(H, dtype) for _ in range(3)),
            (0.5 + torch.rand(1)).to(dtype), weight(H, dtype))


def _router_args(dtype):
    return act(B * S, E, dtype=dtype, scale=2.0), (0.5 + torch.rand(E)).to(dtype)


# ---- moe_input_norms --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_IDS.get)
def test_moe_input_norms(dtype):
    case = run_case(moe_input_hf, _input_args(dtype), "moe_input_norms")
    case.assert_only(1)
    # four norms, one residual add, the router's two multiplies: all inside the one kernel
    case.assert_replaced({aten.mean.dim: None, aten.pow.Tensor_Scalar: None, aten.add.Tensor: None},
                         {g4.moe_input_norms.default: 1})
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.moe_input_norms.default]
    assert node.args[6] == pytest.approx(H ** -0.5)
    case.assert_parity()


def test_moe_input_norms_weighted_router_norm_not_matched():
    case = run_case(moe_input_router_norm_weighted, _input_args(torch.bfloat16), "moe_input_norms")
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


# ---- moe_branch_combine -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_moe_branch_combine(dtype):
    case = run_case(moe_combine_hf, _combine_args(dtype), "moe_branch_combine")
    case.assert_only(1)
    case.assert_replaced({aten.mean.dim: None, aten.pow.Tensor_Scalar: None, aten.add.Tensor: None},
                         {g4.moe_branch_combine.default: 1})
    case.assert_parity()


def test_moe_branch_combine_unnormed_branch_not_matched():
    case = run_case(moe_combine_one_branch_unnormed, _combine_args(torch.bfloat16), "moe_branch_combine")
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


# ---- moe_router -------------------------------------------------------------------------------


def _router_parity(case, dtype):
    (w, ids), (w_ref, ids_ref) = case.after.out, case.eager
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, ids_ref)  # random logits: no ties, the same experts in the same order
    err = (w - w_ref).abs().max().item()
    assert err <= FP32_REL_TOL * w_ref.abs().max().item(), err


@pytest.mark.parametrize("fn", [router_hf, router_topk_first], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_moe_router(fn, dtype):
    case = run_case(fn, _router_args(dtype), "moe_router", baseline=False)
    case.assert_only(1)
    case.assert_replaced({aten.topk.default: None, aten.exp.default: None, aten.index.Tensor: None},
                         {g4.moe_router.default: 1})
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.moe_router.default]
    assert node.args[2:] == (K, fn is router_topk_first)
    _router_parity(case, dtype)


@pytest.mark.parametrize("fn", [router_no_renorm, router_no_scale], ids=lambda f: f.__name__)
def test_moe_router_near_misses(fn):
    case = run_case(fn, _router_args(torch.float32), "moe_router", baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    _router_parity(case, torch.float32)

"""qkv_norm: q/k norms + RoPE and the weightless v norm of one attention layer -> one op.

The toy is HF's ``Gemma4TextAttention`` up to the attention call: q/k/v projections of one
hidden state viewed [B, S, H, D], ``q_norm``/``k_norm`` (weight) -> RoPE (cos/sin [B, S, D]
unsqueezed at dim 2, ``rotate_half`` via ``cat((-x2, x1), -1)``), ``v_norm`` (no weight),
then ``.transpose(1, 2)``.
"""

import pytest
import torch

from gemma4_passes.passes import graph_match

from .conftest import (
    DT_IDS,
    act,
    apply_rope,
    aten,
    g4,
    rms_hf,
    rope_tables,
    rotate_half,
    rotate_half_wrong,
    run_case,
    weight,
)

FUSION = "qkv_norm"
B, S, HIDDEN, HQ, HK, D = 2, 3, 72, 4, 2, 16


class Attention(torch.nn.Module):
    def __init__(self, dtype, *, variant="full", rotate=rotate_half, eps=1e-6, k_eps=None):
        super().__init__()
        self.variant, self.rotate, self.eps, self.k_eps = variant, rotate, eps, k_eps or eps
        self.q_proj = torch.nn.Linear(HIDDEN, HQ * D, bias=False, dtype=dtype)
        self.k_proj = torch.nn.Linear(HIDDEN, HK * D, bias=False, dtype=dtype)
        self.v_proj = torch.nn.Linear(HIDDEN, HK * D, bias=False, dtype=dtype) if variant == "full" else None
        self.q_norm = torch.nn.Parameter(weight(D, dtype), requires_grad=False)
        self.k_norm = torch.nn.Parameter(weight(D, dtype), requires_grad=False)

    def forward(self, hidden_states, cos, sin):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, D)
        query_states = self.q_proj(hidden_states).view(hidden_shape)
        query_states = rms_hf(query_states, self.q_norm, self.eps)
        query_states = apply_rope(query_states, cos, sin, unsqueeze_dim=2, rotate=self.rotate)
        query_states = query_states.transpose(1, 2)
        if self.variant == "kv_shared":  # keys/values come from an earlier layer
            return query_states
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape) if self.v_proj is not None else key_states
        key_states = rms_hf(key_states, self.k_norm, self.k_eps)
        key_states = apply_rope(key_states, cos, sin, unsqueeze_dim=2, rotate=self.rotate)
        key_states = key_states.transpose(1, 2)
        value_states = rms_hf(value_states, None, self.eps)
        value_states = value_states.transpose(1, 2)
        return query_states, key_states, value_states


def _inputs(dtype):
    cos, sin = rope_tables(B, S, D, dtype)
    return act(B, S, HIDDEN, dtype=dtype), cos, sin


QKV_OPS = {aten.mean.dim: None, aten.pow.Tensor_Scalar: None, aten.cat.default: None, aten.neg.default: None}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_IDS.get)
def test_gqa_layer(dtype):
    case = run_case(Attention(dtype, k_eps=1e-5), _inputs(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced(QKV_OPS, {g4.qkv_norm_rope.default: 1, g4.q_norm_rope.default: 0})
    assert case.after.count(aten.mm.default) == 3  # projections untouched
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.qkv_norm_rope.default]
    q, k, v = (n.meta["val"] for n in node.args[:3])
    assert q.shape[-2:] == (HQ, D) and k.shape[-2:] == (HK, D) and v.shape[-2:] == (HK, D)
    assert node.args[-3:] == (1e-6, 1e-5, 1e-6)  # q, k, v eps, each read from its norm
    case.assert_parity()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_kv_shared_layer_q_only(dtype):
    case = run_case(Attention(dtype, variant="kv_shared"), _inputs(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced(QKV_OPS, {g4.q_norm_rope.default: 1, g4.qkv_norm_rope.default: 0})
    assert case.after.count(aten.mm.default) == 1  # no k/v projection, none invented
    case.assert_parity()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_k_eq_v_layer(dtype):
    # value_states = the raw k projection (attention_k_eq_v): k_norm and v_norm read one tensor
    # (after CSE they share its upcast and variance; in fp32 k's inner x*inv IS v's norm output)
    case = run_case(Attention(dtype, variant="k_eq_v"), _inputs(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced(QKV_OPS, {g4.qkv_norm_rope.default: 1, g4.q_norm_rope.default: 0})
    assert case.after.count(aten.mm.default) == 2
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.qkv_norm_rope.default]
    assert node.args[1] is node.args[2]  # k and v: the same projection
    case.assert_parity()


class TwoLayers(torch.nn.Module):
    """A full GQA layer, then a KV-shared one (q only), joined by a toy o_proj + residual."""

    def __init__(self, dtype):
        super().__init__()
        self.layer0 = Attention(dtype)
        self.layer1 = Attention(dtype, variant="kv_shared")
        self.o_proj = torch.nn.Linear(HQ * D, HIDDEN, bias=False, dtype=dtype)

    def forward(self, h, cos, sin):
        q0, k0, v0 = self.layer0(h, cos, sin)
        h = h + self.o_proj(q0.transpose(1, 2).reshape(*h.shape[:-1], -1))
        q1 = self.layer1(h, cos, sin)
        return q0, k0, v0, q1


def test_count_per_layer():
    dtype = torch.float32
    case = run_case(TwoLayers(dtype), _inputs(dtype), FUSION)
    case.assert_only(2)
    case.assert_replaced(QKV_OPS, {g4.qkv_norm_rope.default: 1, g4.q_norm_rope.default: 1})
    case.assert_parity()


# ---------------------------------------------------------------------------------------------
# near misses
# ---------------------------------------------------------------------------------------------


def test_other_rotation_no_match():
    # cat((x2, -x1)) is not HF's rotate_half: neither q nor k may be fused (q alone neither)
    dtype = torch.bfloat16
    case = run_case(Attention(dtype, rotate=rotate_half_wrong), _inputs(dtype), FUSION, baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


def test_dynamic_symbolic_eps_no_match_no_crash():
    # torch.compile(dynamic=True) lifts the norms' eps (a module float) into a graph input
    graph_match.SYMBOLIC_EPS_SEEN[0] = False
    dtype = torch.float32
    case = run_case(Attention(dtype), _inputs(dtype), FUSION, dynamic=True, baseline=False)
    assert graph_match.SYMBOLIC_EPS_SEEN[0]
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()

"""Unit tests of the recognisers in ``gemma4_passes.passes.graph_match`` on real post-grad graphs.

Each graph comes from :func:`capture_graph` (the graph the passes would see, compilation cut
short right after it), so the tests exercise exactly the ATen spelling Inductor produces.
"""

import pytest
import torch

from gemma4_passes.passes.graph_match import is_closed, match_rmsnorm, rmsnorm_consumers

from .conftest import DT_IDS, act, aten, capture_graph, rms_gemma3, rms_hf, rms_sgl, weight

HIDDEN = 48
SHAPE = (2, 3, HIDDEN)


def _graph(fn, *args):
    g = capture_graph(fn, args)
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    assert len(inputs) == len(args)
    for ph, a in zip(inputs, args):  # placeholders follow the arguments
        assert tuple(ph.meta["val"].shape) == tuple(a.shape) and ph.meta["val"].dtype == a.dtype
    (out,) = [n for n in g.nodes if n.op == "output"]
    outs = out.args[0]
    return g, inputs, list(outs) if isinstance(outs, (tuple, list)) else [outs]


def _inner(norm):
    """The ``xf * inv`` node of a norm (its fp32 normalised value before the weight)."""
    (y,) = [
        n for n in norm.nodes
        if n.target is aten.mul.Tensor
        and any(getattr(a, "target", None) in (aten.pow.Tensor_Scalar, aten.rsqrt.default) for a in n.args)
    ]
    return y


# ---------------------------------------------------------------------------------------------
# match_rmsnorm: accepted forms
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_IDS.get)
def test_hf_weighted(dtype):
    x, w = act(*SHAPE, dtype=dtype), weight(HIDDEN, dtype)
    g, (xn, wn), (out,) = _graph(lambda x, w: rms_hf(x, w, 1e-5), x, w)
    n = match_rmsnorm(out)
    assert n is not None
    assert n.input is xn and n.weight is wn and n.output is out
    assert n.eps == 1e-5 and n.io_dtype == dtype
    assert (n.upcast is not None) == (dtype != torch.float32)
    kinds = {m.target for m in n.nodes}
    assert {aten.mean.dim, aten.pow.Tensor_Scalar, aten.add.Tensor, aten.mul.Tensor} <= kinds
    assert xn not in n.nodes and wn not in n.nodes
    # every call in this graph is the norm's
    assert n.nodes == {m for m in g.nodes if m.op == "call_function"}
    assert match_rmsnorm(out, want_weight=True) is not None
    assert match_rmsnorm(out, want_weight=False) is None
    assert is_closed(n.nodes, [out])
    assert not is_closed(n.nodes, [])  # the output itself has a user outside (the graph output)


def test_hf_bf16_activations_fp32_weight():
    x, w = act(*SHAPE, dtype=torch.bfloat16), weight(HIDDEN, torch.float32)
    _, (xn, wn), (out,) = _graph(lambda x, w: rms_hf(x, w, 1e-6), x, w)
    n = match_rmsnorm(out)
    assert n is not None and n.weight is wn and n.input is xn and n.io_dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_hf_no_weight(dtype):
    x = act(*SHAPE, dtype=dtype)
    _, (xn,), (out,) = _graph(lambda x: rms_hf(x, None, 1e-6), x)
    n = match_rmsnorm(out)
    assert n is not None and n.weight is None and n.input is xn and n.eps == 1e-6 and n.io_dtype == dtype
    assert match_rmsnorm(out, want_weight=True) is None
    assert match_rmsnorm(out, want_weight=False) is not None
    assert [c.output for c in rmsnorm_consumers(xn)] == [out]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_sglang_forward_native(dtype):
    # rsqrt, and a bf16 weight multiplied uncast (promoted by the multiply)
    x, w = act(*SHAPE, dtype=dtype), weight(HIDDEN, torch.bfloat16)
    _, (xn, wn), (out,) = _graph(lambda x, w: rms_sgl(x, w, 1e-5), x, w)
    n = match_rmsnorm(out)
    assert n is not None and n.input is xn and n.weight is wn and n.eps == 1e-5 and n.io_dtype == dtype
    assert any(m.target is aten.rsqrt.default for m in n.nodes)
    assert [c.output for c in rmsnorm_consumers(xn)] == [out]


# ---------------------------------------------------------------------------------------------
# match_rmsnorm: near misses
# ---------------------------------------------------------------------------------------------


def _rms_variant(x, w, kind):
    h = x.float()
    if kind == "mean_over_dim_1":
        ms = h.pow(2).mean(1, keepdim=True)
    elif kind == "no_keepdim":
        ms = h.pow(2).mean(-1)[..., None]
    elif kind == "cube":
        ms = h.pow(3).mean(-1, keepdim=True)
    else:
        ms = h.pow(2).mean(-1, keepdim=True)
    p = -0.25 if kind == "exponent_minus_quarter" else -0.5
    y = h * torch.pow(ms + 1e-6, p)
    y = y * w.float()
    if kind == "cast_to_other_dtype":
        return y.to(torch.float16)
    return y.type_as(x)


NEAR_MISSES = ["mean_over_dim_1", "no_keepdim", "cube", "exponent_minus_quarter", "cast_to_other_dtype", "gemma3"]


@pytest.mark.parametrize("kind", NEAR_MISSES)
def test_near_misses(kind):
    x, w = act(*SHAPE, dtype=torch.bfloat16), weight(HIDDEN, torch.bfloat16)
    if kind == "gemma3":
        fn = lambda x, w: rms_gemma3(x, w, 1e-6)  # noqa: E731
    else:
        fn = lambda x, w: _rms_variant(x, w, kind)  # noqa: E731
    _, (xn, _), (out,) = _graph(fn, x, w)
    assert match_rmsnorm(out) is None
    assert rmsnorm_consumers(xn) == []


def test_gemma3_fp32_no_weighted_norm():
    # In fp32 the inner ``x * rsqrt(...)`` of a Gemma-3 norm is a genuine weightless RMSNorm,
    # but the ``* (1 + w)`` on top of it is not a Gemma-4 weight.
    x, w = act(*SHAPE), weight(HIDDEN)
    _, (xn, _), (out,) = _graph(lambda x, w: rms_gemma3(x, w, 1e-6), x, w)
    assert match_rmsnorm(out) is None
    assert all(n.weight is None for n in rmsnorm_consumers(xn))


# ---------------------------------------------------------------------------------------------
# rmsnorm_consumers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_consumers_several_norms(dtype):
    # one residual read by two weighted norms with different eps and a weightless one (an MoE
    # layer's pre-FF norms and router norm)
    x, w1, w2 = act(*SHAPE, dtype=dtype), weight(HIDDEN, dtype), weight(HIDDEN, dtype)
    fn = lambda x, w1, w2: (rms_hf(x, w1, 1e-6), rms_hf(x, w2, 1e-5), rms_hf(x, None, 1e-4))  # noqa: E731
    _, (xn, w1n, w2n), outs = _graph(fn, x, w1, w2)
    found = {n.output: n for n in rmsnorm_consumers(xn)}
    assert set(found) == set(outs)
    assert [(found[o].weight, found[o].eps) for o in outs] == [(w1n, 1e-6), (w2n, 1e-5), (None, 1e-4)]


@pytest.mark.parametrize("form", ["hf", "sglang"])
def test_consumers_fp32_inner_mul_is_not_a_norm(form):
    # fp32: a weighted norm's ``x * inv`` is itself a weightless norm's output; read only by the
    # weight multiply, it is part of the weighted norm, not a norm of its own
    x, w = act(*SHAPE), weight(HIDDEN)
    norm = rms_hf if form == "hf" else rms_sgl
    _, (xn, wn), (out,) = _graph(lambda x, w: norm(x, w, 1e-6), x, w)
    (n,) = rmsnorm_consumers(xn)
    assert n.output is out and n.weight is wn
    inner = match_rmsnorm(_inner(n))
    assert inner is not None and inner.weight is None and inner.output in n.nodes


def test_consumers_fp32_inner_mul_with_outside_user_counts():
    # the same ``x * inv`` also returned: now it is a weightless norm in its own right
    def fn(x, w):
        y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        return y * w, y

    x, w = act(*SHAPE), weight(HIDDEN)
    _, (xn, wn), (out, y) = _graph(fn, x, w)
    found = {n.output: n for n in rmsnorm_consumers(xn)}
    assert set(found) == {out, y}
    assert found[out].weight is wn and found[y].weight is None


def test_consumers_none():
    x = act(*SHAPE, dtype=torch.bfloat16)
    _, (xn,), _ = _graph(lambda x: (x.float() * 2.0).softmax(-1).type_as(x), x)
    assert rmsnorm_consumers(xn) == []


# ---------------------------------------------------------------------------------------------
# is_closed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_is_closed_with_outside_user(dtype):
    # the variance is also returned: the norm is still recognised (recognisers do not check
    # privacy), but it is not closed, so no fusion may take it
    def fn(x, w):
        h = x.float()
        var = h.pow(2).mean(-1, keepdim=True)
        y = h * torch.pow(var + 1e-6, -0.5)
        return (y * w.float()).type_as(x), var

    x, w = act(*SHAPE, dtype=dtype), weight(HIDDEN, dtype)
    _, _, (out, var) = _graph(fn, x, w)
    n = match_rmsnorm(out)
    assert n is not None and var in n.nodes
    assert not is_closed(n.nodes, [out])
    assert is_closed(n.nodes, [out, var])

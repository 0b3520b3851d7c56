"""post_attn_norm: ``r = residual + rms(attn, w1); out = rms(r, w2)`` -> one rmsnorm_add_rmsnorm."""

import pytest
import torch

from gemma4_passes.passes import graph_match

from .conftest import (
    DT_IDS,
    FP32_REL_TOL,
    ToyDecoder,
    act,
    aten,
    g4,
    rms_gemma3,
    rms_hf,
    rms_sgl,
    run_case,
    sgl_fused_add_rms,
    weight,
)

FUSION = "post_attn_norm"
B, S, HIDDEN = 2, 5, 72

# every aten op of one HF-form post_attn site (two norms + the residual add), all replaced
HF_SITE = {aten.mean.dim: None, aten.pow.Tensor_Scalar: None, aten.add.Tensor: None, aten.mul.Tensor: None}


def post_attn_hf(attn, residual, w1, w2, eps1, eps2):
    r = residual + rms_hf(attn, w1, eps1)
    return rms_hf(r, w2, eps2), r


def post_attn_hf_swapped(attn, residual, w1, w2, eps1, eps2):
    r = rms_hf(attn, w1, eps1) + residual
    return rms_hf(r, w2, eps2), r


def post_attn_sgl(attn, residual, w1, w2, eps1, eps2):
    h = rms_sgl(attn, w1, eps1)
    r = h + residual
    return rms_sgl(r, w2, eps2), r


def _args(dtype, w_dtype=None, scale=1.0, eps=(1e-6, 1e-6)):
    w_dtype = w_dtype or dtype
    return (
        act(B, S, HIDDEN, dtype=dtype, scale=scale),
        act(B, S, HIDDEN, dtype=dtype, scale=scale),
        weight(HIDDEN, w_dtype),
        weight(HIDDEN, w_dtype),
        *eps,
    )


def _assert_fused_site(case, n=1):
    case.assert_only(n)
    case.assert_replaced(HF_SITE, {g4.rmsnorm_add_rmsnorm.default: n})


@pytest.mark.parametrize(
    "dtype,order",
    [
        pytest.param(torch.bfloat16, "residual+h", id="bf16-residual+h"),
        pytest.param(torch.bfloat16, "h+residual", id="bf16-h+residual"),
        pytest.param(torch.float16, "residual+h", id="fp16-residual+h"),
        pytest.param(torch.float32, "residual+h", id="fp32-residual+h"),
        pytest.param(torch.float32, "h+residual", id="fp32-h+residual"),
    ],
)
def test_hf_form(dtype, order):
    fn = post_attn_hf if order == "residual+h" else post_attn_hf_swapped
    case = run_case(fn, _args(dtype, eps=(1e-5, 1e-5)), FUSION)
    _assert_fused_site(case)
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.rmsnorm_add_rmsnorm.default]
    assert node.args[-2:] == (1e-5, 1e-5)
    case.assert_parity()


def test_hf_form_bf16_activations_fp32_weights():
    case = run_case(post_attn_hf, _args(torch.bfloat16, w_dtype=torch.float32), FUSION)
    _assert_fused_site(case)
    case.assert_parity()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
def test_sglang_forward_native_form(dtype):
    # rsqrt instead of pow(-0.5); uncast weight promoted by the multiply; bf16 residual add
    case = run_case(post_attn_sgl, _args(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced(
        {aten.mean.dim: None, aten.rsqrt.default: None, aten.pow.Tensor_Scalar: None, aten.add.Tensor: None},
        {g4.rmsnorm_add_rmsnorm.default: 1},
    )
    case.assert_parity()


def post_attn_sgl_fused_residual(attn, residual, w1, w2, eps1, eps2):
    h = rms_sgl(attn, w1, eps1)
    out, r = sgl_fused_add_rms(h, residual, w2, eps2)
    return out, r


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_IDS.get)
def test_sglang_fp32_residual_add_form(dtype):
    # SGLang's RMSNorm.forward_native(h, residual): the add runs on fp32 upcasts, the residual is
    # rounded for the stream, and the next norm reads the UNROUNDED fp32 sum
    case = run_case(post_attn_sgl_fused_residual, _args(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced(
        {aten.mean.dim: None, aten.rsqrt.default: None, aten.add.Tensor: None},
        {g4.rmsnorm_add_rmsnorm.default: 1},
    )
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.rmsnorm_add_rmsnorm.default]
    assert node.args[3] is None and node.args[-1] is True  # no scalar; unrounded_sum
    case.assert_parity()


def test_sglang_fp32_residual_add_form_uses_unrounded_sum():
    # the rewrite picks the unrounded-sum kernel: its normed output equals SGLang's eager bit for
    # bit on CPU, while the rounded-sum variant differs (the flag has teeth)
    args = _args(torch.bfloat16)
    case = run_case(post_attn_sgl_fused_residual, args, FUSION)
    eager_normed, eager_res = case.eager
    got_normed, got_res = case.after.out
    assert torch.equal(got_res, eager_res)
    attn, residual, w1, w2, e1, e2 = args
    rounded = g4.rmsnorm_add_rmsnorm(attn, residual, w1, None, w2, e1, e2, False)[0]
    assert not torch.equal(rounded, eager_normed)
    assert (got_normed.float() - eager_normed.float()).abs().max() <= (
        (rounded.float() - eager_normed.float()).abs().max()
    )


def post_attn_sgl_norm_of_residual(attn, residual, w1, w2, eps1, eps2):
    # near miss: the second norm reads the OLD residual's upcast, not the fp32 sum
    h = rms_sgl(attn, w1, eps1)
    s = h.float() + residual.float()
    return rms_sgl(residual.float(), w2, eps2).to(attn.dtype), s.to(attn.dtype)


def post_attn_sgl_sum_leaks(attn, residual, w1, w2, eps1, eps2):
    # near miss: the unrounded fp32 sum is itself an output (a user outside the pattern)
    h = rms_sgl(attn, w1, eps1)
    s = h.float() + residual.float()
    return rms_sgl(s, w2, eps2).to(attn.dtype), s.to(attn.dtype), (s * 2).to(attn.dtype)


@pytest.mark.parametrize("fn", [post_attn_sgl_norm_of_residual, post_attn_sgl_sum_leaks], ids=lambda f: f.__name__)
def test_sglang_fp32_residual_near_misses(fn):
    case = run_case(fn, _args(torch.bfloat16), FUSION)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


def _small_args(dtype, eps1, eps2):
    # attn, residual and w1 small: mean(x^2) of both norms' inputs is comparable to eps
    attn, residual, w1, w2, _, _ = _args(dtype, scale=3e-3)
    return attn, residual, (w1.float() * 3e-3).to(dtype), w2, eps1, eps2


def test_different_eps_each_read_from_graph():
    # activations small enough that eps matters: a swapped or assumed eps is visible in the output
    eps1, eps2 = 1e-6, 1e-5
    args = _small_args(torch.float32, eps1, eps2)
    case = run_case(post_attn_hf, args, FUSION)
    _assert_fused_site(case)
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.rmsnorm_add_rmsnorm.default]
    assert node.args[-2:] == (eps1, eps2)
    case.assert_parity()
    # the check has teeth: the same math with the eps swapped, or both assumed 1e-6, is off by far
    # more than the fp32 tolerance
    ref = case.eager[0]
    for e1, e2 in ((eps2, eps1), (1e-6, 1e-6)):
        other = post_attn_hf(*args[:4], e1, e2)[0]
        assert (other - ref).abs().max() > 10 * FP32_REL_TOL * ref.abs().max()


def test_different_eps_bf16():
    case = run_case(post_attn_hf, _small_args(torch.bfloat16, 1e-6, 1e-5), FUSION)
    _assert_fused_site(case)
    case.assert_parity()


def test_two_layers_two_matches():
    # fp32: every weighted norm's inner x*inv is also a weightless norm's output (see graph_match)
    dtype = torch.float32
    model = ToyDecoder(HIDDEN, dtype, 1e-6)
    case = run_case(model, (act(B, S, HIDDEN, dtype=dtype),), FUSION)
    case.assert_only(2)
    # 8 norms; each match absorbs the post-attn and the pre-FF norm
    assert case.removed(aten.mean.dim) == (8, 4)
    assert case.after.count(g4.rmsnorm_add_rmsnorm.default) == 2
    case.assert_parity()


# ---------------------------------------------------------------------------------------------
# near misses: no match, graph unchanged, output still eager's
# ---------------------------------------------------------------------------------------------


def post_attn_gemma3(attn, residual, w1, w2, eps1, eps2):
    r = residual + rms_gemma3(attn, w1, eps1)
    return rms_gemma3(r, w2, eps2), r


def post_attn_residual_then_norm(attn, residual, w1, w2, eps1, eps2):
    r = residual + attn
    return rms_hf(r, w2, eps2), r


def _rms_dim1(x, w, eps):
    h = x.float()
    y = h * torch.pow(h.pow(2).mean(1, keepdim=True) + eps, -0.5)
    return (y * w.float()[None, None, :]).type_as(x)


def post_attn_other_dim(attn, residual, w1, w2, eps1, eps2):
    r = residual + _rms_dim1(attn, w1, eps1)
    return _rms_dim1(r, w2, eps2), r


def _rms_no_keepdim(x, w, eps):
    h = x.float()
    y = h * torch.pow(h.pow(2).mean(-1) + eps, -0.5)[..., None]
    return (y * w.float()).type_as(x)


def post_attn_no_keepdim(attn, residual, w1, w2, eps1, eps2):
    r = residual + _rms_no_keepdim(attn, w1, eps1)
    return _rms_no_keepdim(r, w2, eps2), r


def _rms_quarter(x, w, eps):
    h = x.float()
    y = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.25)
    return (y * w.float()).type_as(x)


def post_attn_quarter(attn, residual, w1, w2, eps1, eps2):
    r = residual + _rms_quarter(attn, w1, eps1)
    return _rms_quarter(r, w2, eps2), r


def post_attn_extra_user(attn, residual, w1, w2, eps1, eps2):
    h = rms_hf(attn, w1, eps1)  # the normed attention output is also returned: not private
    r = residual + h
    return rms_hf(r, w2, eps2), r, h


NEGATIVES = {
    "gemma3_one_plus_w": post_attn_gemma3,
    "residual_then_norm": post_attn_residual_then_norm,
    "mean_over_other_dim": post_attn_other_dim,
    "mean_without_keepdim": post_attn_no_keepdim,
    "exponent_minus_quarter": post_attn_quarter,
    "normed_attn_has_outside_user": post_attn_extra_user,
}


@pytest.mark.parametrize("name", list(NEGATIVES))
def test_near_misses_do_not_match(name):
    case = run_case(NEGATIVES[name], _args(torch.bfloat16, eps=(1e-6, 1e-5)), FUSION, baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


class _PostAttnModule(torch.nn.Module):
    def __init__(self, hidden, dtype, eps):
        super().__init__()
        self.eps = eps
        self.w1 = torch.nn.Parameter(weight(hidden, dtype), requires_grad=False)
        self.w2 = torch.nn.Parameter(weight(hidden, dtype), requires_grad=False)

    def forward(self, attn, residual):
        r = residual + rms_hf(attn, self.w1, self.eps)
        return rms_hf(r, self.w2, self.eps), r


@pytest.mark.parametrize("where", ["argument", "module_attribute"])
def test_dynamic_symbolic_eps_no_match_no_crash(where):
    graph_match.SYMBOLIC_EPS_SEEN[0] = False
    dtype = torch.float32
    if where == "argument":
        fn, args = post_attn_hf, _args(dtype, eps=(1e-5, 1e-5))
    else:
        fn, args = _PostAttnModule(HIDDEN, dtype, 1e-5), _args(dtype)[:2]
    case = run_case(fn, args, FUSION, dynamic=True, baseline=False)
    # the test is about a lifted eps: make sure it really is a graph input here (no literal
    # 1e-5 left in the graph; the recogniser saw a norm whose eps is a node)
    literals = [a for n in case.before.graph.nodes if n.op == "call_function" for a in n.args if isinstance(a, float)]
    assert 1e-5 not in literals, literals
    assert case.before.count(aten.mean.dim) == 2
    assert graph_match.SYMBOLIC_EPS_SEEN[0]
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


def test_left_to_inductor_where_it_measured_faster():
    # 31B-wide rows (> 4096) at 256-2047 rows: Inductor's own fusion is faster there (H100), so the
    # site stays unfused; 128 rows of the same width still fuse
    from gemma4_passes.kernels.norm_residual import prefer_inductor

    assert prefer_inductor(512, 5376) and not prefer_inductor(128, 5376) and not prefer_inductor(512, 2816)
    assert not prefer_inductor(2048, 5376)
    # the expected-match table knows it (31B: hidden 5376, 60 layers)
    from gemma4_passes.expected import expected_matches

    assert expected_matches("31b", rows=512)["post_attn_norm"] == 0
    assert expected_matches("31b", rows=512)["qkv_norm"] == 60
    assert expected_matches("31b", rows=8)["post_attn_norm"] == expected_matches("31b")["post_attn_norm"] == 60
    n = 4104
    mk = lambda rows: (act(1, rows, n, dtype=torch.float32), act(1, rows, n, dtype=torch.float32),  # noqa: E731
                       weight(n), weight(n), 1e-6, 1e-6)
    case = run_case(post_attn_hf, mk(256), FUSION)
    case.assert_only(0)
    case = run_case(post_attn_hf, mk(8), FUSION)
    case.assert_only(1)
    case.assert_parity()

"""ffn_tail and ple_tail: ``x = (residual + rms(h, w)) * layer_scalar [; out = rms(x, w_next)]``.

Same math, told apart by the residual: the FFN tail adds the post-attention residual (which
the pre-feedforward norm also reads), the PLE tail adds the FFN tail's result (read only by
the PLE gate GEMM and this add). Both graph shapes are modelled by a toy each.
"""

import pytest
import torch

import gemma4_passes
import torch.nn.functional as F

from .conftest import ToyDecoder, act, aten, compile_run, eager, g4, rms_hf, run_case, weight

B, S, HIDDEN, INTER, PLE_DIM, LAYERS = 2, 5, 72, 200, 24, 3


def _param(t):
    return torch.nn.Parameter(t, requires_grad=False)


class FfnLayer(torch.nn.Module):
    """The FFN half of a decoder layer, from the post-attention residual to the next layer's
    input norm: pre-FF norm -> MLP -> post-FF norm -> + residual -> * layer_scalar -> next norm."""

    def __init__(self, dtype, scalar_dtype=None, *, next_norm=True, inplace=False, scalar_shape=(1,),
                 use_scalar=True, eps=1e-6):
        super().__init__()
        self.eps, self.next_norm, self.inplace, self.use_scalar = eps, next_norm, inplace, use_scalar
        self.pre_ff = _param(weight(HIDDEN, dtype))
        self.post_ff = _param(weight(HIDDEN, dtype))
        self.next_w = _param(weight(HIDDEN, dtype))
        self.up = torch.nn.Linear(HIDDEN, INTER, bias=False, dtype=dtype)
        self.down = torch.nn.Linear(INTER, HIDDEN, bias=False, dtype=dtype)
        scalar = 0.5 + torch.rand(scalar_shape)
        self.register_buffer("layer_scalar", scalar.to(scalar_dtype or dtype))

    def forward(self, residual):
        h = rms_hf(residual, self.pre_ff, self.eps)
        h = self.down(self.up(h))  # the MLP (its gelu is ple_gate's business, left out)
        h = rms_hf(h, self.post_ff, self.eps)
        x = residual + h
        if self.use_scalar:
            if self.inplace:
                x *= self.layer_scalar
            else:
                x = x * self.layer_scalar
        if not self.next_norm:
            return x
        return rms_hf(x, self.next_w, self.eps), x


class PleBlock(torch.nn.Module):
    """The PLE tail of an E2B/E4B layer: gate GEMM -> gelu_tanh * per-layer input -> projection
    -> post-PLE norm -> + residual -> * layer_scalar -> next layer's input norm."""

    def __init__(self, dtype, scalar_dtype=None, *, next_norm=True, eps=1e-6, layer=1):
        super().__init__()
        self.eps, self.next_norm, self.layer = eps, next_norm, layer
        self.gate = torch.nn.Linear(HIDDEN, PLE_DIM, bias=False, dtype=dtype)
        self.proj = torch.nn.Linear(PLE_DIM, HIDDEN, bias=False, dtype=dtype)
        self.post_ple = _param(weight(HIDDEN, dtype))
        self.next_w = _param(weight(HIDDEN, dtype))
        self.register_buffer("layer_scalar", (0.5 + torch.rand(1)).to(scalar_dtype or dtype))

    def forward(self, x, per_layer_inputs):
        residual = x
        g = F.gelu(self.gate(x), approximate="tanh") * per_layer_inputs[:, :, self.layer, :]
        g = rms_hf(self.proj(g), self.post_ple, self.eps)
        x = residual + g
        x = x * self.layer_scalar
        if not self.next_norm:
            return x
        return rms_hf(x, self.next_w, self.eps), x


def _ffn_input(dtype):
    return (act(B, S, HIDDEN, dtype=dtype),)


def _ple_input(dtype):
    return act(B, S, HIDDEN, dtype=dtype), act(B, S, LAYERS, PLE_DIM, dtype=dtype)


# (activation dtype, layer_scalar dtype, in-place ``x *= scalar``)
SCALAR_FORMS = [
    pytest.param(torch.bfloat16, torch.bfloat16, False, id="bf16-scalar_bf16"),
    pytest.param(torch.bfloat16, torch.float32, True, id="bf16-scalar_fp32-inplace"),
    pytest.param(torch.float32, torch.float32, False, id="fp32-scalar_fp32"),
]


def _scalar_muls(graph):
    """``x * layer_scalar`` nodes: a multiply with a one-element graph input."""
    def one_element_input(a):
        if not isinstance(a, torch.fx.Node) or a.op not in ("placeholder", "get_attr"):
            return False
        v = a.meta.get("val")
        return isinstance(v, torch.Tensor) and v.numel() == 1

    return sum(
        1 for n in graph.nodes if n.target is aten.mul.Tensor and any(one_element_input(a) for a in n.args)
    )


def _assert_tail(case, next_norm, total_norms):
    """One match: the tail's norm (and the next norm) gone, the remaining norms untouched."""
    case.assert_only(1)
    fused = g4.rmsnorm_add_rmsnorm.default if next_norm else g4.rmsnorm_add.default
    other = g4.rmsnorm_add.default if next_norm else g4.rmsnorm_add_rmsnorm.default
    absorbed = 2 if next_norm else 1
    assert case.removed(aten.mean.dim) == (total_norms, total_norms - absorbed)
    # each absorbed norm's eps add, plus the residual add
    b, a = case.removed(aten.add.Tensor)
    assert b - a == absorbed + 1, (b, a)
    # the multiply by the one-element layer_scalar buffer
    assert (_scalar_muls(case.before.graph), _scalar_muls(case.after.graph)) == (1, 0)
    assert case.before.count(fused) == 0 and case.after.count(fused) == 1
    assert case.after.count(other) == 0
    # the residual add and the scalar multiply are inside the op: the graph output comes from it
    (node,) = [n for n in case.after.graph.nodes if n.target is fused]
    scalar = node.args[3]
    assert scalar is not None and tuple(scalar.meta["val"].shape) == (1,)
    eps = node.args[-2:] if next_norm else node.args[-1:]
    assert all(e == 1e-6 for e in eps)


@pytest.mark.parametrize("dtype,scalar_dtype,inplace", SCALAR_FORMS)
def test_ffn_tail_with_next_norm(dtype, scalar_dtype, inplace):
    model = FfnLayer(dtype, scalar_dtype, inplace=inplace)
    case = run_case(model, _ffn_input(dtype), "ffn_tail")
    _assert_tail(case, next_norm=True, total_norms=3)  # the pre-FF norm is not part of it
    case.assert_parity()


@pytest.mark.parametrize("dtype,scalar_dtype,inplace", [SCALAR_FORMS[1], SCALAR_FORMS[2]])
def test_ffn_tail_without_next_norm(dtype, scalar_dtype, inplace):
    # the last layer's tail when the final norm is outside the graph
    model = FfnLayer(dtype, scalar_dtype, inplace=inplace, next_norm=False)
    case = run_case(model, _ffn_input(dtype), "ffn_tail")
    _assert_tail(case, next_norm=False, total_norms=2)
    case.assert_parity()


@pytest.mark.parametrize(
    "dtype,scalar_dtype,next_norm",
    [
        pytest.param(torch.bfloat16, torch.bfloat16, True, id="bf16-next_norm"),
        pytest.param(torch.float32, torch.float32, True, id="fp32-next_norm"),
        pytest.param(torch.float32, torch.float32, False, id="fp32-no_next_norm"),
    ],
)
def test_ple_tail(dtype, scalar_dtype, next_norm):
    model = PleBlock(dtype, scalar_dtype, next_norm=next_norm)
    case = run_case(model, _ple_input(dtype), "ple_tail")
    _assert_tail(case, next_norm=next_norm, total_norms=2 if next_norm else 1)
    case.assert_parity()


def test_ple_tail_bf16_activations_fp32_scalar():
    model = PleBlock(torch.bfloat16, torch.float32)

    def fn(x, pli):  # the in-place form HF uses: ``hidden_states *= self.layer_scalar``
        residual = x
        g = F.gelu(model.gate(x), approximate="tanh") * pli[:, :, 1, :]
        x = residual + rms_hf(model.proj(g), model.post_ple, model.eps)
        x *= model.layer_scalar
        return rms_hf(x, model.next_w, model.eps), x

    case = run_case(fn, _ple_input(torch.bfloat16), "ple_tail")
    _assert_tail(case, next_norm=True, total_norms=2)
    case.assert_parity()


# ---------------------------------------------------------------------------------------------
# classification: each tail matches only its own graph shape
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("toy,fusion", [("ffn_layer", "ple_tail"), ("ple_block", "ffn_tail")])
def test_tail_classification(toy, fusion):
    dtype = torch.bfloat16
    if toy == "ffn_layer":  # residual also feeds the pre-FF norm: an FFN tail, never a PLE tail
        fn, args = FfnLayer(dtype), _ffn_input(dtype)
    else:  # residual feeds only the gate GEMM and the add: a PLE tail, never an FFN tail
        fn, args = PleBlock(dtype), _ple_input(dtype)
    case = run_case(fn, args, fusion, baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


class FullLayer(torch.nn.Module):
    """A whole toy decoder layer after attention: post-attention norm + residual, the FFN, and
    (``ple``) the PLE tail. Gemma-4 scales by layer_scalar once, at the end of the layer: after
    the FFN tail in layers without PLE, after the PLE tail in E2B/E4B layers."""

    def __init__(self, dtype, ple, eps=1e-6):
        super().__init__()
        self.eps, self.use_ple = eps, ple
        self.attn = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=dtype)
        self.w_in, self.w_post_attn = _param(weight(HIDDEN, dtype)), _param(weight(HIDDEN, dtype))
        self.ffn = FfnLayer(dtype, next_norm=not ple, use_scalar=not ple, eps=eps)
        self.ple = PleBlock(dtype, next_norm=True, eps=eps)

    def forward(self, x, per_layer_inputs):
        residual = x
        h = self.attn(rms_hf(x, self.w_in, self.eps))
        x = residual + rms_hf(h, self.w_post_attn, self.eps)
        x = self.ffn(x)
        return self.ple(x, per_layer_inputs) if self.use_ple else x


@pytest.mark.parametrize("ple", [False, True], ids=["dense_layer", "ple_layer"])
def test_full_layer_each_tail_at_its_site(ple):
    # post_attn_norm runs first: the FFN tail's residual is then that fusion's output (a getitem
    # of rmsnorm_add_rmsnorm, the pre-FF norm absorbed) and must still count as a
    # post-attention residual.
    dtype = torch.float32
    model = FullLayer(dtype, ple)
    args = _ple_input(dtype)
    ref = eager(model, args)
    run = compile_run(model, args, ["post_attn_norm", "ffn_tail", "ple_tail"])
    expected = dict.fromkeys(gemma4_passes.available_fusions(), 0)
    expected.update(post_attn_norm=1, ffn_tail=int(not ple), ple_tail=int(ple))
    assert run.matches == expected
    assert run.count(g4.rmsnorm_add_rmsnorm.default) == 2
    # left: the input norm, and in a PLE layer the post-FF norm (its add is not scaled: no tail)
    assert run.count(aten.mean.dim) == (2 if ple else 1)
    for o, r in zip(run.out, ref):
        assert (o - r).abs().max() <= 1e-5 * r.abs().max()


def test_two_layers_count():
    # layer 0's tail has a next norm (layer 1's input norm), layer 1's tail has none
    dtype = torch.float32
    case = run_case(ToyDecoder(HIDDEN, dtype, 1e-6), (act(B, S, HIDDEN, dtype=dtype),), "ffn_tail")
    case.assert_only(2)
    assert case.removed(aten.mean.dim) == (8, 5)
    assert case.after.count(g4.rmsnorm_add_rmsnorm.default) == 1
    assert case.after.count(g4.rmsnorm_add.default) == 1
    case.assert_parity()


def test_two_layers_with_post_attn_norm():
    # all norm epilogues together: only layer 0's input norm is left
    dtype = torch.float32
    model, args = ToyDecoder(HIDDEN, dtype, 1e-6), (act(B, S, HIDDEN, dtype=dtype),)
    ref = eager(model, args)
    run = compile_run(model, args, ["post_attn_norm", "ffn_tail", "ple_tail"])
    expected = dict.fromkeys(gemma4_passes.available_fusions(), 0)
    expected.update(post_attn_norm=2, ffn_tail=2)
    assert run.matches == expected
    assert run.count(aten.mean.dim) == 1
    assert (run.out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# near misses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["no_scalar", "vector_scalar"])
def test_ffn_tail_needs_one_element_scalar(variant):
    dtype = torch.bfloat16
    if variant == "no_scalar":  # a tail without ``* layer_scalar``
        model = FfnLayer(dtype, use_scalar=False)
    else:  # a full [hidden] vector is not a layer scalar
        model = FfnLayer(dtype, scalar_shape=(HIDDEN,))
    case = run_case(model, _ffn_input(dtype), "ffn_tail", baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


def test_ple_tail_vector_scalar_no_match():
    dtype = torch.bfloat16
    model = PleBlock(dtype)
    model.layer_scalar = 0.5 + torch.rand(HIDDEN).to(dtype)
    case = run_case(model, _ple_input(dtype), "ple_tail", baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()

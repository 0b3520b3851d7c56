"""ple_gate: ``F.gelu(per_layer_input_gate(x), approximate="tanh") * per_layer_inputs[:, :, i, :]``.

Matches the PLE gate only; the MLP's ``gelu(gate(x)) * up(x)`` (two projections) must stay
Inductor's.
"""

import pytest
import torch
import torch.nn.functional as F

from .conftest import DT_IDS, act, aten, g4, run_case

FUSION = "ple_gate"
B, S, HIDDEN, PLE_DIM, INTER, LAYERS = 2, 5, 72, 24, 200, 3


class PleGate(torch.nn.Module):
    """One layer's PLE gate and projection (norm and residual left out: not this fusion's)."""

    def __init__(self, dtype, layer=1, approximate="tanh"):
        super().__init__()
        self.layer, self.approximate = layer, approximate
        self.per_layer_input_gate = torch.nn.Linear(HIDDEN, PLE_DIM, bias=False, dtype=dtype)
        self.per_layer_projection = torch.nn.Linear(PLE_DIM, HIDDEN, bias=False, dtype=dtype)

    def forward(self, x, per_layer_inputs):
        g = F.gelu(self.per_layer_input_gate(x), approximate=self.approximate)
        g = g * per_layer_inputs[:, :, self.layer, :]  # a strided slice of [B, S, L, D]
        return self.per_layer_projection(g)


class Mlp(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, INTER, bias=False, dtype=dtype)
        self.up_proj = torch.nn.Linear(HIDDEN, INTER, bias=False, dtype=dtype)
        self.down_proj = torch.nn.Linear(INTER, HIDDEN, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class TwoLayers(torch.nn.Module):
    """Two toy E2B layers: MLP (gelu_tanh(gate) * up, NOT a PLE gate) then the PLE gate."""

    def __init__(self, dtype):
        super().__init__()
        self.mlp = torch.nn.ModuleList([Mlp(dtype) for _ in range(2)])
        self.ple = torch.nn.ModuleList([PleGate(dtype, layer=i) for i in range(2)])

    def forward(self, x, per_layer_inputs):
        for i in range(2):
            x = x + self.mlp[i](x)
            x = x + self.ple[i](x, per_layer_inputs)
        return x


def _inputs(dtype):
    return act(B, S, HIDDEN, dtype=dtype), act(B, S, LAYERS, PLE_DIM, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_IDS.get)
def test_ple_gate(dtype):
    case = run_case(PleGate(dtype), _inputs(dtype), FUSION)
    case.assert_only(1)
    case.assert_replaced({aten.tanh.default: None}, {g4.gelu_tanh_mul.default: 1})
    (node,) = [n for n in case.after.graph.nodes if n.target is g4.gelu_tanh_mul.default]
    gate, other = (n.meta["val"] for n in node.args)
    assert tuple(gate.shape) == tuple(other.shape) == (B, S, PLE_DIM)
    assert not other.is_contiguous()  # the per-layer slice is passed as the strided view
    assert case.after.count(aten.mm.default) == 2
    case.assert_parity()


def test_two_layers_with_mlp():
    # fp32 (one compile); the bf16 spelling of both gelus is covered by test_ple_gate[bf16] and
    # test_mlp_gate_times_up_no_match
    dtype = torch.float32
    case = run_case(TwoLayers(dtype), _inputs(dtype), FUSION)
    case.assert_only(2)
    # 4 gelus, the 2 MLP ones stay
    assert case.removed(aten.tanh.default) == (4, 2)
    assert case.after.count(g4.gelu_tanh_mul.default) == 2
    case.assert_parity()


# ---------------------------------------------------------------------------------------------
# near misses
# ---------------------------------------------------------------------------------------------


def test_mlp_gate_times_up_no_match():
    dtype = torch.bfloat16
    case = run_case(Mlp(dtype), (act(B, S, HIDDEN, dtype=dtype),), FUSION, baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    assert case.after.count(aten.tanh.default) == 1
    case.assert_parity()


def test_exact_gelu_no_match():
    dtype = torch.bfloat16
    case = run_case(PleGate(dtype, approximate="none"), _inputs(dtype), FUSION, baseline=False)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()

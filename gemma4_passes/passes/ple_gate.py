"""The per-layer-embedding gate of E2B/E4B: ``gelu_tanh(per_layer_input_gate(x)) * per_layer_input``.

In the post-grad graph ``gelu(approximate="tanh")`` is decomposed into
``0.5*x*(1+tanh(0.7978845608028654*(x+0.044715*x^3)))`` on the fp32 upcast of
the gate, cast back to the activation dtype, then multiplied with the layer's
slice of the per-layer inputs (a strided view). Both forms (decomposed and a
surviving ``aten.gelu``) are matched; constants must be exactly torch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op
from .graph_match import binary_operands, dtype_of, is_cast_to, is_closed, is_op, strip_upcast, val

aten = torch.ops.aten

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # 0.7978845608028654, what torch's decomposition uses
GELU_CUBIC = 0.044715


def _const_mul(node, const) -> Node | None:
    """``other * const`` (either order), returning ``other``."""
    ops = binary_operands(node, aten.mul.Tensor)
    if ops is None:
        return None
    a, b = ops
    if isinstance(b, float) and b == const and isinstance(a, Node):
        return a
    if isinstance(a, float) and a == const and isinstance(b, Node):
        return b
    return None


def _match_decomposed_gelu(g: Node) -> tuple[Node, set] | None:
    """``g = (x*0.5) * (tanh((x + x*x*x*0.044715) * sqrt(2/pi)) + 1)``; returns (x, nodes)."""
    ops = binary_operands(g, aten.mul.Tensor)
    if ops is None:
        return None
    for half, one_plus in (ops, ops[::-1]):
        x = _const_mul(half, 0.5)
        if x is None:
            continue
        add1 = binary_operands(one_plus, aten.add.Tensor)
        if add1 is None or 1 not in add1 or not any(is_op(t, aten.tanh.default) for t in add1):
            continue
        tanh = next(t for t in add1 if is_op(t, aten.tanh.default))
        inner = _const_mul(tanh.args[0], SQRT_2_OVER_PI)
        s = binary_operands(inner, aten.add.Tensor) if inner is not None else None
        if s is None or x not in s:
            continue
        cubic = s[1] if s[0] is x else s[0]
        cube = _const_mul(cubic, GELU_CUBIC)
        sq = binary_operands(cube, aten.mul.Tensor) if cube is not None else None
        if sq is None or x not in sq:
            continue
        xx = sq[1] if sq[0] is x else sq[0]
        if binary_operands(xx, aten.mul.Tensor) != (x, x):
            continue
        return x, {g, half, one_plus, tanh, tanh.args[0], inner, cubic, cube, xx}
    return None


def match_gelu_tanh(out: Node) -> tuple[Node, set] | None:
    """``out`` = gelu_tanh(gate) in the gate's dtype; returns (gate, nodes)."""
    io = dtype_of(out)
    g, nodes = out, set()
    if io != torch.float32:
        if not is_cast_to(out, io):
            return None
        g, nodes = out.args[0], {out}
    if is_op(g, aten.gelu.default):
        if g.kwargs.get("approximate", g.args[1] if len(g.args) > 1 else "none") != "tanh":
            return None
        xf, found = g.args[0], {g}
    else:
        m = _match_decomposed_gelu(g)
        if m is None:
            return None
        xf, found = m
    gate, cast = strip_upcast(xf)
    if cast is not None:
        found.add(cast)
    if dtype_of(gate) != io or (cast is None and io != torch.float32 and not is_op(g, aten.gelu.default)):
        return None
    return gate, nodes | found


def is_per_layer_slice(node: Node, depth: int = 6) -> bool:
    """``node`` is (a view of) ``t.select(2, i)`` of a 4-D [B, S, layers, D] tensor."""
    n = node
    for _ in range(depth):
        if is_op(n, aten.select.int):
            src = val(n.args[0])
            return src is not None and src.dim() == 4 and n.args[1] in (2, -2)
        if is_op(n, aten.reshape.default, aten.view.default, aten.slice.Tensor, aten.clone.default):
            n = n.args[0]
            continue
        return False
    return False


@dataclass
class GateMatch:
    gate: Node
    other: Node
    out: Node
    nodes: set


class PleGate(FusionPass):
    name = "ple_gate"
    description = "gelu_tanh(per_layer_input_gate(x)) * per_layer_input in one kernel (E2B/E4B)"
    # Off by default: Inductor already fuses this pointwise pair into one kernel, and on H100 the
    # fused op measured 0.91-1.06x Inductor's time at T=1..8192 (benchmarks/RESULTS.md).
    default = False

    def find(self, graph: Graph) -> list[GateMatch]:
        found, taken = [], set()
        for node in graph.nodes:
            ops = binary_operands(node, aten.mul.Tensor)
            if ops is None:
                continue
            for g_out, other in (ops, ops[::-1]):
                m = match_gelu_tanh(g_out) if isinstance(g_out, Node) else None
                if m is None or not isinstance(other, Node):
                    continue
                gate, nodes = m
                ov, gv, nv = val(other), val(gate), val(node)
                if ov is None or ov.dtype != gv.dtype or tuple(ov.shape) != tuple(gv.shape):
                    continue
                if nv.dtype != gv.dtype or tuple(nv.shape) != tuple(gv.shape):
                    continue
                # The MLP's (and the experts') gelu(gate) * up multiplies two GEMM outputs; the
                # PLE gate multiplies by this layer's slice of the per-layer inputs
                # ``per_layer_inputs[:, :, i, :]``. Only the latter is this fusion.
                if not is_per_layer_slice(other):
                    continue
                nodes = nodes | {node}
                if nodes & taken or not is_closed(nodes, [node]):
                    continue
                taken |= nodes
                found.append(GateMatch(gate, other, node, nodes))
                break
        return found

    def rewrite(self, graph: Graph, m: GateMatch) -> None:
        ed = GraphEditor(graph)
        if not ed.hoist_before([m.gate, m.other], m.out):
            return
        (new,) = ed.call(m.out, fused_op("gelu_tanh_mul"), [m.gate, m.other])
        m.out.replace_all_uses_with(new)
        ed.erase_dead(m.nodes)

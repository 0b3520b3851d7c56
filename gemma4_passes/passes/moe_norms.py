"""The norms around a Gemma-4 MoE block (26B-A4B): both ends of the layer's FFN.

  moe_input_norms:     s = residual + rms(attn, w);  rms(s, w_pre), rms(s, w_pre2) and the
                       router input rms(s) * router.scale * hidden^-0.5 all read s
                       (one row variance, four outputs, one kernel)
  moe_branch_combine:  s = residual + rms(rms(h1, w1) + rms(h2, w2), w3) [* layer_scalar]
                       -> the next input norm (one kernel)

They run before ``post_attn_norm`` / ``ffn_tail``, which would otherwise take the same residual
adds (leaving the extra norms and the branch combine to Inductor).  In transformers the experts
and the router read ``residual.reshape(-1, H)``: norms are looked up through such reshapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fake_call, fused_op, log
from .graph_match import RmsNorm, binary_operands, is_closed, is_op, match_rmsnorm, rmsnorm_consumers, val
from .norm_residual import NormAdd, match_norm_add, match_scale, single_next_norm

aten = torch.ops.aten
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _flat_views(x: Node) -> list[Node]:
    """Reshapes of ``x`` that keep its last dim (``residual.reshape(-1, H)``)."""
    xv = val(x)
    out = []
    for u in x.users:
        uv = val(u)
        if is_op(u, *_RESHAPES) and uv is not None and uv.numel() == xv.numel() and uv.shape[-1] == xv.shape[-1]:
            out.append(u)
    return out


def _scalar_mul(node: Node) -> tuple[Node, float] | None:
    """``node``'s single user is ``node * c`` with a Python float ``c``: (mul node, c)."""
    if len(node.users) != 1:
        return None
    (mul,) = node.users
    ops = binary_operands(mul, aten.mul.Tensor)
    if ops is None:
        return None
    other = ops[1] if ops[0] is node else ops[0]
    if isinstance(other, bool) or not isinstance(other, (float, int)):
        return None
    if val(mul) is None or val(mul).dtype != val(node).dtype:
        return None
    return mul, float(other)


def _vector_mul(node: Node, io: torch.dtype) -> tuple[Node, Node] | None:
    """``node``'s single user is ``node * v`` with a 1-D io-dtype graph input ``v``: (mul, v)."""
    if len(node.users) != 1:
        return None
    (mul,) = node.users
    ops = binary_operands(mul, aten.mul.Tensor)
    if ops is None:
        return None
    vec = ops[1] if ops[0] is node else ops[0]
    vv, nv = val(vec), val(node)
    if vv is None or vv.dim() != 1 or vv.dtype != io or vv.shape[0] != nv.shape[-1]:
        return None
    if vec.op not in ("placeholder", "get_attr"):
        return None
    if val(mul).dtype != io or tuple(val(mul).shape) != tuple(nv.shape):
        return None
    return mul, vec


@dataclass
class RouterInput:
    """``rms(s) * scale * root``: the router's weightless norm, its scale vector and hidden^-0.5."""

    norm: RmsNorm
    scale: Node
    root: float
    out: Node
    nodes: set


def match_router_input(n: RmsNorm) -> RouterInput | None:
    """The router's input from one of the residual's norms, in either spelling:

    * bf16/fp16: a weightless norm (rounded), ``* scale`` (rounded), ``* root`` (rounded);
    * fp32: no roundings, so ``rms(s) * scale`` IS a weighted norm with ``scale`` as its weight.
    """
    if n.weight is None:
        vm = _vector_mul(n.output, n.io_dtype)
        if vm is None:
            return None
        mul_v, scale = vm
        sm = _scalar_mul(mul_v)
        if sm is None:
            return None
        return RouterInput(n, scale, sm[1], sm[0], set(n.nodes) | {mul_v, sm[0]})
    if n.io_dtype != torch.float32:
        return None
    sm = _scalar_mul(n.output)
    if sm is None or val(n.weight).dtype != torch.float32:
        return None
    return RouterInput(n, n.weight, sm[1], sm[0], set(n.nodes) | {sm[0]})


@dataclass
class InputNormsMatch:
    norm_add: NormAdd
    pre: RmsNorm
    pre2: RmsNorm
    router: RouterInput
    nodes: set

    @property
    def outputs(self) -> list[Node]:
        return [self.norm_add.add, self.pre.output, self.pre2.output, self.router.out]


class _ResidualSiteFusion(FusionPass):
    """Finds disjoint, closed matches grown from each ``residual + rms(x, w)`` add."""

    def _extend(self, na: NormAdd):
        raise NotImplementedError

    def find(self, graph: Graph) -> list:
        found, taken = [], set()
        for node in graph.nodes:
            na = match_norm_add(node)
            if na is None:
                continue
            m = self._extend(na)
            if m is None or m.nodes & taken:
                continue
            if not is_closed(m.nodes, m.outputs):
                log.debug("%s: %s has users outside the pattern", self.name, node)
                continue
            taken |= m.nodes
            found.append(m)
        return found


class MoeInputNorms(_ResidualSiteFusion):
    name = "moe_input_norms"
    description = ("MoE layer: residual + rms(attn) -> pre_ff, pre_ff_2 and router norms (shared variance), "
                   "one kernel")

    def _extend(self, na: NormAdd) -> InputNormsMatch | None:
        s = na.add
        norms = list(rmsnorm_consumers(s))
        views = _flat_views(s)
        for v in views:
            norms += rmsnorm_consumers(v)
        routers = [r for r in map(match_router_input, norms) if r is not None]
        if len(routers) != 1:
            return None
        router = routers[0]
        others = [n for n in norms if n is not router.norm and n.weight is not None]
        if len(others) != 2 or len(norms) != 3:
            return None
        pre, pre2 = others
        for n in (pre, pre2, router.norm):
            if n.io_dtype != na.norm.io_dtype:
                return None
        nodes = set(na.norm.nodes) | {na.add} | pre.nodes | pre2.nodes | router.nodes
        # the reshapes only the matched norms read go with the match
        inside = nodes | set(views)
        nodes |= {v for v in views if all(u in inside for u in v.users)}
        return InputNormsMatch(na, pre, pre2, router, nodes)

    def rewrite(self, graph: Graph, m: InputNormsMatch) -> None:
        ed = GraphEditor(graph)
        na, n1 = m.norm_add, m.norm_add.norm
        args = [n1.input, na.residual, n1.weight, m.pre.weight, m.pre2.weight, m.router.scale, m.router.root,
                n1.eps, m.pre.eps, m.pre2.eps, m.router.norm.eps]
        if not ed.precedes_all(args, na.add):
            log.debug("%s: inputs defined after %s, skipped", self.name, na.add)
            return
        outs = ed.call(na.add, fused_op("moe_input_norms"), args, n_outputs=4)
        for new, old in zip(outs, (na.add, m.pre.output, m.pre2.output, m.router.out)):
            old.replace_all_uses_with(_reshaped(graph, new, old))
        ed.erase_dead(m.nodes)


def _reshaped(graph: Graph, new: Node, like: Node) -> Node:
    """``new`` viewed with ``like``'s shape (the fused op's outputs are shaped like its input)."""
    shape = list(val(like).shape)
    if list(val(new).shape) == shape:
        return new
    with graph.inserting_after(new):
        view = graph.call_function(aten.view.default, (new, shape))
    view.meta["val"] = fake_call(aten.view.default, [new, shape])
    return view


@dataclass
class CombineMatch:
    norm_add: NormAdd
    branch1: RmsNorm
    branch2: RmsNorm
    combine: Node
    scale: object
    next_norm: RmsNorm | None
    nodes: set

    @property
    def residual_out(self) -> Node:
        return self.scale.out if self.scale else self.norm_add.add

    @property
    def outputs(self) -> list[Node]:
        return [self.residual_out] + ([self.next_norm.output] if self.next_norm else [])


class MoeBranchCombine(_ResidualSiteFusion):
    name = "moe_branch_combine"
    description = ("MoE layer: residual + rms(rms(h1) + rms(h2)) [* layer_scalar] -> next input norm, "
                   "one kernel")

    def _extend(self, na: NormAdd) -> CombineMatch | None:
        h = na.norm.input
        ops = binary_operands(h, aten.add.Tensor)
        if ops is None:
            return None
        b1, b2 = (match_rmsnorm(o, want_weight=True) if isinstance(o, Node) else None for o in ops)
        if b1 is None or b2 is None or b1.output is b2.output:
            return None
        io = na.norm.io_dtype
        if b1.io_dtype != io or b2.io_dtype != io or val(h).dtype != io:
            return None
        if tuple(val(b1.input).shape) != tuple(val(h).shape) or tuple(val(b2.input).shape) != tuple(val(h).shape):
            return None
        nodes = set(na.norm.nodes) | {na.add, h} | b1.nodes | b2.nodes
        scale = match_scale(na.add)
        tail = na.add
        if scale is not None:
            nodes |= scale.nodes
            tail = scale.out
        next_norm = single_next_norm(tail)
        if next_norm is not None and not (next_norm.nodes & nodes):
            nodes |= next_norm.nodes
        else:
            next_norm = None
        return CombineMatch(na, b1, b2, h, scale, next_norm, nodes)

    def rewrite(self, graph: Graph, m: CombineMatch) -> None:
        ed = GraphEditor(graph)
        na, n2 = m.norm_add, m.next_norm
        scalar = m.scale.scalar if m.scale else None
        args = [m.branch1.input, m.branch2.input, na.residual, m.branch1.weight, m.branch2.weight, na.norm.weight,
                scalar, n2.weight if n2 else None, m.branch1.eps, m.branch2.eps, na.norm.eps,
                n2.eps if n2 else None]
        if not ed.precedes_all(args, na.add):
            log.debug("%s: inputs defined after %s, skipped", self.name, na.add)
            return
        normed, residual_out = ed.call(na.add, fused_op("moe_branch_combine"), args, n_outputs=2)
        if n2 is not None:
            n2.output.replace_all_uses_with(normed)
        m.residual_out.replace_all_uses_with(residual_out)
        ed.erase_dead(m.nodes)
        if not normed.users:
            graph.erase_node(normed)

"""q/k/v norms of one attention layer, with RoPE, in one launch.

Gemma-4 attention norms each projection per head before RoPE:

  q = rope(rms(q_proj(h), wq), cos, sin)
  k = rope(rms(k_proj(h), wk), cos, sin)        (absent in KV-shared layers)
  v = rms(v_proj(h))            (no weight; v_proj(h) is k_proj(h) in k_eq_v layers)

Inductor already fuses each norm with its RoPE, one kernel per tensor; the
fused op does all three in one launch. A KV-shared layer has no k/v: only q is
rewritten (``q_norm_rope``); nothing is invented for k/v. The three tensors are
grouped by the hidden state their projections read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import (
    RmsNorm,
    binary_operands,
    dtype_of,
    is_closed,
    is_op,
    match_rmsnorm,
    val,
)

aten = torch.ops.aten

_VIEWS = (aten.reshape.default, aten.view.default, aten.slice.Tensor, aten.split_with_sizes.default)


@dataclass
class Rope:
    """``out = x * cos + rotate_half(x) * sin`` with cos/sin [B, S, D] unsqueezed at dim 2."""

    x: Node
    cos: Node
    sin: Node
    out: Node
    nodes: set


def _unsqueezed_2(node) -> Node | None:
    if is_op(node, aten.unsqueeze.default) and node.args[1] in (2, -2):
        src = node.args[0]
        sv = val(src)
        if sv is not None and sv.dim() == 3:
            return src
    return None


def _is_half_slice(node, x: Node, first: bool) -> bool:
    """``x[..., :D/2]`` (first) or ``x[..., D/2:]`` as ``aten.slice.Tensor``."""
    if not is_op(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    xv = val(x)
    d = xv.shape[-1]
    args = list(node.args) + [None] * 5
    dim, start, end, step = args[1], args[2], args[3], args[4] if args[4] is not None else 1
    if dim not in (-1, xv.dim() - 1) or step != 1:
        return False
    if first:
        return start in (0, None) and end == d // 2
    return start == d // 2 and (end is None or end >= d)


def _match_rotate_half(node, x: Node) -> set | None:
    """``cat([-x[..., D/2:], x[..., :D/2]], -1)``."""
    if not is_op(node, aten.cat.default):
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    xv = val(x)
    if len(parts) != 2 or dim not in (-1, xv.dim() - 1):
        return None
    neg, lo = parts
    if not is_op(neg, aten.neg.default) or not _is_half_slice(neg.args[0], x, first=False):
        return None
    if not _is_half_slice(lo, x, first=True):
        return None
    return {node, neg, neg.args[0], lo}


def match_rope(out: Node) -> Rope | None:
    ops = binary_operands(out, aten.add.Tensor)
    if ops is None:
        return None
    for a, b in (ops, ops[::-1]):
        pa, pb = binary_operands(a, aten.mul.Tensor), binary_operands(b, aten.mul.Tensor)
        if pa is None or pb is None:
            continue
        for x, cos_u in (pa, pa[::-1]):
            cos = _unsqueezed_2(cos_u)
            if cos is None or not isinstance(x, Node):
                continue
            for rot, sin_u in (pb, pb[::-1]):
                sin = _unsqueezed_2(sin_u)
                rot_nodes = _match_rotate_half(rot, x) if sin is not None else None
                if rot_nodes is None:
                    continue
                io = dtype_of(x)
                if d_mismatch(x, cos, sin) or any(dtype_of(n) != io for n in (cos, sin, a, b, out)):
                    continue
                nodes = {out, a, b, cos_u, sin_u} | rot_nodes
                return Rope(x=x, cos=cos, sin=sin, out=out, nodes=nodes)
    return None


def d_mismatch(x: Node, cos: Node, sin: Node) -> bool:
    xv, cv, sv = val(x), val(cos), val(sin)
    return xv.dim() != 4 or tuple(cv.shape) != tuple(sv.shape) or cv.shape[-1] != xv.shape[-1] or xv.shape[-1] % 2


def projection_source(node: Node, depth: int = 8) -> Node | None:
    """The hidden state a projection reads: walk views back to a GEMM, then its input's views back."""
    n = node
    for _ in range(depth):
        if is_op(n, aten.mm.default, aten.addmm.default, aten.bmm.default):
            a = n.args[1] if is_op(n, aten.addmm.default) else n.args[0]
            for _ in range(depth):
                if is_op(a, aten.reshape.default, aten.view.default):
                    a = a.args[0]
                else:
                    return a
            return a
        if is_op(n, *_VIEWS) or is_op(n, operator.getitem):
            n = n.args[0]
            continue
        return None
    return None


@dataclass
class HeadNorm:
    norm: RmsNorm
    rope: Rope | None
    source: Node | None  # hidden state the projection reads

    @property
    def out(self) -> Node:
        return self.rope.out if self.rope else self.norm.output

    @property
    def nodes(self) -> set:
        return self.norm.nodes | (self.rope.nodes if self.rope else set())


@dataclass
class AttnGroup:
    q: HeadNorm
    k: HeadNorm | None = None
    v: HeadNorm | None = None
    nodes: set = field(default_factory=set)


def _head_norms(graph: Graph) -> tuple[list[HeadNorm], list[HeadNorm]]:
    """Per-head norms on 4-D [B, S, H, D] tensors: (weighted + RoPE), (weightless, no RoPE)."""
    roped, plain = [], []
    for node in graph.nodes:
        rope = match_rope(node)
        if rope is not None:
            n = match_rmsnorm(rope.x, want_weight=True)
            if n is not None and val(n.input).dim() == 4:
                roped.append(HeadNorm(n, rope, projection_source(n.input)))
            continue
        v = val(node)
        if v is None or v.dim() != 4:
            continue
        n = match_rmsnorm(node, want_weight=False)
        if n is not None and val(n.input).dim() == 4:
            plain.append(HeadNorm(n, None, projection_source(n.input)))
    # fp32: a weighted norm's inner ``x * inv`` looks like a weightless norm; it is a v norm
    # only if something outside the q/k patterns reads it (k_eq_v layers share it with k).
    inner = set().union(*(h.nodes for h in roped)) if roped else set()
    plain = [h for h in plain if not (h.norm.output in inner and all(u in inner for u in h.norm.output.users))]
    return roped, plain


class QkvNorm(FusionPass):
    name = "qkv_norm"
    description = "q/k norms + RoPE and the weightless v norm of one layer in one launch"

    def find(self, graph: Graph) -> list[AttnGroup]:
        roped, plain = _head_norms(graph)
        by_source: dict[Node, list[HeadNorm]] = {}
        for hn in roped:
            if hn.source is not None:
                by_source.setdefault(hn.source, []).append(hn)
        v_by_source: dict[Node, list[HeadNorm]] = {}
        for hn in plain:
            if hn.source is not None:
                v_by_source.setdefault(hn.source, []).append(hn)
        groups, taken = [], set()
        for source, heads in by_source.items():
            group = self._group(heads, v_by_source.get(source, []))
            if group is None or group.nodes & taken:
                continue
            taken |= group.nodes
            groups.append(group)
        return groups

    def _group(self, heads: list[HeadNorm], vs: list[HeadNorm]) -> AttnGroup | None:
        if len(heads) not in (1, 2) or len(vs) > 1:
            return None
        # q has more heads than k (GQA) or equal; with one roped norm it is q alone (KV-shared layer)
        heads = sorted(heads, key=lambda h: -val(h.norm.input).shape[-2])
        q = heads[0]
        k = heads[1] if len(heads) == 2 else None
        v = vs[0] if (vs and k is not None) else None
        if k is not None:
            if v is None or not _same_rope(q, k) or val(k.norm.input).shape != val(v.norm.input).shape:
                k = v = None  # not the Gemma-4 shape: fuse q alone
        if k is None and not _q_only_ok(q):
            return None
        parts = [h for h in (q, k, v) if h is not None]
        nodes = set().union(*(h.nodes for h in parts))
        if not is_closed(nodes, [h.out for h in parts]):
            log.debug("qkv_norm: intermediate with outside users near %s", q.out)
            return None
        return AttnGroup(q, k, v, nodes)

    def rewrite(self, graph: Graph, g: AttnGroup) -> None:
        ed = GraphEditor(graph)
        parts = [h for h in (g.q, g.k, g.v) if h is not None]
        anchor = min((h.out for h in parts), key=lambda n: ed.order[n])
        q, k, v = g.q, g.k, g.v
        if k is not None:
            args = [q.norm.input, k.norm.input, v.norm.input, q.norm.weight, k.norm.weight,
                    q.rope.cos, q.rope.sin, q.norm.eps, k.norm.eps, v.norm.eps]
            op, n_out = fused_op("qkv_norm_rope"), 3
        else:
            args = [q.norm.input, q.norm.weight, q.rope.cos, q.rope.sin, q.norm.eps]
            op, n_out = fused_op("q_norm_rope"), 1
        if not ed.hoist_before(args, anchor):
            log.debug("qkv_norm: cannot order inputs before %s", anchor)
            return
        outs = ed.call(anchor, op, args, n_outputs=n_out)
        for h, new in zip(parts, outs):
            h.out.replace_all_uses_with(new)
        ed.erase_dead(g.nodes)


def _same_rope(q: HeadNorm, k: HeadNorm) -> bool:
    return q.rope.cos is k.rope.cos and q.rope.sin is k.rope.sin


def _q_only_ok(q: HeadNorm) -> bool:
    return q.rope is not None

"""The MoE router chain after the router's projection GEMM (Gemma-4 26B-A4B), one kernel.

Two spellings of the same function are matched (the GEMM itself stays a GEMM):

  transformers:    p = softmax(float(logits)); w, ids = topk(p, k); w = w / w.sum(-1)
                   w = w * per_expert_scale[ids]
  top-k first:     v, ids = topk(logits, k); w = softmax(float(v)) * per_expert_scale[ids]
                   (SGLang's torch fallback, vLLM's torch path)

Inductor lowers this chain to softmax, a top-k gather, a sort, sums and gathers (about four
kernels plus the top-k's own); ``gemma4_passes::moe_router`` does it in one launch and returns
the same fp32 weights and int64 ids.  Ties between equal probabilities resolve to the lowest
expert id (see ``kernels/moe_router.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import candidate_outputs, binary_operands, is_closed, is_getitem, is_op, is_upcast, val

aten = torch.ops.aten


def _last_dim_keepdim(node, target) -> bool:
    """``target(x, [-1], True)`` over the last dim (amax / sum.dim_IntList)."""
    if not is_op(node, target) or node.kwargs.get("dtype") is not None:
        return False
    args = list(node.args) + [None, None]
    dims, keep = args[1], node.kwargs.get("keepdim", args[2])
    x = val(node.args[0])
    return keep is True and isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, x.dim() - 1)


def match_softmax(p: Node) -> tuple[Node, set] | None:
    """``p = softmax(x, -1)`` on an fp32 ``x``, decomposed (amax, sub, exp, sum, div) or not."""
    if is_op(p, aten._softmax.default):
        x, dim, half = p.args
        if half or dim not in (-1, val(x).dim() - 1) or val(x).dtype != torch.float32:
            return None
        return x, {p}
    ops = binary_operands(p, aten.div.Tensor) if is_op(p, aten.div.Tensor) and len(p.args) == 2 else None
    if ops is None:
        return None
    e, s = ops
    if not (is_op(e, aten.exp.default) and _last_dim_keepdim(s, aten.sum.dim_IntList) and s.args[0] is e):
        return None
    sub = e.args[0]
    if not is_op(sub, aten.sub.Tensor) or len(sub.args) != 2 or sub.kwargs:
        return None
    x, m = sub.args
    if not (_last_dim_keepdim(m, aten.amax.default) and m.args[0] is x) or val(x).dtype != torch.float32:
        return None
    return x, {p, e, s, sub, m}


def _topk(node) -> int | None:
    """``k`` of ``topk(x, k)`` over the last dim, largest first, sorted; None otherwise."""
    if not is_op(node, aten.topk.default):
        return None
    args = list(node.args) + [None] * 4
    k, dim, largest, srt = args[1], args[2], args[3], args[4]
    dim = node.kwargs.get("dim", -1 if dim is None else dim)
    largest = node.kwargs.get("largest", True if largest is None else largest)
    srt = node.kwargs.get("sorted", True if srt is None else srt)
    x = val(node.args[0])
    if x is None or x.dim() != 2 or dim not in (-1, 1) or largest is not True or srt is not True:
        return None
    return k if isinstance(k, int) else None


def _outputs(topk: Node) -> tuple[Node, Node] | None:
    vals = [u for u in topk.users if is_getitem(u, topk, 0)]
    ids = [u for u in topk.users if is_getitem(u, topk, 1)]
    if len(vals) != 1 or len(ids) != 1 or len(topk.users) != 2:
        return None
    return vals[0], ids[0]


def _scaled_by_expert(w: Node, ids: Node) -> tuple[Node, Node, Node] | None:
    """``w``'s one user is ``w * per_expert_scale[ids]``: (mul, index node, per_expert_scale)."""
    if len(w.users) != 1:
        return None
    (mul,) = w.users
    ops = binary_operands(mul, aten.mul.Tensor)
    if ops is None:
        return None
    idx = ops[1] if ops[0] is w else ops[0]
    if not is_op(idx, aten.index.Tensor) or len(idx.args) != 2:
        return None
    pes, indices = idx.args
    if not (isinstance(indices, (list, tuple)) and len(indices) == 1 and indices[0] is ids):
        return None
    pv = val(pes)
    if pv is None or pv.dim() != 1 or not pv.dtype.is_floating_point or pes.op not in ("placeholder", "get_attr"):
        return None
    if val(mul).dtype != torch.float32:
        return None
    return mul, idx, pes


@dataclass
class RouterMatch:
    logits: Node
    pes: Node
    k: int
    topk_first: bool
    topk: Node
    weights: Node  # the node whose value the fused weights replace
    ids: Node
    nodes: set


def _logits_source(x: Node, nodes: set) -> Node:
    """The router logits: the fp32 upcast's source (bf16/fp16 GEMM output) or ``x`` itself."""
    if is_upcast(x) and all(u in nodes for u in x.users):
        nodes.add(x)
        return x.args[0]
    if is_upcast(x):
        return x.args[0]
    return x


def match_router(topk: Node) -> RouterMatch | None:
    k = _topk(topk)
    if k is None:
        return None
    outs = _outputs(topk)
    if outs is None:
        return None
    vals, ids = outs
    if val(ids).dtype != torch.int64:
        return None
    sm = match_softmax(topk.args[0])
    if sm is not None:  # transformers: softmax over all experts, top-k, renormalise, scale
        x, nodes = sm
        if len(vals.users) != 2:
            return None
        divs = [u for u in vals.users if is_op(u, aten.div.Tensor) and u.args[0] is vals]
        sums = [u for u in vals.users if _last_dim_keepdim(u, aten.sum.dim_IntList)]
        if len(divs) != 1 or len(sums) != 1 or divs[0].args[1] is not sums[0]:
            return None
        scaled = _scaled_by_expert(divs[0], ids)
        if scaled is None:
            return None
        mul, idx, pes = scaled
        nodes |= {topk, vals, divs[0], sums[0], idx, mul}
        logits = _logits_source(x, nodes)
        topk_first = False
    else:  # top-k of the raw logits, softmax over the k values, scale
        ups = [u for u in vals.users if is_upcast(u)]
        up = ups[0] if len(vals.users) == 1 and ups else None
        src = up if up is not None else vals  # fp32 logits: no upcast
        sm2 = p = None
        for cand in candidate_outputs(src, 3):  # the softmax's output: src -> sub -> exp -> div
            found = match_softmax(cand)
            if found is not None and found[0] is src:
                p, sm2 = cand, found
                break
        if sm2 is None:
            return None
        scaled = _scaled_by_expert(p, ids)
        if scaled is None:
            return None
        mul, idx, pes = scaled
        nodes = sm2[1] | {topk, vals, idx, mul} | ({up} if up is not None else set())
        logits = topk.args[0]
        topk_first = True
    lv = val(logits)
    if lv is None or lv.dim() != 2 or lv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if val(pes).shape[0] != lv.shape[-1] or not 1 <= k <= min(lv.shape[-1], 16):
        return None
    return RouterMatch(logits, pes, k, topk_first, topk, mul, ids, nodes)


class MoeRouter(FusionPass):
    name = "moe_router"
    description = "softmax -> top-k -> renormalise -> * per_expert_scale[ids] (either order), one kernel"

    def find(self, graph: Graph) -> list[RouterMatch]:
        found = []
        for node in graph.nodes:
            m = match_router(node) if is_op(node, aten.topk.default) else None
            if m is None:
                continue
            if not is_closed(m.nodes | {m.ids}, [m.weights, m.ids]):
                log.debug("%s: %s has users outside the pattern", self.name, node)
                continue
            found.append(m)
        return found

    def rewrite(self, graph: Graph, m: RouterMatch) -> None:
        ed = GraphEditor(graph)
        w, ids = ed.call(m.topk, fused_op("moe_router"), [m.logits, m.pes, m.k, m.topk_first], n_outputs=2)
        m.weights.replace_all_uses_with(w)
        m.ids.replace_all_uses_with(ids)
        ed.erase_dead(m.nodes | {m.ids})


__all__ = ["MoeRouter", "match_router", "match_softmax"]

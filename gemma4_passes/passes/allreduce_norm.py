"""Tensor parallelism: the all-reduce right before a Gemma-4 norm-before-residual epilogue.

Under TP, ``o_proj`` / ``down_proj`` partial sums are all-reduced and then normed:
``AR(x) -> rms(., w) -> + residual [-> * layer_scalar] -> next norm``.  This pass runs after the
spine's epilogue fusions and folds the all-reduce feeding one of their ops into an ``allreduce_*``
op over exactly the matched all-reduce's c10d group:

    AR(x) -> rmsnorm_add[_rmsnorm](., ...)          ->  allreduce_rmsnorm_add[_rmsnorm](x, ..., group)
    AR(h1), AR(h2) -> moe_branch_combine(., ., ...)  ->  allreduce_moe_branch_combine(h1, h2, ..., group)

``AR`` is any form :mod:`.allreduce_forms` knows (funcol / transformers, SGLang, vLLM), a sum whose
result has no other user.  At the MoE site a branch may reach the combine through reshapes
(transformers all-reduces the experts' ``[T, H]`` sum and reshapes it to ``[B, S, H]`` after the
wait); the fold reshapes the partial sum instead, which is exact (the sum is elementwise).

The norm sites fold only where the one-shot symmetric-memory kernel can serve the group
(``kernels.allreduce_workspace.fusion_unavailable_reason``; otherwise the graph is left alone and the
reason said once).  The MoE site is not gated: one all-reduce of ``[h1 | h2]``
instead of two pays on any backend; both sums must run over the same group.

On by default: on 2x H200 the one-shot kernel runs the post-FFN site in 5.5 us at 1 token and 9.6 us
at 128 (NCCL + Inductor's epilogue: 15.8 / 25.2 us) and the 31B TP=2 layer 7-9% faster than
Inductor alone (benchmarks/RESULTS.md).  Where the kernel cannot serve a group nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._guards import detect_fake_mode
from torch.fx import Graph, Node, map_arg

from ..kernels.allreduce_workspace import fusion_unavailable_reason
from .allreduce_forms import Reduced, log_once, match_all_reduce, match_all_reduce_viewed
from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import val

aten = torch.ops.aten


@dataclass
class NormSite:
    epilogue: Node  # the spine's rmsnorm_add[_rmsnorm]
    reduced: Reduced


@dataclass
class MoeSite:
    combine: Node  # the spine's moe_branch_combine
    h1: Reduced
    h2: Reduced


def one_shot_available(r: Reduced) -> bool:
    """The one-shot kernel can serve ``r``'s group on its device; otherwise say why, once."""
    v = val(r.source)
    if v is None:
        return False
    reason = fusion_unavailable_reason(r.group, v.device)
    if reason is None:
        return True
    log_once(("gate", r.group, reason), "allreduce_norm: leaving the all-reduce over group %r unfused: %s",
             r.group, reason)
    return False


def match_norm_site(epilogue: Node) -> NormSite | None:
    r = match_all_reduce(epilogue.args[0])
    if r is None or not one_shot_available(r):
        return None
    return NormSite(epilogue, r)


def match_moe_site(combine: Node) -> MoeSite | None:
    h1, h2 = combine.args[:2]
    if h1 is h2:
        return None
    r1, r2 = match_all_reduce_viewed(h1), match_all_reduce_viewed(h2)
    if r1 is None or r2 is None:
        return None
    if r1.group != r2.group:  # one all-reduce can only sum over one group
        log.debug("allreduce_norm: %s sums h1 over %r and h2 over %r, left alone", combine, r1.group, r2.group)
        return None
    return MoeSite(combine, r1, r2)


class AllReduceNorm(FusionPass):
    name = "allreduce_norm"
    description = ("all-reduce (sum) -> norm-before-residual epilogue (or both MoE branch sums -> their combine): "
                   "one op over the matched group")
    default = True  # gated per group: see the module docstring

    _TARGETS = {"rmsnorm_add": "allreduce_rmsnorm_add", "rmsnorm_add_rmsnorm": "allreduce_rmsnorm_add_rmsnorm"}

    def find(self, graph: Graph) -> list[NormSite | MoeSite]:
        norms = {fused_op(name) for name in self._TARGETS}
        combine = fused_op("moe_branch_combine")
        found = []
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            m = None
            if node.target in norms:
                m = match_norm_site(node)
            elif node.target is combine:
                m = match_moe_site(node)
            if m is not None:
                found.append(m)
        return found

    def rewrite(self, graph: Graph, m: NormSite | MoeSite) -> None:
        if isinstance(m, MoeSite):
            self._rewrite_moe(graph, m)
        else:
            self._rewrite_norm(graph, m)

    def _rewrite_norm(self, graph: Graph, m: NormSite) -> None:
        name = self._TARGETS[m.epilogue.target._schema.name.split("::")[-1]]
        args = list(m.epilogue.args)
        if name == "allreduce_rmsnorm_add_rmsnorm" and len(args) == 7:
            args.append(False)  # unrounded_sum's default, explicit before group_name
        self._replace(graph, m.epilogue, name, [m.reduced.source, *args[1:], m.reduced.group], m.reduced.erase)

    def _rewrite_moe(self, graph: Graph, m: MoeSite) -> None:
        ed = GraphEditor(graph)
        h1, h2 = (self._viewed_source(ed, m.combine, r) for r in (m.h1, m.h2))
        args = [h1, h2, *m.combine.args[2:], m.h1.group]
        self._replace(graph, m.combine, "allreduce_moe_branch_combine", args, m.h1.erase + m.h2.erase, ed)

    @staticmethod
    def _viewed_source(ed: GraphEditor, anchor: Node, r: Reduced) -> Node:
        """``r.source`` through ``r.views`` (reshaping the partial sum before the all-reduce = after it).

        Not ``ed.call``: a size may hold symbolic dims (nodes inside the list), whose fake values are
        mapped here; each is defined before the old view, hence before ``anchor``.
        """
        x = r.source
        for size in r.views:
            fake_x, fake_size = map_arg((x, size), lambda n: n.meta["val"])
            with detect_fake_mode([fake_x]):
                value = aten.reshape.default(fake_x, fake_size)
            with ed.graph.inserting_before(anchor):
                x = ed.graph.call_function(aten.reshape.default, (x, size))
            x.meta["val"] = value
        return x

    def _replace(self, graph: Graph, old: Node, name: str, args: list, erase, ed: GraphEditor | None = None) -> None:
        ed = ed or GraphEditor(graph)
        new = ed.call(old, fused_op(name), args)[0]
        new.meta["val"] = old.meta["val"]  # same outputs: keep the values later nodes were traced with
        old.replace_all_uses_with(new)
        graph.erase_node(old)
        ed.erase_dead(erase)
        log.debug("%s: folded the all-reduce over group %r into %s", self.name, args[-1], name)

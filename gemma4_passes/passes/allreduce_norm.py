"""Tensor parallelism: the all-reduce right before a Gemma-4 norm-before-residual epilogue.

Under TP, ``o_proj`` / ``down_proj`` partial sums are all-reduced and then normed:
``AR(x) -> rms(., w) -> + residual [-> * layer_scalar] -> next norm``.  This pass runs after the
spine's epilogue fusions and folds the all-reduce that feeds one of their ops into an
``allreduce_*`` op over exactly the matched node's group:

    wait_tensor(_c10d_functional.all_reduce(x, "sum", group))  ->  rmsnorm_add[_rmsnorm](., ...)

The all-reduce result must have no other user.  Off by default: until the one-shot
symmetric-memory kernel lands (issue 4), the fused op runs the same all-reduce followed by the
same epilogue kernel, and hiding the collective in an opaque op only takes overlap away from
Inductor.  The SGLang (``sglang.outplace_all_reduce``) and vLLM (``vllm.all_reduce``) forms name
their own group registries and are not matched yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import is_op

_c10d = torch.ops._c10d_functional


@dataclass
class AllReduceSite:
    epilogue: Node  # the spine's fused op
    wait: Node
    all_reduce: Node
    source: Node
    group: str


def match_all_reduce_input(epilogue: Node) -> AllReduceSite | None:
    x = epilogue.args[0]
    if not is_op(x, _c10d.wait_tensor.default) or len(x.users) != 1:
        return None
    ar = x.args[0]
    if not is_op(ar, _c10d.all_reduce.default) or len(ar.users) != 1:
        return None
    src, op, group = ar.args[:3]
    if op != "sum" or not isinstance(group, str) or not isinstance(src, Node):
        return None
    return AllReduceSite(epilogue, x, ar, src, group)


class AllReduceNorm(FusionPass):
    name = "allreduce_norm"
    description = "all-reduce (sum) -> norm-before-residual epilogue: one op over the matched group"
    default = False  # see the module docstring: no gain until the one-shot kernel exists

    _TARGETS = {"rmsnorm_add": "allreduce_rmsnorm_add", "rmsnorm_add_rmsnorm": "allreduce_rmsnorm_add_rmsnorm"}

    def find(self, graph: Graph) -> list[AllReduceSite]:
        spine = {fused_op(name): name for name in self._TARGETS}
        found = []
        for node in graph.nodes:
            if node.op == "call_function" and node.target in spine:
                m = match_all_reduce_input(node)
                if m is not None:
                    found.append(m)
        return found

    def rewrite(self, graph: Graph, m: AllReduceSite) -> None:
        ed = GraphEditor(graph)
        name = self._TARGETS[m.epilogue.target._schema.name.split("::")[-1]]
        args = list(m.epilogue.args)
        if name == "allreduce_rmsnorm_add_rmsnorm" and len(args) == 7:
            args.append(False)  # unrounded_sum's default, explicit before group_name
        new = ed.call(m.epilogue, fused_op(name), [m.source, *args[1:], m.group])[0]
        new.meta["val"] = m.epilogue.meta["val"]
        m.epilogue.replace_all_uses_with(new)
        graph.erase_node(m.epilogue)
        ed.erase_dead([m.wait, m.all_reduce])
        log.debug("%s: folded all-reduce over group %r into %s", self.name, m.group, name)

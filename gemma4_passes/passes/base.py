"""What every fusion pass shares: find matches, dump before/after, rewrite, count.

A fusion is a class with a ``name``, a ``find(graph)`` that returns disjoint
matches, and a ``rewrite(graph, match)`` that replaces one match by a call to a
``gemma4_passes`` custom op. :meth:`FusionPass.apply` runs the two, writes the
depyf before/after files when a depyf dump is active, and returns the count.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Iterable, Sequence

import torch
from torch.fx import Graph, Node

log = logging.getLogger("gemma4_passes")

_LAZY_FORMAT = None


def _lazy_format_graph_code():
    global _LAZY_FORMAT
    if _LAZY_FORMAT is None:
        from torch._dynamo import utils as dynamo_utils

        _LAZY_FORMAT = (dynamo_utils.lazy_format_graph_code, dynamo_utils.lazy_format_graph_code.__code__)
    return _LAZY_FORMAT


def graph_dump_active() -> bool:
    """True inside ``depyf.prepare_debug`` (it swaps ``lazy_format_graph_code``'s code object)."""
    fn, original_code = _lazy_format_graph_code()
    return fn.__code__ is not original_code


def dump_graph(graph: Graph, name: str) -> None:
    """Hand the current graph to ``lazy_format_graph_code`` (depyf writes it to a file)."""
    gm = graph.owning_module
    if gm is None:
        return
    gm.recompile()
    fn, _ = _lazy_format_graph_code()
    fn(name, gm, colored=False)


class FusionPass:
    """Base class: one fusion family member, with its own match count."""

    name: str = ""
    description: str = ""
    #: run when the user selects no fusions; False for a fusion that does not beat Inductor
    #: on the measured shapes (still available by name)
    default: bool = True

    def find(self, graph: Graph) -> list[Any]:
        raise NotImplementedError

    def rewrite(self, graph: Graph, match: Any) -> None:
        raise NotImplementedError

    def apply(self, graph: Graph) -> int:
        matches = self.find(graph)
        if not matches:
            return 0
        dumping = graph_dump_active()
        if dumping:
            dump_graph(graph, f"gemma4_passes.{self.name}.before")
        for m in matches:
            self.rewrite(graph, m)
        if dumping:
            dump_graph(graph, f"gemma4_passes.{self.name}.after")
        return len(matches)


class GraphEditor:
    """Inserts custom-op calls with fake values and removes what they replace."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}

    def precedes_all(self, inputs: Iterable[Any], anchor: Node) -> bool:
        """Every node among ``inputs`` is defined before ``anchor``."""
        pos = self.order[anchor]
        return all(self.order.get(n, pos) < pos for n in inputs if isinstance(n, Node))

    def hoist_before(self, inputs: Iterable[Any], anchor: Node) -> bool:
        """Move the pure computations of ``inputs`` (and what they need) before ``anchor``.

        Used where a fused op's inputs are computed after the first use of one of
        its outputs (e.g. k_proj's GEMM after q's RoPE). Returns False, moving
        nothing further, if an input depends on a node with side effects.
        """
        for n in inputs:
            if isinstance(n, Node) and not self._hoist(n, anchor, set()):
                return False
        return True

    def _hoist(self, node: Node, anchor: Node, visiting: set) -> bool:
        if self.order.get(node, -1) < self.order[anchor] and node in self.order:
            return True
        if node.op != "call_function" or node.is_impure() or node in visiting or node is anchor:
            return False
        visiting.add(node)
        for inp in node.all_input_nodes:
            if not self._hoist(inp, anchor, visiting):
                return False
        anchor.prepend(node)
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        return True

    def call(self, anchor: Node, op, args: Sequence[Any], n_outputs: int = 1) -> list[Node]:
        """Insert ``op(*args)`` before ``anchor``; return one node per output."""
        value = fake_call(op, args)  # before inserting: a failure leaves the graph untouched
        with self.graph.inserting_before(anchor):
            node = self.graph.call_function(op, tuple(args))
        node.meta["val"] = value
        if "stack_trace" in anchor.meta:
            node.meta["stack_trace"] = anchor.meta["stack_trace"]
        if n_outputs == 1:
            return [node]
        outs = []
        with self.graph.inserting_after(node):
            for i in range(n_outputs):
                g = self.graph.call_function(operator.getitem, (node, i))
                g.meta["val"] = node.meta["val"][i]
                outs.append(g)
        # keep getitems in index order right after the op
        for prev, nxt in zip(outs, outs[1:]):
            prev.append(nxt)
        return outs

    def erase_dead(self, nodes: Iterable[Node]) -> None:
        """Erase the matched nodes nobody uses any more, users before producers."""
        pending = sorted(set(nodes), key=lambda n: self.order.get(n, -1), reverse=True)
        for n in pending:
            if not n.users and n.op == "call_function":
                self.graph.erase_node(n)


def fused_op(name: str):
    """The OpOverload of a ``gemma4_passes`` kernel (registered on first use)."""
    from ..kernels import ensure_registered

    ensure_registered()
    return getattr(torch.ops.gemma4_passes, name).default


def fake_call(op, args: Sequence[Any]):
    """Run ``op`` on the fake values of ``args`` to get the new node's ``meta['val']``."""
    from torch._guards import detect_fake_mode

    fake_args = [a.meta["val"] if isinstance(a, Node) else a for a in args]
    mode = detect_fake_mode([a for a in fake_args if isinstance(a, torch.Tensor)])
    if mode is None:
        raise RuntimeError("gemma4_passes: no fake mode on the graph's values")
    with mode:
        return op(*fake_args)

"""A torch.compile backend that splits the Dynamo graph at split ops and compiles each other
piece with Inductor plus the package's passes.

    compiled = torch.compile(model, backend=gemma4_passes.runtime.piecewise_backend())

Every split op gets a piece of its own and runs eagerly; each remaining piece is compiled by
Inductor on its first call (with that call's inputs as example inputs) with
:class:`gemma4_passes.manager.Gemma4PostGradPass` in the post-grad pre slot.  A pattern that spans
a split op is therefore never fused.  (CUDA-graph capture of the pieces per batch bucket and the
capture-time parity guard build on this; see issue 5.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.fx.passes.split_module import split_module

from .split_ops import is_split_node, split_targets

log = logging.getLogger("gemma4_passes")


@dataclass
class PieceInfo:
    name: str
    is_split: bool
    n_nodes: int


@dataclass
class SplitResult:
    module: torch.fx.GraphModule
    pieces: list[PieceInfo] = field(default_factory=list)


def split_at_ops(gm: torch.fx.GraphModule, targets: set | None = None) -> SplitResult:
    """Split ``gm`` so that every split-op call is alone in its piece (graph order kept)."""
    targets = split_targets() if targets is None else targets
    part = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_split_node(node, targets):
            current += 1
            part[node] = current
            current += 1
        else:
            part[node] = current
    split = split_module(gm, gm, lambda n: part[n], keep_original_order=True)
    pieces = []
    for name, sub in split.named_children():
        nodes = [n for n in sub.graph.nodes if n.op not in ("placeholder", "output")]
        pieces.append(PieceInfo(name, any(is_split_node(n, targets) for n in nodes), len(nodes)))
    return SplitResult(split, pieces)


class _LazyInductorPiece:
    """Compiles its graph with Inductor + the passes on the first call."""

    def __init__(self, gm: torch.fx.GraphModule, make_pass: Callable):
        self.gm = gm
        self.make_pass = make_pass
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            from torch._inductor.compile_fx import compile_fx

            self.compiled = compile_fx(self.gm, list(args),
                                       config_patches={"post_grad_custom_pre_pass": self.make_pass()})
        return self.compiled(*args)


def piecewise_backend(fusions: Iterable[str] | None = None, split_ops: Iterable | None = None):
    """A ``torch.compile`` backend: split at the split ops, Inductor + passes on every other piece.

    ``fusions`` selects the passes as :func:`gemma4_passes.enable` does; ``split_ops`` replaces the
    registry's targets for this backend.
    """
    from ..manager import build_pass, select_fusions

    selected = select_fusions(fusions)  # validate now: a bad name fails at construction
    targets = set(split_ops) if split_ops is not None else None

    def backend(gm: torch.fx.GraphModule, example_inputs):
        res = split_at_ops(gm, targets)
        for info in res.pieces:
            if info.is_split:
                continue
            sub = getattr(res.module, info.name)
            piece = _LazyInductorPiece(sub, lambda: build_pass(selected))
            del res.module._modules[info.name]
            res.module.__dict__[info.name] = piece
        n_split = sum(p.is_split for p in res.pieces)
        log.info("gemma4_passes: piecewise graph: %d pieces, %d split ops", len(res.pieces), n_split)
        backend.last_split = res
        return res.module

    backend.last_split = None
    return backend

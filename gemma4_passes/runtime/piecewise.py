"""A torch.compile backend that splits the Dynamo graph at split ops and compiles each other
piece with Inductor plus the package's passes.

    compiled = torch.compile(model, backend=gemma4_passes.runtime.piecewise_backend())

Every split op gets a piece of its own and runs eagerly; each remaining piece is compiled by
Inductor, once, for the symbolic shapes Dynamo traced, with
:class:`gemma4_passes.manager.Gemma4PostGradPass` in the post-grad pre slot.  A pattern that spans
a split op is therefore never fused.  On CUDA each compiled piece is then replayed from CUDA
graphs captured per token-count bucket (:mod:`.graphed_piece`), each size checked by the
capture-time parity guard (:mod:`.parity_guard`) before it is trusted.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch.fx.passes.split_module import split_module

from .graphed_piece import DEFAULT_BUCKETS, CaptureShared, CudaGraphCapture, EmulatedCapture, GraphedPiece
from .parity_guard import ParityGuard
from .piece_shapes import analyse_piece, mutated_inputs
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


class _PieceCompiler(torch.fx.Interpreter):
    """Runs the split graph on the fake (symbolic) example inputs and compiles every non-split
    piece on the way with the fake inputs it receives, so each piece is compiled once for the
    symbolic shapes Dynamo traced (dynamic in the token count when the graph is)."""

    def __init__(self, split: SplitResult, compile_piece: Callable):
        super().__init__(split.module)
        self.is_split = {p.name: p.is_split for p in split.pieces}
        self.compile_piece = compile_piece
        self.compiled: dict = {}

    def call_module(self, target, args, kwargs):
        sub = self.fetch_attr(target)
        out = super().call_module(target, args, kwargs)
        if not self.is_split[target]:
            self.compiled[target] = self.compile_piece(target, sub, list(args), out)
        return out


def _returned_outputs(module: torch.fx.GraphModule) -> dict[str, frozenset[int]]:
    """For every piece, the positions of its outputs that the split graph returns to the caller."""
    out_node = next(n for n in module.graph.nodes if n.op == "output")
    leaving = set(out_node.all_input_nodes)
    res: dict[str, set] = {}
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        hit = res.setdefault(node.target, set())
        if node in leaving:
            hit.add(0)
        for user in node.users:
            if user in leaving and user.target is operator.getitem:
                hit.add(user.args[1])
    return {k: frozenset(v) for k, v in res.items()}


def piecewise_backend(
    fusions: Iterable[str] | None = None,
    split_ops: Iterable | None = None,
    *,
    cudagraphs: bool | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    parity_guard: ParityGuard | bool = True,
    capturer=None,
    fault_injection: Callable[[str, int | None], bool] | None = None,
):
    """A ``torch.compile`` backend: split at the split ops, Inductor + passes on every other piece,
    each compiled piece replayed from CUDA graphs per token-count bucket.

    ``fusions`` selects the passes as :func:`gemma4_passes.enable` does (``[]``: Inductor alone);
    ``split_ops`` replaces the registry's targets for this backend.
    ``cudagraphs``: None captures when the graph's inputs are on CUDA; True forces capture (with
    ``capturer``, e.g. :class:`EmulatedCapture` on CPU in tests); False never captures.
    ``buckets``: the token counts captured (a call is padded up to the next one; above the last it
    runs uncaptured). ``parity_guard``: a :class:`ParityGuard`, or True/False for the default on/off.
    ``fault_injection(piece_name, bucket) -> bool``: corrupt those captures' replays (to show the
    guard catches a bad graph).
    After compiling, ``backend.last_split`` is the :class:`SplitResult` and ``backend.pieces`` maps
    piece name -> compiled callable (a :class:`GraphedPiece` when captured).
    """
    from ..manager import build_pass, select_fusions

    selected = select_fusions(fusions)  # validate now: a bad name fails at construction
    targets = set(split_ops) if split_ops is not None else None
    guard = parity_guard if isinstance(parity_guard, ParityGuard) else ParityGuard(enabled=bool(parity_guard))
    buckets = tuple(sorted(set(int(b) for b in buckets)))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive token counts, got {buckets!r}")

    def backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._dispatch.python import enable_python_dispatcher
        from torch._guards import detect_fake_mode
        from torch._inductor.compile_fx import compile_fx

        res = split_at_ops(gm, targets)
        fake_mode = detect_fake_mode(example_inputs) or detect_fake_mode()
        fakes = [fake_mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
        capture = on_cuda if cudagraphs is None else cudagraphs
        shared = CaptureShared(capturer or (CudaGraphCapture() if on_cuda else EmulatedCapture()),
                               buckets, guard, fault_injection) if capture else None
        returned = _returned_outputs(res.module)

        def compile_piece(name, sub, args, out):
            compiled = compile_fx(sub, args, config_patches={"post_grad_custom_pre_pass": build_pass(selected)})
            if shared is None:
                return compiled
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            shape = analyse_piece(args, outs)
            return GraphedPiece(name, compiled, shape, shared, returned.get(name, frozenset()),
                                single=not isinstance(out, (tuple, list)), mutated=mutated_inputs(sub))

        compiler = _PieceCompiler(res, compile_piece)
        # The python dispatcher, as Dynamo and AOTAutograd trace with it: without it a composite op
        # runs its C++ kernel on the fake inputs, and some read concrete sizes (CUDA linear calls
        # aten.size -> int(s)), which specialises the token count to this call's (one graph per size).
        with fake_mode, enable_python_dispatcher():
            compiler.run(*fakes)
        for name, piece in compiler.compiled.items():
            del res.module._modules[name]
            res.module.__dict__[name] = piece
        n_split = sum(p.is_split for p in res.pieces)
        log.info("gemma4_passes: piecewise graph: %d pieces, %d split ops, CUDA graphs %s", len(res.pieces),
                 n_split, "on" if shared else "off")
        backend.last_split = res
        backend.pieces = compiler.compiled
        backend.capture = shared
        return res.module

    backend.last_split = None
    backend.pieces = {}
    backend.capture = None
    return backend

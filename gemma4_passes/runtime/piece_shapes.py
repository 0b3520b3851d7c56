"""Which inputs and outputs of a compiled piece scale with its token count.

A piece is captured as a CUDA graph per token-count bucket: its token-sized inputs are copied
into bucket-sized static buffers (the rows past the real count are padding) and its token-sized
outputs are sliced back.  That is only sound when the piece's shapes depend on ONE size symbol
and only as a whole dimension (``[s, hidden]``, not ``[2*s]`` or ``[s, s]``): then every row is
computed on its own and the padded rows never touch the real ones.  This module reads that off
the fake (symbolic) inputs and outputs the piece was compiled with.

Each piece is analysed on its own, so a piece after a row cut (YOCO: the KV-shared layers run on
the last token of each request only) gets the symbol of the cut size and is captured at that
size, independently of the pieces before it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class PieceShape:
    """How a piece's inputs/outputs depend on its token count.

    ``symbol``: the piece's one size symbol (None for a piece with static shapes).
    ``token_inputs`` / ``token_outputs``: (position, dim) of every tensor whose dim ``dim`` is the
    symbol; ``symint_inputs`` / ``symint_outputs``: positions of plain sizes equal to it.
    ``reason``: why the piece cannot be captured per bucket (None when it can).
    """

    symbol: Any = None
    token_inputs: tuple[tuple[int, int], ...] = ()
    symint_inputs: tuple[int, ...] = ()
    token_outputs: tuple[tuple[int, int], ...] = ()
    symint_outputs: tuple[int, ...] = ()
    reason: str | None = None
    #: per ``token_inputs`` entry, the input's strides as compiled (ints or expressions of ``symbol``)
    token_input_strides: tuple[tuple[Any, ...], ...] = ()

    @property
    def capturable(self) -> bool:
        return self.reason is None

    @property
    def static(self) -> bool:
        return self.symbol is None

    def strides_at(self, k: int, size: int) -> tuple[int, ...] | None:
        """The strides the compiled piece expects of token input ``k`` (its position in
        ``token_inputs``) at token count ``size``; None where a stride depends on another symbol."""
        if k >= len(self.token_input_strides):
            return None
        out = []
        for st in self.token_input_strides[k]:
            if isinstance(st, int):
                out.append(st)
            elif st.free_symbols <= {self.symbol}:
                out.append(int(st.subs(self.symbol, size)))
            else:
                return None
        return tuple(out)

    def runtime_size(self, args: Sequence[Any]) -> int | None:
        """The token count of a real call (None for a static piece)."""
        if self.static:
            return None
        if self.token_inputs:
            i, d = self.token_inputs[0]
            return int(args[i].shape[d])
        return int(args[self.symint_inputs[0]])


def _expr(x: Any):
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return None


class _Collector:
    def __init__(self) -> None:
        self.symbols: set = set()
        self.problems: list[str] = []

    def note(self, where: str, expr) -> bool:
        """Record one size; True when it is exactly a free symbol."""
        if expr is None:
            return False
        free = expr.free_symbols
        if not free:
            return False
        self.symbols |= free
        if len(free) == 1 and expr == next(iter(free)):
            return True
        self.problems.append(f"{where} has size {expr}, not a plain symbol")
        return False

    def tensor(self, where: str, t: torch.Tensor) -> list[int]:
        dims = [d for d, s in enumerate(t.shape) if self.note(f"{where} dim {d}", _expr(s))]
        if len(dims) > 1:
            self.problems.append(f"{where} has {len(dims)} token-sized dims {tuple(t.shape)}")
        return dims[:1]


def analyse_piece(args: Sequence[Any], outs: Sequence[Any]) -> PieceShape:
    """The :class:`PieceShape` of a piece from its fake (symbolic) inputs and outputs."""
    c = _Collector()
    tin, sin, tout, sout, strides = [], [], [], [], []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            dims = c.tensor(f"input {i}", a)
            tin += [(i, d) for d in dims]
            strides += [tuple(_expr(st) if _expr(st) is not None else int(st) for st in a.stride())] * len(dims)
        elif c.note(f"input {i}", _expr(a)):
            sin.append(i)
    for i, o in enumerate(outs):
        if isinstance(o, torch.Tensor):
            tout += [(i, d) for d in c.tensor(f"output {i}", o)]
        elif c.note(f"output {i}", _expr(o)):
            sout.append(i)
    reason = None
    if len(c.symbols) > 1:
        reason = f"shapes depend on {len(c.symbols)} size symbols {sorted(map(str, c.symbols))}"
    elif c.problems:
        reason = c.problems[0]
    elif any(str(s).startswith("u") for s in c.symbols):
        reason = "a data-dependent (unbacked) size"
    elif c.symbols and not (tin or sin):
        reason = "the token count is not visible in the inputs"
    symbol = next(iter(c.symbols)) if len(c.symbols) == 1 else None
    return PieceShape(symbol, tuple(tin), tuple(sin), tuple(tout), tuple(sout), reason, tuple(strides))


def mutated_inputs(gm: torch.fx.GraphModule) -> frozenset[int]:
    """Positions of ``gm``'s inputs that its graph writes in place (an op with a mutable schema
    argument, or an in-place tensor method like ``add_``).  Such an input must never be swapped for
    a static copy: the write would land in the copy."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders)}

    def written(node: torch.fx.Node) -> list:
        out = [node.kwargs["out"]] if "out" in node.kwargs else []  # torch.add(a, b, out=c)
        if node.op == "call_method":
            return out + ([node.args[0]] if _in_place_name(node.target) else [])
        if node.op != "call_function":
            return out
        if node.target in _IN_PLACE_OPERATORS or _in_place_name(getattr(node.target, "__name__", "")):
            return out + [node.args[0]]  # x[i] = v; x += y; torch.Tensor.add_(x, y)
        schema = getattr(node.target, "_schema", None)
        for i, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.alias_info is not None and arg.alias_info.is_write:
                out.append(node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
        return out

    hit = set()
    for node in gm.graph.nodes:
        for target in written(node):
            # a view of an input written in place writes the input
            while isinstance(target, torch.fx.Node) and target not in index and target.args \
                    and isinstance(target.args[0], torch.fx.Node) and _is_view(target):
                target = target.args[0]
            if isinstance(target, torch.fx.Node) and target in index:
                hit.add(index[target])
    return frozenset(hit)


def _in_place_name(name: str) -> bool:
    """``add_``, ``copy_``, ``index_put_``: the in-place spelling (not ``__iadd__``-style dunders)."""
    return name.endswith("_") and not name.startswith("_")


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
                 "expand", "flatten", "unflatten", "t", "as_strided", "__getitem__", "contiguous"}


def _is_view(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target is operator.getitem:
            return True
        schema = getattr(node.target, "_schema", None)
        if schema is not None:
            return bool(schema.returns) and schema.returns[0].alias_info is not None
        return getattr(node.target, "__name__", "") in _VIEW_METHODS
    return False

"""The index work of transformers' grouped_mm expert dispatch (Gemma-4 26B-A4B), one kernel.

``grouped_mm_experts_forward`` (transformers 5.17 and 5.25 lower to the same post-grad graph for
it, up to the sentinel masking noted below), from ``top_k_index`` [T, k], ``top_k_weights`` and
``hidden`` [T, H]::

    sorted_ids, perm = sort(reshape(top_k_index, [-1]))
    rows    = index(hidden, [div(perm, k, rounding_mode="floor")])         # hidden[perm // k]
    w_g     = index(reshape(top_k_weights, [-1]), [perm])                  # weights[perm]
    offsets = cumsum(histc(cast(sorted_ids), E, 0, E - 1), 0, dtype=int32) # cast: float32 on
                                                                           # CPU/MPS, int32 else
    inv     = index_put(empty([S], int64), [perm], iota(S))               # inv_perm[perm] = arange
    ... _grouped_mm(rows, W_up[E], offsets) ... _grouped_mm(., W_down[E], offsets) ...
    ... (. * w_g)[inv] ...

All of it but the GEMMs becomes ``gemma4_passes::moe_dispatch`` (one launch; see
``kernels/moe_dispatch.py``).  transformers 5.17 (and 5.25 with ``_is_expert_parallel``) also
masks the rows of sentinel ids: ``where(unsqueeze(sorted_ids >= E, -1), 0, rows)``; that ``where``
is folded into the op (``zero_sentinel_rows``), the mask's other users stay and read the op's
sorted ids.  Ids outside ``[0, E)`` keep the graph's meaning in the op (sorted by value, dropped
from the offsets), so nothing about the ids' origin is assumed.

What must hold (anything else is left alone): a 1-D int sort along its only dim, ascending;
histc with ``bins == E``, ``min == 0``, ``max == E - 1`` where E is the expert count of every
grouped GEMM reading the offsets (at least one); the cumsum in int32 as histc's only user; the
hidden gather by ``perm // k`` with ``k`` the ids' row length and ``T * k == S``; the weights
gather by ``perm``; the inverse permutation as an ``index_put`` of ``arange(S)`` at ``perm`` into a
fresh int64 [S] tensor, no accumulate.  Sizes are compared with ``statically_known_true``, so a
symbolic T adds no guard.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import is_getitem, is_op, val

aten = torch.ops.aten
prims = torch.ops.prims

_INT_IDS = (torch.int64, torch.int32)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
#: what transformers' histc input may be cast to (exact for any expert id that fits)
_HISTC_CASTS = (torch.float32, torch.float64, torch.int32, torch.int64)
#: grouped GEMMs that take the offsets: torch's, and transformers' fallback custom op (fp32/fp16)
_GROUPED_MM = ("aten._grouped_mm.default", "aten.grouped_mm.default", "transformers.grouped_mm_fallback.default")
_FRESH = (aten.empty.memory_format, aten.empty_strided.default, aten.full.default)


def _same(a, b) -> bool:
    """``a == b`` for sizes that may be symbolic, without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _arg(node: Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sort_ok(node: Node) -> bool:
    """Ascending sort of a 1-D int tensor along its only dim (``sort.default`` / ``sort.stable``)."""
    x = val(node.args[0])
    if x is None or x.dim() != 1 or x.dtype not in _INT_IDS:
        return False
    if node.target is aten.sort.default:
        dim, desc = _arg(node, 1, "dim", -1), _arg(node, 2, "descending", False)
    else:  # sort.stable(self, *, stable, dim=-1, descending=False)
        dim, desc = node.kwargs.get("dim", -1), node.kwargs.get("descending", False)
    return dim in (0, -1) and desc is False


def _one(nodes: list):
    return nodes[0] if len(nodes) == 1 else None


def _histc(sorted_ids: Node) -> tuple[Node, Node | None] | None:
    """The one ``histc`` of the sorted ids, directly or through one exact cast."""
    found = []
    for u in sorted_ids.users:
        if is_op(u, aten.histc.default):
            found.append((u, None))
        elif is_op(u, prims.convert_element_type.default) and u.args[1] in _HISTC_CASTS:
            found += [(h, u) for h in u.users if is_op(h, aten.histc.default) and h.args[0] is u]
    return _one(found)


def _histc_bins(h: Node) -> int | None:
    """``E`` of ``histc(x, bins=E, min=0, max=E-1)``; None for any other range."""
    bins, lo, hi = _arg(h, 1, "bins", 100), _arg(h, 2, "min", 0), _arg(h, 3, "max", 0)
    if not _is_int(bins) or bins < 2 or not all(isinstance(v, numbers.Real) for v in (lo, hi)):
        return None
    return bins if lo == 0 and hi == bins - 1 else None


def _offsets(h: Node) -> Node | None:
    """``cumsum(histc, 0, dtype=int32)``, histc's only user."""
    if len(h.users) != 1:
        return None
    (c,) = h.users
    if not is_op(c, aten.cumsum.default) or c.args[0] is not h:
        return None
    ok = _arg(c, 1, "dim", None) in (0, -1) and _arg(c, 2, "dtype", None) == torch.int32
    return c if ok else None


def _experts_of_gemms(offsets: Node) -> set | None:
    """The expert counts (weights' dim 0) of the grouped GEMMs reading ``offsets``; None if none do."""
    counts = set()
    for u in offsets.users:
        if u.op != "call_function" or str(u.target) not in _GROUPED_MM:
            continue
        if _arg(u, 2, "offs", None) is not offsets:
            continue
        w = val(_arg(u, 1, "mat2", None))
        if w is None or w.dim() != 3:
            return None
        counts.add(w.shape[0])
    return counts or None


def _hidden_gather(perm: Node, k: int, s) -> tuple[Node, Node, Node] | None:
    """``index(hidden, [perm // k])`` with ``hidden`` [S / k, H]: (hidden, div, gather)."""
    found = []
    for d in perm.users:
        if is_op(d, aten.div.Tensor_mode) and d.kwargs.get("rounding_mode") == "floor":
            div_k = d.args[1]
        elif is_op(d, aten.floor_divide.default, aten.floor_divide.Scalar):
            div_k = d.args[1]
        else:
            continue
        if d.args[0] is not perm or not _is_int(div_k) or div_k != k:
            continue
        for g in d.users:
            if is_op(g, aten.index.Tensor) and list(g.args[1]) == [d]:
                hv = val(g.args[0])
                if hv is not None and hv.dim() == 2 and hv.dtype in _FLOATS and _same(hv.shape[0] * k, s):
                    found.append((g.args[0], d, g))
    return _one(found)


def _weights_gather(perm: Node, s) -> tuple[Node, Node] | None:
    """``index(w, [perm])`` with ``w`` 1-D float of S elements: (w, gather)."""
    found = []
    for g in perm.users:
        if is_op(g, aten.index.Tensor) and g.args[0] is not perm and list(g.args[1]) == [perm]:
            wv = val(g.args[0])
            if wv is not None and wv.dim() == 1 and wv.dtype in _FLOATS and _same(wv.shape[0], s):
                found.append((g.args[0], g))
    return _one(found)


def _is_arange(node, s) -> bool:
    """``arange(S)`` as post-grad graphs spell it: ``iota(S, start=0, step=1)``, int64."""
    v = val(node)
    if v is None or v.dtype != torch.int64 or v.dim() != 1 or not _same(v.shape[0], s):
        return False
    if is_op(node, prims.iota.default):
        return node.kwargs.get("start") == 0 and node.kwargs.get("step") == 1
    if is_op(node, aten.arange.default):
        return True
    if is_op(node, aten.arange.start, aten.arange.start_step):
        return node.args[0] == 0 and _arg(node, 2, "step", 1) == 1
    return False


def _inverse(perm: Node, s) -> tuple[Node, set] | None:
    """``index_put(fresh int64 [S], [perm], arange(S))``: (index_put, its private inputs)."""
    found = []
    for p in perm.users:
        if not is_op(p, aten.index_put.default) or list(p.args[1]) != [perm]:
            continue
        base, values, acc = p.args[0], p.args[2], _arg(p, 3, "accumulate", False)
        bv = val(base)
        if acc is not False or not is_op(base, *_FRESH) or len(base.users) != 1 or bv is None:
            continue
        if bv.dtype != torch.int64 or bv.dim() != 1 or not _same(bv.shape[0], s) or not _is_arange(values, s):
            continue
        found.append((p, {base, values}))
    return _one(found)


def _sentinel_where(rows: Node, sorted_ids: Node, e: int) -> tuple[Node, set] | None:
    """``where(unsqueeze(sorted_ids >= E, -1), 0, rows)``, rows' only user (transformers 5.17's mask)."""
    if len(rows.users) != 1:
        return None
    (w,) = rows.users
    if not is_op(w, aten.where.self) or w.args[2] is not rows:
        return None
    cond, zero = w.args[0], w.args[1]
    if not (is_op(cond, aten.unsqueeze.default) and cond.args[1] in (-1, 1)):
        return None
    ge = cond.args[0]
    if not (is_op(ge, aten.ge.Scalar) and ge.args[0] is sorted_ids and ge.args[1] == e):
        return None
    zv = val(zero)
    if not (is_op(zero, aten.full.default) and zv is not None and zv.numel() == 1 and zero.args[1] == 0):
        return None
    wv, rv = val(w), val(rows)
    if wv is None or wv.dtype != rv.dtype or wv.shape != rv.shape:
        return None
    return w, {cond, ge, zero}


@dataclass
class DispatchMatch:
    sort: Node
    ids: Node  # the sort's input, [S]
    hidden: Node  # [T, H]
    weights: Node  # [S]
    num_experts: int
    top_k: int
    zero_sentinel_rows: bool
    replaced: tuple  # (sorted_ids, perm, offsets, inv_perm, rows, weights_sorted): nodes whose values the op gives
    nodes: set  # everything to erase once unused


def match_dispatch(sort: Node) -> DispatchMatch | None:
    if not _sort_ok(sort):
        return None
    sorted_ids = _one([u for u in sort.users if is_getitem(u, sort, 0)])
    perm = _one([u for u in sort.users if is_getitem(u, sort, 1)])
    if sorted_ids is None or perm is None:
        return None
    ids = sort.args[0]
    s = val(ids).shape[0]

    hc = _histc(sorted_ids)
    if hc is None:
        return None
    histc, cast = hc
    e = _histc_bins(histc)
    offsets = _offsets(histc) if e is not None else None
    if offsets is None or _experts_of_gemms(offsets) != {e}:
        return None

    # k: the ids' row length where the sort reads reshape(top_k_index [T, k], [-1]); the gather's divisor
    src = ids.args[0] if is_op(ids, aten.reshape.default, aten.view.default) else None
    sv = val(src)
    divisors = {d.args[1] for d in perm.users
                if is_op(d, aten.div.Tensor_mode, aten.floor_divide.default, aten.floor_divide.Scalar)}
    if len(divisors) != 1:
        return None
    (k,) = divisors
    from ..kernels.moe_dispatch import MAX_TOP_K  # (the kernel's k is a compile-time constant)

    if not _is_int(k) or not 1 <= k <= MAX_TOP_K or (sv is not None and (sv.dim() != 2 or not _same(sv.shape[1], k))):
        return None
    hg = _hidden_gather(perm, k, s)
    wg = _weights_gather(perm, s)
    inv = _inverse(perm, s)
    if hg is None or wg is None or inv is None:
        return None
    hidden, div, rows = hg
    weights, w_sorted = wg
    index_put, inv_inputs = inv

    nodes = {sort, sorted_ids, perm, histc, offsets, div, rows, w_sorted, index_put} | inv_inputs
    if cast is not None:
        nodes.add(cast)
    masked = _sentinel_where(rows, sorted_ids, e)
    if masked is not None:
        rows_out, mask_nodes = masked
        nodes |= mask_nodes | {rows_out}
    else:
        rows_out = rows
    return DispatchMatch(sort, ids, hidden, weights, e, k, masked is not None,
                         (sorted_ids, perm, offsets, index_put, rows_out, w_sorted), nodes)


class MoeDispatch(FusionPass):
    name = "moe_dispatch"
    description = ("grouped_mm expert dispatch: sort, gathers, histc, cumsum, inverse permutation "
                   "(the GEMMs stay), one kernel")

    def find(self, graph: Graph) -> list[DispatchMatch]:
        found = []
        for node in graph.nodes:
            if is_op(node, aten.sort.default, aten.sort.stable):
                m = match_dispatch(node)
                if m is None:
                    log.debug("%s: %s is not transformers' expert dispatch", self.name, node)
                    continue
                found.append(m)
        return found

    def rewrite(self, graph: Graph, m: DispatchMatch) -> None:
        ed = GraphEditor(graph)
        if not ed.hoist_before([m.hidden, m.weights], m.sort):
            log.debug("%s: cannot order the inputs before %s", self.name, m.sort)
            return
        args = [m.ids, m.hidden, m.weights, m.num_experts, m.top_k, m.zero_sentinel_rows]
        outs = ed.call(m.sort, fused_op("moe_dispatch"), args, n_outputs=6)
        for old, new in zip(m.replaced, outs):
            old.replace_all_uses_with(new)
        ed.erase_dead(m.nodes)


__all__ = ["MoeDispatch", "match_dispatch"]

"""Recognisers for the ATen shapes Gemma-4 code lowers to in a post-grad graph.

Each recogniser walks backwards from a candidate output node and returns a small
record of what it found (inputs, constants, every node it consumed) or ``None``.
They check every op, exponent, reduction dim and cast, so a near miss (Gemma-2's
``1 + w`` norm, ``mean`` over another dim, a different exponent) does not match.

They do NOT check that intermediate nodes are private to the pattern: shared
sub-expressions are common after CSE (k_eq_v layers share the k/v upcast and
variance), so each fusion checks closure over the union of what it matched
(:func:`is_closed`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch.fx import Node

aten = torch.ops.aten
prims = torch.ops.prims

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Set when a norm's eps was a graph input (torch.compile(dynamic=True) with
# specialize_float=False lifts module floats); the manager explains it once.
SYMBOLIC_EPS_SEEN = [False]


def val(node) -> torch.Tensor | None:
    """The fake tensor Inductor recorded for ``node`` (None for non-tensors)."""
    if not isinstance(node, Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def dtype_of(node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if v is not None else None


def is_op(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_upcast(node) -> bool:
    return is_op(node, prims.convert_element_type.default) and node.args[1] == torch.float32


def is_cast_to(node, dtype) -> bool:
    return is_op(node, prims.convert_element_type.default) and node.args[1] == dtype


def binary_operands(node, target) -> tuple | None:
    """Both operands of a commutative ``target`` node, or None."""
    if not is_op(node, target) or len(node.args) != 2 or node.kwargs:
        return None
    return node.args


def other_operand(node, target, known) -> object | None:
    """For ``known (op) other`` or ``other (op) known``, return ``other``."""
    ops = binary_operands(node, target)
    if ops is None:
        return None
    a, b = ops
    if a is known:
        return b
    if b is known:
        return a
    return None


def strip_upcast(node) -> tuple[Node, Node | None]:
    """``(source, cast_node)`` for ``convert(source, f32)``; ``(node, None)`` otherwise."""
    if is_upcast(node):
        return node.args[0], node
    return node, None


def last_dim_reduced(node) -> bool:
    """``mean.dim(x, [-1], keepdim=True)`` over the last dim, in any spelling."""
    if not is_op(node, aten.mean.dim):
        return False
    args = list(node.args) + [None] * 3
    dims, keepdim = args[1], node.kwargs.get("keepdim", args[2])
    if node.kwargs.get("dtype") is not None or not keepdim:
        return False
    x = val(node.args[0])
    if x is None or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    return dims[0] in (-1, x.dim() - 1)


@dataclass
class RmsNorm:
    """One Gemma-4 RMSNorm found in the graph: ``y = x * (mean(x^2)+eps)^-0.5 [* w]``."""

    input: Node  # the activation, in io dtype (before the fp32 upcast)
    weight: Node | None  # the weight (before any cast), None for with_scale=False
    eps: float
    output: Node  # the node whose value is the norm's io-dtype result
    io_dtype: torch.dtype
    nodes: set = field(default_factory=set)  # every node this norm consumed, output included
    upcast: Node | None = None  # the fp32 upcast of the input (None for fp32 inputs)


def _match_inv_rms(r: Node, xf: Node) -> tuple[float, set] | None:
    """``r = (mean(xf^2, -1) + eps) ^ -0.5`` (pow or rsqrt), return (eps, nodes)."""
    if is_op(r, aten.pow.Tensor_Scalar):
        if r.args[1] != -0.5:
            return None
    elif not is_op(r, aten.rsqrt.default):
        return None
    a = r.args[0]
    if is_op(a, aten.add.Tensor, aten.add.Scalar) and len(a.args) == 2 and not a.kwargs:
        m, eps = a.args
        if isinstance(m, Node) and is_op(m, aten.mean.dim):
            pass
        elif isinstance(eps, Node) and is_op(eps, aten.mean.dim):
            m, eps = eps, m
        else:
            return None
    else:
        return None
    # eps must be a compile-time float: a symbolic eps (dynamic=True) would be baked in wrongly.
    if not isinstance(eps, (float, int)) or isinstance(eps, bool):
        if isinstance(eps, Node):
            SYMBOLIC_EPS_SEEN[0] = True
        return None
    if not last_dim_reduced(m):
        return None
    sq = m.args[0]
    if is_op(sq, aten.pow.Tensor_Scalar):
        if sq.args[0] is not xf or sq.args[1] != 2:
            return None
    elif is_op(sq, aten.mul.Tensor):
        if sq.args[0] is not xf or sq.args[1] is not xf:
            return None
    else:
        return None
    return float(eps), {r, a, m, sq}


def match_rmsnorm(
    out: Node, *, want_weight: bool | None = None, fp32_input: bool = False
) -> RmsNorm | None:
    """Recognise a Gemma-4 RMSNorm whose io-dtype result is ``out``.

    Accepted (HF ``Gemma4RMSNorm`` and plain ``x.float() * rsqrt(...) * w.float()``):
      out = convert(z, io) if io != fp32 else z
      z   = y * convert(w, f32) | y * w (fp32 w)   [weighted]   or  z = y  [no weight]
      y   = xf * inv,  inv = pow(mean(xf^2,-1,keepdim)+eps, -0.5) | rsqrt(...)
      xf  = convert(x, f32) | x (fp32)
    ``want_weight`` restricts to weighted (True) or weightless (False) norms.  ``fp32_input``
    accepts ONLY a norm whose input is an fp32 value while its output is bf16/fp16 (SGLang's
    residual norm normalises the unrounded fp32 sum); ``input`` is then that fp32 node.
    """
    nodes = set()
    io = dtype_of(out)
    if io not in _FLOAT_DTYPES:
        return None
    z = out
    if io != torch.float32:
        if not is_cast_to(out, io):
            return None
        z = out.args[0]
        nodes.add(out)
        if dtype_of(z) != torch.float32:
            return None
    weight = None
    y = z
    ops = binary_operands(z, aten.mul.Tensor)
    if ops is not None:
        # Either z = y * w (weighted) or z is y = xf * inv itself (no weight).
        for cand_y, cand_w in (ops, ops[::-1]):
            if is_op(cand_y, aten.mul.Tensor) and _split_y(cand_y) is not None and _is_weight(cand_w, z):
                y, weight = cand_y, cand_w
                nodes.add(z)
                break
    if weight is None and want_weight:
        return None
    if weight is not None and want_weight is False:
        return None
    split = _split_y(y)
    if split is None:
        return None
    xf, inv = split
    found = _match_inv_rms(inv, xf)
    if found is None:
        return None
    eps, inv_nodes = found
    nodes |= inv_nodes
    nodes.add(y)
    x, upcast = strip_upcast(xf)
    if fp32_input:
        if io == torch.float32 or upcast is not None:
            return None
        x = xf
    elif upcast is not None:
        nodes.add(upcast)
        if dtype_of(x) != io:
            return None
    elif io != torch.float32 or dtype_of(x) != torch.float32:
        return None
    w_src = None
    if weight is not None:
        w_src, w_cast = strip_upcast(weight)
        if w_cast is not None:
            nodes.add(w_cast)
        wv = val(w_src)
        if wv is None or wv.dim() != 1 or wv.dtype not in _FLOAT_DTYPES:
            return None
    return RmsNorm(input=x, weight=w_src, eps=eps, output=out, io_dtype=io, nodes=nodes, upcast=upcast)


def _split_y(y: Node) -> tuple[Node, Node] | None:
    """``y = xf * inv``: return (xf, inv) with inv the inverse-rms node."""
    ops = binary_operands(y, aten.mul.Tensor)
    if ops is None:
        return None
    for xf, inv in (ops, ops[::-1]):
        if is_op(inv, aten.pow.Tensor_Scalar, aten.rsqrt.default) and isinstance(xf, Node):
            xv, iv = val(xf), val(inv)
            if xv is None or iv is None or xv.dtype != torch.float32:
                continue
            if iv.dim() == xv.dim() and iv.shape[-1] == 1:
                return xf, inv
    return None


def _is_weight(w, z: Node) -> bool:
    """``w`` is a 1-D fp32 vector over the last dim (the cast of a weight, or an fp32 weight).

    Rejects ``1 + w`` (Gemma-2/3 norms): that is an add node, not a weight source.
    """
    if not isinstance(w, Node):
        return False
    src, cast = strip_upcast(w)
    wv, zv = val(src), val(z)
    if zv is None or zv.dtype != torch.float32:
        return False
    # an uncast bf16/fp16 weight is promoted to fp32 by the multiply (SGLang's RMSNorm): the
    # same product as ``w.float()``
    if wv is None or wv.dim() != 1 or wv.dtype not in _FLOAT_DTYPES:
        return False
    if src.op == "call_function" and not is_op(src, aten.reshape.default, aten.view.default):
        # Weights are graph inputs (placeholders / get_attr); computed vectors such as
        # ``1 + w`` are a different function and must not match.
        return False
    return wv.shape[0] == zv.shape[-1]


def rmsnorm_consumers(x: Node) -> list[RmsNorm]:
    """All RMSNorms that read ``x`` (through its fp32 upcast when x is bf16/fp16)."""
    found = []
    seen = set()
    starts = [x] + [u for u in x.users if is_upcast(u)]
    for s in starts:
        for u in s.users:
            for out in candidate_outputs(u):
                if out in seen:
                    continue
                n = match_rmsnorm(out)
                if n is not None and n.input is x:
                    seen.add(out)
                    found.append(n)
    # In fp32 a weighted norm's inner ``x * inv`` is itself a weightless norm's output:
    # it counts as a norm of its own only if something outside the other norms reads it.
    def inner_only(n: RmsNorm) -> bool:
        others = [o for o in found if o is not n and n.output in o.nodes]
        if not others:
            return False
        inside = set().union(*(o.nodes for o in others))
        return all(u in inside for u in n.output.users)

    return [n for n in found if not inner_only(n)]


def candidate_outputs(start: Node, depth: int = 6) -> Iterable[Node]:
    """Nodes reachable from ``start`` within a few steps: the possible norm outputs."""
    frontier, seen = [start], {start}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            yield n
            for u in n.users:
                if u not in seen and u.op == "call_function":
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    yield from frontier


def is_closed(nodes: set, outputs: Iterable[Node]) -> bool:
    """Every matched node except ``outputs`` is used only inside the match."""
    outs = set(outputs)
    for n in nodes:
        if n in outs:
            continue
        if any(u not in nodes for u in n.users):
            return False
    return True


def is_getitem(node, src, idx) -> bool:
    return is_op(node, operator.getitem) and node.args[0] is src and node.args[1] == idx

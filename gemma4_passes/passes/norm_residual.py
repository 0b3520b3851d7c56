"""Gemma-4's norm-BEFORE-residual layer epilogues.

Gemma-4 norms a sub-block's output and THEN adds it to the residual:

  post_attn_norm:  r = residual + rms(attn, w1);            out = rms(r, w2)
                   (also SGLang's fp32 form: out = rms(unrounded fp32 sum, w2))
  ffn_tail:        x = (residual + rms(mlp, w)) * scalar;   out = rms(x, w_next)   [next may be absent]
  ple_tail:        x = (r + rms(ple_proj, w)) * scalar;     out = rms(x, w_next)   (E2B/E4B)

Each becomes one ``gemma4_passes`` kernel that keeps the row in registers and
returns both the new residual and the next norm's output. ``ffn_tail`` and
``ple_tail`` are the same math; they are told apart by the residual they add:
the FFN tail adds the post-attention residual (which also feeds the
pre-feedforward norm), the PLE tail adds the FFN tail's result (which feeds
only the PLE gate GEMM and this add).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fused_op, log
from .graph_match import (
    RmsNorm,
    binary_operands,
    candidate_outputs,
    dtype_of,
    is_cast_to,
    is_closed,
    is_getitem,
    is_op,
    is_upcast,
    match_rmsnorm,
    rmsnorm_consumers,
    val,
)

aten = torch.ops.aten
prims = torch.ops.prims


@dataclass
class NormAdd:
    """``add = residual + rms(x, w)`` (either operand order)."""

    norm: RmsNorm
    residual: Node
    add: Node


def match_norm_add(add: Node) -> NormAdd | None:
    ops = binary_operands(add, aten.add.Tensor)
    if ops is None:
        return None
    for residual, normed in (ops, ops[::-1]):
        if not isinstance(normed, Node) or not isinstance(residual, Node):
            continue
        n = match_rmsnorm(normed, want_weight=True)
        if n is None:
            continue
        # ``rms(a) + rms(b)`` is the MoE branch combine (a sum of two normed branches), not
        # a residual add: that is the MoE branch-norm fusion's shape, left alone here.
        if match_rmsnorm(residual) is not None:
            continue
        rv, av, nv = val(residual), val(add), val(normed)
        # same dtype and shape: no promotion, no broadcasting hidden in the add
        if rv is None or rv.dtype != n.io_dtype or av.dtype != n.io_dtype:
            continue
        if tuple(rv.shape) != tuple(av.shape) or tuple(nv.shape) != tuple(av.shape):
            continue
        return NormAdd(n, residual, add)
    return None


@dataclass
class Scale:
    """``out = x * scalar`` with a one-element tensor (``layer_scalar``), maybe cast back."""

    scalar: Node
    out: Node
    nodes: set


def match_scale(x: Node) -> Scale | None:
    """``x``'s one user multiplies it by a one-element tensor."""
    if len(x.users) != 1:
        return None
    (mul,) = x.users
    ops = binary_operands(mul, aten.mul.Tensor)
    if ops is None:
        return None
    scalar = ops[1] if ops[0] is x else ops[0]
    sv, xv = val(scalar), val(x)
    if sv is None or sv.numel() != 1 or sv.dim() > 1 or sv.dtype not in (torch.float32, xv.dtype):
        return None
    mv = val(mul)
    if tuple(mv.shape) != tuple(xv.shape):
        return None
    if mv.dtype == xv.dtype:
        return Scale(scalar, mul, {mul})
    # bf16 activations times an fp32 buffer promote: the in-place ``*=`` casts back.
    if len(mul.users) == 1:
        (cast,) = mul.users
        if is_cast_to(cast, xv.dtype):
            return Scale(scalar, cast, {mul, cast})
    return None


def single_next_norm(x: Node) -> RmsNorm | None:
    """The one weighted RMSNorm reading ``x``; None if there is none or several."""
    norms = rmsnorm_consumers(x)
    if len(norms) != 1 or norms[0].weight is None:
        return None
    return norms[0]


def residual_feeds_a_norm(residual: Node) -> bool:
    """The residual is a post-attention residual: the pre-feedforward norm reads it."""
    if rmsnorm_consumers(residual):
        return True
    if not is_op(residual, operator.getitem):
        return False
    src = residual.args[0]
    return is_op(src, fused_op("rmsnorm_add_rmsnorm")) and is_getitem(residual, src, 1)


def _inductor_faster(add: Node) -> bool:
    """Static shapes where Inductor's own fusion of the epilogue measured faster than ours."""
    from ..kernels.norm_residual import prefer_inductor

    v = val(add)
    n, numel = v.shape[-1], v.numel()
    if not isinstance(n, int) or not isinstance(numel, int) or n == 0:
        return False  # symbolic (dynamic=True): no guard on the size is added here
    return prefer_inductor(numel // n, n)


@dataclass
class EpilogueMatch:
    norm_add: NormAdd
    scale: Scale | None
    next_norm: RmsNorm | None
    nodes: set

    @property
    def residual_out(self) -> Node:
        return self.scale.out if self.scale else self.norm_add.add


class _EpilogueFusion(FusionPass):
    """Shared find/rewrite for the three epilogue sites."""

    scaled: bool = False

    def classify(self, m: EpilogueMatch) -> bool:
        return True

    def find(self, graph: Graph) -> list[EpilogueMatch]:
        matches, taken = [], set()
        for node in graph.nodes:
            na = match_norm_add(node)
            if na is None:
                continue
            m = self._extend(na)
            if m is None or not self.classify(m) or m.nodes & taken:
                continue
            if _inductor_faster(na.add):
                log.debug("%s: %s left to Inductor (faster at this shape)", self.name, node)
                continue
            outputs = [m.residual_out] + ([m.next_norm.output] if m.next_norm else [])
            if not is_closed(m.nodes, outputs):
                log.debug("%s: %s has users outside the pattern", self.name, node)
                continue
            taken |= m.nodes
            matches.append(m)
        return matches

    def _extend(self, na: NormAdd) -> EpilogueMatch | None:
        nodes = set(na.norm.nodes) | {na.add}
        scale = None
        if self.scaled:
            scale = match_scale(na.add)
            if scale is None:
                return None
            nodes |= scale.nodes
            tail = scale.out
        else:
            tail = na.add
        next_norm = single_next_norm(tail)
        if next_norm is not None and not (next_norm.nodes & nodes):
            nodes |= next_norm.nodes
        else:
            next_norm = None
        if not self.scaled and next_norm is None:
            return None  # post-attention needs its next norm: rms + add alone is Inductor's job
        return EpilogueMatch(na, scale, next_norm, nodes)

    def rewrite(self, graph: Graph, m: EpilogueMatch) -> None:
        ed = GraphEditor(graph)
        na, n1, n2 = m.norm_add, m.norm_add.norm, m.next_norm
        scalar = m.scale.scalar if m.scale else None
        anchor = na.add
        inputs = [n1.input, na.residual, n1.weight, scalar] + ([n2.weight] if n2 else [])
        if not ed.precedes_all(inputs, anchor):
            log.debug("%s: inputs defined after %s, skipped", self.name, anchor)
            return
        if n2 is not None:
            normed, residual_out = ed.call(
                anchor,
                fused_op("rmsnorm_add_rmsnorm"),
                [n1.input, na.residual, n1.weight, scalar, n2.weight, n1.eps, n2.eps],
                n_outputs=2,
            )
            n2.output.replace_all_uses_with(normed)
        else:
            (residual_out,) = ed.call(anchor, fused_op("rmsnorm_add"), [n1.input, na.residual, n1.weight, scalar, n1.eps])
        m.residual_out.replace_all_uses_with(residual_out)
        ed.erase_dead(m.nodes)


@dataclass
class Fp32SumMatch:
    """SGLang's post-attention site: ``RMSNorm.forward_native(h, residual)`` after ``h = rms(attn)``.

    ``s = f32(rms(attn, w1)) + f32(residual)``; ``residual_out = round(s)``; ``out = rms(s, w2)``
    with the second norm reading the UNROUNDED fp32 sum ``s`` (io dtype bf16/fp16 only: in fp32
    this is the plain form above).
    """

    norm: RmsNorm
    residual: Node
    residual_upcast: Node
    add: Node
    residual_out: Node
    next_norm: RmsNorm
    nodes: set


def match_fp32_sum_norm_add(add: Node) -> Fp32SumMatch | None:
    ops = binary_operands(add, aten.add.Tensor)
    if ops is None or dtype_of(add) != torch.float32:
        return None
    for n_up, r_up in (ops, ops[::-1]):
        if not (is_upcast(n_up) and is_upcast(r_up)):
            continue
        norm = match_rmsnorm(n_up.args[0], want_weight=True)
        residual = r_up.args[0]
        if norm is None or norm.io_dtype == torch.float32 or match_rmsnorm(residual) is not None:
            continue
        rv, av = val(residual), val(add)
        if rv is None or rv.dtype != norm.io_dtype or tuple(rv.shape) != tuple(av.shape):
            continue
        if tuple(val(norm.output).shape) != tuple(av.shape):
            continue
        casts = [u for u in add.users if is_cast_to(u, norm.io_dtype)]
        nexts = [
            m for u in add.users for m in [match_rmsnorm(o, want_weight=True, fp32_input=True)
                                           for o in _norm_outputs_from(u)]
            if m is not None and m.input is add and m.io_dtype == norm.io_dtype
        ]
        uniq = {id(m.output): m for m in nexts}
        if len(casts) != 1 or len(uniq) != 1:
            continue
        (next_norm,) = uniq.values()
        nodes = set(norm.nodes) | {n_up, add, casts[0]} | next_norm.nodes
        return Fp32SumMatch(norm, residual, r_up, add, casts[0], next_norm, nodes)
    return None


def _norm_outputs_from(start: Node):
    """Casts to a low-precision dtype reachable from ``start``: candidate norm outputs."""
    for n in candidate_outputs(start, 5):
        if is_op(n, prims.convert_element_type.default) and n.args[1] != torch.float32:
            yield n


class PostAttnNorm(_EpilogueFusion):
    name = "post_attn_norm"
    description = "rms(attn, w1) + residual -> rms(., w2): normed and new residual in one kernel"
    scaled = False

    def find(self, graph: Graph) -> list:
        matches = super().find(graph)
        taken = set().union(*(m.nodes for m in matches)) if matches else set()
        for node in graph.nodes:
            m = match_fp32_sum_norm_add(node)
            if m is None or m.nodes & taken or _inductor_faster(m.add):
                continue
            # the residual's upcast may be shared (CSE); it is erased only if nothing else reads it
            if not is_closed(m.nodes, [m.residual_out, m.next_norm.output]):
                log.debug("%s: fp32-sum site %s has users outside the pattern", self.name, node)
                continue
            taken |= m.nodes | {m.residual_upcast}
            matches.append(m)
        return matches

    def rewrite(self, graph: Graph, m) -> None:
        if not isinstance(m, Fp32SumMatch):
            return super().rewrite(graph, m)
        ed = GraphEditor(graph)
        n1, n2 = m.norm, m.next_norm
        inputs = [n1.input, m.residual, n1.weight, n2.weight]
        if not ed.precedes_all(inputs, m.add):
            log.debug("%s: inputs defined after %s, skipped", self.name, m.add)
            return
        normed, residual_out = ed.call(
            m.add,
            fused_op("rmsnorm_add_rmsnorm"),
            [n1.input, m.residual, n1.weight, None, n2.weight, n1.eps, n2.eps, True],
            n_outputs=2,
        )
        n2.output.replace_all_uses_with(normed)
        m.residual_out.replace_all_uses_with(residual_out)
        ed.erase_dead(m.nodes | {m.residual_upcast})


class FfnTail(_EpilogueFusion):
    name = "ffn_tail"
    description = "(rms(mlp, w) + residual) * layer_scalar -> next input norm, one kernel"
    scaled = True

    def classify(self, m: EpilogueMatch) -> bool:
        return residual_feeds_a_norm(m.norm_add.residual)


class PleTail(_EpilogueFusion):
    name = "ple_tail"
    description = "(rms(ple_proj, w) + residual) * layer_scalar -> next input norm, one kernel"
    scaled = True

    def classify(self, m: EpilogueMatch) -> bool:
        return not residual_feeds_a_norm(m.norm_add.residual)

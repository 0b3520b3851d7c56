"""Plain-torch references for the fused Gemma-4 kernels.

Each function rounds to the activation ("io") dtype at exactly the points where the
unfused eager HF code does (one rounding per eager op), and does all arithmetic in
fp32, so on CPU it is bit-identical to the literal HF expressions:

* RMSNorm (Gemma-4 form, weight is used as ``w``, NOT ``1 + w``)::

      y = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + eps, -0.5)
      y = y * w.float()            # only when the norm has a weight
      y = y.type_as(x)             # one rounding

* residual add / layer scalar: ``residual + h`` and ``h * scalar`` in the io dtype
  (each = fp32 op, then one rounding).
* ``F.gelu(gate, approximate="tanh") * other`` (two roundings).
* RoPE: ``q * cos + rotate_half(q) * sin`` in the io dtype (three roundings).

These are the CPU implementations of the ``gemma4_passes::*`` custom ops
(:mod:`gemma4_passes.kernels.ops`) and the oracle the Triton kernels are tested
against.  Outputs are always fresh, contiguous tensors with the shape and dtype of
the primary activation input.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm_ref",
    "rmsnorm_add_ref",
    "rmsnorm_add_rmsnorm_ref",
    "gelu_tanh_mul_ref",
    "rope_ref",
    "q_norm_rope_ref",
    "qkv_norm_rope_ref",
    "moe_input_norms_ref",
    "moe_branch_combine_ref",
    "moe_router_ref",
    "moe_dispatch_ref",
]


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast an fp32 tensor to the io dtype and back (identity for fp32)."""
    return t.to(dtype).float()


def rms_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """Gemma-4 RMSNorm over the last dim, result in ``x.dtype`` (HF's exact op order)."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def rmsnorm_add_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor],
    eps: float,
) -> torch.Tensor:
    """``round(residual + rms(x, weight))``, then ``round(s * scalar)`` if a scalar is given."""
    dt = x.dtype
    n = rms_norm_ref(x, weight, eps)
    s = _round(residual.float() + n.float(), dt)
    if scalar is not None:
        s = _round(s * scalar.float().reshape(()), dt)
    return s.to(dt).contiguous()


def rmsnorm_add_rmsnorm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor],
    next_weight: Optional[torch.Tensor],
    eps: float,
    next_eps: float,
    unrounded_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms(residual_out, next_weight), residual_out)``; the second norm reads the ROUNDED sum.

    ``unrounded_sum`` (no scalar): SGLang's ``RMSNorm.forward_native(x, residual)`` form, where the
    add is done on fp32 upcasts and the second norm reads that fp32 sum before it is rounded.
    """
    if not unrounded_sum:
        residual_out = rmsnorm_add_ref(x, residual, weight, scalar, eps)
        normed = rms_norm_ref(residual_out, next_weight, next_eps).contiguous()
        return normed, residual_out
    if scalar is not None:
        raise ValueError("unrounded_sum=True takes no scalar")
    dt = x.dtype
    s = residual.float() + rms_norm_ref(x, weight, eps).float()
    normed = rms_norm_ref(s, next_weight, next_eps).to(dt).contiguous()
    return normed, s.to(dt).contiguous()


def gelu_tanh_mul_ref(gate: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``round(round(gelu_tanh(gate)) * other)`` -- i.e. eager ``F.gelu(g, approximate="tanh") * other``.

    ``F.gelu`` computes in fp32 and rounds once, for every io dtype, on CPU and CUDA.
    """
    dt = gate.dtype
    g = F.gelu(gate, approximate="tanh")
    return (g.float() * other.float()).to(dt).contiguous()


def rope_ref(n: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF ``n * cos + rotate_half(n) * sin`` on [B, S, H, D] with cos/sin [B, S, D] (unsqueezed at dim 2)."""
    dt = n.dtype
    half = n.shape[-1] // 2
    nf = n.float()
    c = cos.float().unsqueeze(2)
    s = sin.float().unsqueeze(2)
    rot = torch.cat((-nf[..., half:], nf[..., :half]), dim=-1)
    return _round(_round(nf * c, dt) + _round(rot * s, dt), dt).to(dt)


def q_norm_rope_ref(
    q: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return rope_ref(rms_norm_ref(q, weight, eps), cos, sin).contiguous()


def qkv_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_eps: float,
    k_eps: float,
    v_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_out = q_norm_rope_ref(q, q_weight, cos, sin, q_eps)
    k_out = q_norm_rope_ref(k, k_weight, cos, sin, k_eps)
    v_out = rms_norm_ref(v, None, v_eps).contiguous()
    return q_out, k_out, v_out


def moe_input_norms_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    pre_weight: torch.Tensor,
    pre2_weight: torch.Tensor,
    router_scale: torch.Tensor,
    root: float,
    eps: float,
    pre_eps: float,
    pre2_eps: float,
    router_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MoE layer's post-attention epilogue: ``(s, rms(s, w_pre), rms(s, w_pre2), router_in)``
    with ``s = residual + rms(x, w)`` and ``router_in = rms(s) * router_scale * root`` (each
    product rounded, as the eager bf16 multiplies are)."""
    dt = x.dtype
    s = rmsnorm_add_ref(x, residual, weight, None, eps)
    pre = rms_norm_ref(s, pre_weight, pre_eps).contiguous()
    pre2 = rms_norm_ref(s, pre2_weight, pre2_eps).contiguous()
    r = rms_norm_ref(s, None, router_eps)
    r = _round(r.float() * router_scale.float(), dt)
    r = (r * root).to(dt).contiguous()
    return s, pre, pre2, r


def moe_branch_combine_ref(
    h1: torch.Tensor,
    h2: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    scalar: Optional[torch.Tensor],
    next_weight: Optional[torch.Tensor],
    eps1: float,
    eps2: float,
    eps3: float,
    next_eps: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE layer's branch combine: ``(normed, s)`` with ``h = rms(h1, w1) + rms(h2, w2)``,
    ``s = (residual + rms(h, w3)) [* scalar]`` and ``normed = rms(s, next_weight, next_eps)``
    (an empty tensor when ``next_eps`` is None)."""
    dt = h1.dtype
    h = (rms_norm_ref(h1, w1, eps1).float() + rms_norm_ref(h2, w2, eps2).float()).to(dt)
    s = rmsnorm_add_ref(h, residual, w3, scalar, eps3)
    if next_eps is None:
        return h1.new_empty(0), s
    return rms_norm_ref(s, next_weight, next_eps).contiguous(), s


def moe_router_ref(
    logits: torch.Tensor,
    per_expert_scale: torch.Tensor,
    top_k: int,
    form: str = "softmax_topk",
    ids_dtype: torch.dtype = torch.int64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gemma-4 MoE router after its projection: ``(weights fp32 [T, k], ids [T, k])``.

    ``form="softmax_topk"`` is transformers' Gemma4TextRouter (softmax over all E in fp32, top-k,
    renormalise); ``form="topk_softmax"`` is SGLang's torch fallback / vLLM's torch path (top-k of
    the logits, softmax over the k in fp32).  Both then scale by ``per_expert_scale[ids]``
    (upcast to fp32).  Ties follow ``torch.topk`` (see :mod:`gemma4_passes.kernels.moe_router`).
    """
    if form == "softmax_topk":
        p = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(p, top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
    elif form == "topk_softmax":
        v, ids = torch.topk(logits, top_k, dim=-1)
        w = torch.softmax(v.float(), dim=-1)
    else:
        raise ValueError(f"form must be 'softmax_topk' or 'topk_softmax', got {form!r}")
    w = w * per_expert_scale.reshape(-1)[ids].float()
    return w.contiguous(), ids.to(ids_dtype).contiguous()


def moe_dispatch_ref(
    expert_ids: torch.Tensor,
    hidden: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    num_experts: int,
    top_k: int,
    zero_sentinel_rows: bool = False,
) -> tuple:
    """The index work of transformers' grouped_mm expert dispatch, ties in original order.

    Returns ``(sorted_ids, perm, offsets, inv_perm, hidden_sorted, weights_sorted)``:
    ``sort(ids, stable=True)``; ``cumsum(histc(ids, bins=E, min=0, max=E-1), dtype=int32)``
    (ids outside ``[0, E)`` counted nowhere); the inverse permutation; ``hidden[perm // top_k]``
    (rows of ids ``>= E`` zeroed if ``zero_sentinel_rows``) and ``weights[perm]`` (None where the
    input is None).  See :mod:`gemma4_passes.kernels.moe_dispatch`.
    """
    ids = expert_ids.reshape(-1)
    sorted_ids, perm = torch.sort(ids, stable=True)
    # histc's bins hold the ids 0..E-1 (integers, bin width (E-1)/E); cumulated: #ids in [0, e]
    experts = torch.arange(num_experts, dtype=ids.dtype, device=ids.device)
    upto = torch.searchsorted(sorted_ids, experts, right=True)
    negative = torch.searchsorted(sorted_ids, experts[:1] * 0)
    offsets = (upto - negative).to(torch.int32)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.numel(), device=ids.device)
    rows = None
    if hidden is not None:
        rows = hidden[perm // top_k]
        if zero_sentinel_rows:
            rows = rows.masked_fill((sorted_ids >= num_experts)[:, None], 0)
        rows = rows.contiguous()
    w = weights.reshape(-1)[perm].contiguous() if weights is not None else None
    return sorted_ids.contiguous(), perm.contiguous(), offsets.contiguous(), inv_perm, rows, w

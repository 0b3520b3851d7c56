"""``torch.library`` custom ops (namespace ``gemma4_passes``) over the fused Gemma-4 kernels.

Schemas (plus ``allreduce_rmsnorm_add`` / ``allreduce_rmsnorm_add_rmsnorm``: the same epilogues after
a sum over a c10d process group, ``..., str group_name``)::

    gemma4_passes::rmsnorm_add(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, float eps) -> Tensor
    gemma4_passes::rmsnorm_add_rmsnorm(Tensor x, Tensor residual, Tensor weight, Tensor? scalar,
        Tensor? next_weight, float eps, float next_eps, bool unrounded_sum=False)
        -> (Tensor normed, Tensor residual_out)
    gemma4_passes::gelu_tanh_mul(Tensor gate, Tensor other) -> Tensor
    gemma4_passes::q_norm_rope(Tensor q, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor
    gemma4_passes::qkv_norm_rope(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight,
        Tensor cos, Tensor sin, float q_eps, float k_eps, float v_eps) -> (Tensor, Tensor, Tensor)
    gemma4_passes::moe_input_norms(Tensor x, Tensor residual, Tensor weight, Tensor pre_weight,
        Tensor pre2_weight, Tensor router_scale, float root, float eps, float pre_eps, float pre2_eps,
        float router_eps) -> (Tensor residual_out, Tensor pre, Tensor pre2, Tensor router_in)
    gemma4_passes::moe_branch_combine(Tensor h1, Tensor h2, Tensor residual, Tensor w1, Tensor w2,
        Tensor w3, Tensor? scalar, Tensor? next_weight, float eps1, float eps2, float eps3,
        float? next_eps) -> (Tensor normed, Tensor residual_out)     (normed empty if no next_eps)
    gemma4_passes::moe_router(Tensor logits, Tensor per_expert_scale, int top_k, bool topk_first=False)
        -> (Tensor weights, Tensor ids)
    gemma4_passes::moe_dispatch(Tensor expert_ids, Tensor hidden, Tensor weights, int num_experts, int top_k,
        bool zero_sentinel_rows=False) -> (Tensor sorted_ids, Tensor perm, Tensor offsets, Tensor inv_perm,
        Tensor hidden_sorted, Tensor weights_sorted)

All are functional (no mutation, fresh outputs, never aliasing an input).  Every output is a
contiguous tensor with the shape of the primary input (x / gate / q / k / v) and its dtype; the
fake (meta) implementations return exactly those shapes and strides.  Exception: ``moe_router``
(the MoE router after its projection, logits [T, E]) returns contiguous fp32 ``weights`` and int64
``ids``, both [T, top_k]; ``topk_first=False`` is transformers' order (softmax over E, top-k,
renormalise), ``True`` SGLang's / vLLM's torch order (top-k of the logits, softmax over the k); its
CUDA kernel takes E <= 512 and top_k <= 16 (ties: lowest index first).  ``moe_dispatch`` (the
index work of transformers' grouped_mm experts: flat ids [S], hidden [S / top_k, H], weights [S])
returns the stable sort of the ids (their dtype) and its int64 permutation, int32 offsets [E]
(``cumsum(histc(ids, E, 0, E - 1))``), the int64 inverse permutation, ``hidden[perm // top_k]``
[S, H] and ``weights[perm]`` [S], all contiguous; one launch on CUDA.  The default
implementation (CPU and any other device) is the plain-torch reference
(:mod:`gemma4_passes.kernels.reference`); on CUDA the Triton launchers run.

Registration happens on import and is idempotent: :func:`ensure_registered` (and re-importing or
reloading this module) skips every op that already exists.
"""

import contextlib
from typing import Optional

import torch

from . import reference as _ref

NAMESPACE = "gemma4_passes"
OP_NAMES = ("rmsnorm_add", "rmsnorm_add_rmsnorm", "gelu_tanh_mul", "q_norm_rope", "qkv_norm_rope",
            "moe_input_norms", "moe_branch_combine", "moe_router", "moe_dispatch", "allreduce_rmsnorm_add",
            "allreduce_rmsnorm_add_rmsnorm", "allreduce_moe_branch_combine")

try:  # the CUDA implementations need Triton; without it the reference serves every device
    from .gelu_mul import gelu_tanh_mul_triton
    from .norm_residual import rmsnorm_add_rmsnorm_triton, rmsnorm_add_triton
    from .moe_norms import moe_branch_combine_triton, moe_input_norms_triton
    from .moe_router import moe_router_triton
    from .moe_dispatch import moe_dispatch_triton
    from .qkv_norm_rope import q_norm_rope_triton, qkv_norm_rope_triton
    from .allreduce_dispatch import oneshot_workspace
    from .oneshot_allreduce import oneshot_allreduce_norm

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency of the package
    HAVE_TRITON = False

__all__ = ["NAMESPACE", "OP_NAMES", "HAVE_TRITON", "ensure_registered", "is_registered"]


def is_registered(name: str) -> bool:
    """Whether ``gemma4_passes::<name>`` exists in the dispatcher."""
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def _device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's one if it is not."""
    idx = t.device.index
    if idx is not None and idx != torch.cuda.current_device():
        return torch.cuda.device(idx)
    return contextlib.nullcontext()


def _empty_like_contig(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


# ---- rmsnorm_add ------------------------------------------------------------------------------


def _rmsnorm_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, scalar: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    return _ref.rmsnorm_add_ref(x, residual, weight, scalar, eps)


def _rmsnorm_add_fake(x, residual, weight, scalar, eps):
    return _empty_like_contig(x)


def _rmsnorm_add_cuda(x, residual, weight, scalar, eps):
    with _device_of(x):
        return rmsnorm_add_triton(x, residual, weight, scalar, eps)


# ---- rmsnorm_add_rmsnorm ----------------------------------------------------------------------


def _rmsnorm_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    scalar: Optional[torch.Tensor],
    next_weight: Optional[torch.Tensor],
    eps: float,
    next_eps: float,
    unrounded_sum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ref.rmsnorm_add_rmsnorm_ref(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum)


def _rmsnorm_add_rmsnorm_fake(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum=False):
    if unrounded_sum and scalar is not None:
        raise ValueError("unrounded_sum=True takes no scalar")
    return _empty_like_contig(x), _empty_like_contig(x)


def _rmsnorm_add_rmsnorm_cuda(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum=False):
    with _device_of(x):
        return rmsnorm_add_rmsnorm_triton(
            x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum=unrounded_sum
        )


# ---- gelu_tanh_mul ----------------------------------------------------------------------------


def _gelu_tanh_mul(gate: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return _ref.gelu_tanh_mul_ref(gate, other)


def _gelu_tanh_mul_fake(gate, other):
    return _empty_like_contig(gate)


def _gelu_tanh_mul_cuda(gate, other):
    with _device_of(gate):
        return gelu_tanh_mul_triton(gate, other)


# ---- q_norm_rope ------------------------------------------------------------------------------


def _q_norm_rope(
    q: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
) -> torch.Tensor:
    return _ref.q_norm_rope_ref(q, weight, cos, sin, eps)


def _q_norm_rope_fake(q, weight, cos, sin, eps):
    return _empty_like_contig(q)


def _q_norm_rope_cuda(q, weight, cos, sin, eps):
    with _device_of(q):
        return q_norm_rope_triton(q, weight, cos, sin, eps)


# ---- qkv_norm_rope ----------------------------------------------------------------------------


def _qkv_norm_rope(
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
    return _ref.qkv_norm_rope_ref(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps)


def _qkv_norm_rope_fake(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps):
    return _empty_like_contig(q), _empty_like_contig(k), torch.empty(v.shape, dtype=q.dtype, device=v.device)


def _qkv_norm_rope_cuda(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps):
    with _device_of(q):
        return qkv_norm_rope_triton(q, k, v, q_weight, k_weight, cos, sin, q_eps, k_eps, v_eps)


# ---- moe_input_norms / moe_branch_combine -------------------------------------------------------


def _moe_input_norms(x, residual, weight, pre_weight, pre2_weight, router_scale, root, eps, pre_eps, pre2_eps,
                     router_eps):
    return _ref.moe_input_norms_ref(x, residual, weight, pre_weight, pre2_weight, router_scale, root, eps,
                                    pre_eps, pre2_eps, router_eps)


def _moe_input_norms_fake(x, residual, weight, pre_weight, pre2_weight, router_scale, root, eps, pre_eps,
                          pre2_eps, router_eps):
    return tuple(_empty_like_contig(x) for _ in range(4))


def _moe_input_norms_cuda(x, residual, weight, pre_weight, pre2_weight, router_scale, root, eps, pre_eps,
                          pre2_eps, router_eps):
    with _device_of(x):
        return moe_input_norms_triton(x, residual, weight, pre_weight, pre2_weight, router_scale, root, eps,
                                      pre_eps, pre2_eps, router_eps)


def _moe_branch_combine(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3, next_eps):
    return _ref.moe_branch_combine_ref(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3,
                                       next_eps)


def _moe_branch_combine_fake(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3, next_eps):
    normed = _empty_like_contig(h1) if next_eps is not None else h1.new_empty(0)
    return normed, _empty_like_contig(h1)


def _moe_branch_combine_cuda(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3, next_eps):
    with _device_of(h1):
        return moe_branch_combine_triton(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3,
                                         next_eps)


# ---- moe_router -------------------------------------------------------------------------------


def _router_form(topk_first: bool) -> str:
    return "topk_softmax" if topk_first else "softmax_topk"


def _moe_router(
    logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int, topk_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ref.moe_router_ref(logits, per_expert_scale, top_k, _router_form(topk_first))


def _moe_router_fake(logits, per_expert_scale, top_k, topk_first=False):
    shape = (logits.shape[0], top_k)
    return (
        torch.empty(shape, dtype=torch.float32, device=logits.device),
        torch.empty(shape, dtype=torch.int64, device=logits.device),
    )


def _moe_router_cuda(logits, per_expert_scale, top_k, topk_first=False):
    with _device_of(logits):
        return moe_router_triton(logits, per_expert_scale, top_k, _router_form(topk_first))


# ---- moe_dispatch -----------------------------------------------------------------------------


def _moe_dispatch(expert_ids, hidden, weights, num_experts, top_k, zero_sentinel_rows=False):
    return _ref.moe_dispatch_ref(expert_ids, hidden, weights, num_experts, top_k, zero_sentinel_rows)


def _moe_dispatch_fake(expert_ids, hidden, weights, num_experts, top_k, zero_sentinel_rows=False):
    s, dev = expert_ids.numel(), expert_ids.device
    return (
        torch.empty((s,), dtype=expert_ids.dtype, device=dev),
        torch.empty((s,), dtype=torch.int64, device=dev),
        torch.empty((num_experts,), dtype=torch.int32, device=dev),
        torch.empty((s,), dtype=torch.int64, device=dev),
        torch.empty((s, hidden.shape[-1]), dtype=hidden.dtype, device=dev),
        torch.empty((s,), dtype=weights.dtype, device=dev),
    )


def _moe_dispatch_cuda(expert_ids, hidden, weights, num_experts, top_k, zero_sentinel_rows=False):
    with _device_of(expert_ids):
        return moe_dispatch_triton(expert_ids, hidden, weights, num_experts, top_k, zero_sentinel_rows)


# ---- allreduce_rmsnorm_add[_rmsnorm] ------------------------------------------------------------
# The tensor-parallel epilogue: sum x over the process group ``group_name`` (a c10d group name, as
# the graph's ``_c10d_functional.all_reduce`` names it), then the spine's norm/residual kernel.
# The default implementation is the graph's own all-reduce followed by the fused epilogue (correct
# on any device and world size).  On CUDA, bf16/fp16 calls up to the measured token threshold run
# the one-shot symmetric-memory kernel that does both in one launch (kernels/allreduce_dispatch.py).


def _all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(x, "sum", group_name))


def _allreduce_rmsnorm_add(x, residual, weight, scalar, eps, group_name):
    return rmsnorm_add(_all_reduce_sum(x, group_name), residual, weight, scalar, eps)


def _allreduce_rmsnorm_add_fake(x, residual, weight, scalar, eps, group_name):
    return _empty_like_contig(x)


def _allreduce_rmsnorm_add_rmsnorm(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum,
                                   group_name):
    return tuple(rmsnorm_add_rmsnorm(_all_reduce_sum(x, group_name), residual, weight, scalar, next_weight, eps,
                                     next_eps, unrounded_sum))


def _allreduce_rmsnorm_add_rmsnorm_fake(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum,
                                        group_name):
    return _rmsnorm_add_rmsnorm_fake(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum)


def _allreduce_rmsnorm_add_cuda(x, residual, weight, scalar, eps, group_name):
    ws = oneshot_workspace(x, group_name)
    if ws is None:
        return _allreduce_rmsnorm_add(x, residual, weight, scalar, eps, group_name)
    with _device_of(x):
        return oneshot_allreduce_norm(x, residual, weight, scalar, None, eps, eps, False, ws)[1]


def _allreduce_rmsnorm_add_rmsnorm_cuda(x, residual, weight, scalar, next_weight, eps, next_eps, unrounded_sum,
                                        group_name):
    ws = oneshot_workspace(x, group_name)
    if ws is None:
        return _allreduce_rmsnorm_add_rmsnorm(x, residual, weight, scalar, next_weight, eps, next_eps,
                                              unrounded_sum, group_name)
    with _device_of(x):
        return oneshot_allreduce_norm(x, residual, weight, scalar, next_weight, eps, next_eps, True, ws,
                                      unrounded_sum=unrounded_sum)


# ---- allreduce_moe_branch_combine ---------------------------------------------------------------
# An MoE layer under TP: the dense-MLP (h1) and MoE (h2) partial sums summed over the c10d group
# ``group_name`` in ONE all-reduce (one collective's latency instead of two, on any backend), then
# the branch combine on the two halves.


def _allreduce_moe_branch_combine(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3, next_eps,
                                  group_name):
    c10d = torch.ops._c10d_functional
    n = h1.shape[-1]
    both = c10d.wait_tensor(c10d.all_reduce(torch.cat([h1, h2], dim=-1), "sum", group_name))
    return tuple(moe_branch_combine(both[..., :n], both[..., n:], residual, w1, w2, w3, scalar, next_weight, eps1,
                                    eps2, eps3, next_eps))


def _allreduce_moe_branch_combine_fake(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3,
                                       next_eps, group_name):
    return _moe_branch_combine_fake(h1, h2, residual, w1, w2, w3, scalar, next_weight, eps1, eps2, eps3, next_eps)


_SCHEMAS = {
    "rmsnorm_add": "(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, float eps) -> Tensor",
    "rmsnorm_add_rmsnorm": (
        "(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, Tensor? next_weight, float eps, "
        "float next_eps, bool unrounded_sum=False) -> (Tensor normed, Tensor residual_out)"
    ),
    "gelu_tanh_mul": "(Tensor gate, Tensor other) -> Tensor",
    "q_norm_rope": "(Tensor q, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor",
    "qkv_norm_rope": (
        "(Tensor q, Tensor k, Tensor v, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, "
        "float q_eps, float k_eps, float v_eps) -> (Tensor, Tensor, Tensor)"
    ),
    "allreduce_rmsnorm_add": (
        "(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, float eps, str group_name) -> Tensor"
    ),
    "allreduce_rmsnorm_add_rmsnorm": (
        "(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, Tensor? next_weight, float eps, "
        "float next_eps, bool unrounded_sum, str group_name) -> (Tensor normed, Tensor residual_out)"
    ),
    "moe_input_norms": (
        "(Tensor x, Tensor residual, Tensor weight, Tensor pre_weight, Tensor pre2_weight, Tensor router_scale, "
        "float root, float eps, float pre_eps, float pre2_eps, float router_eps) "
        "-> (Tensor residual_out, Tensor pre, Tensor pre2, Tensor router_in)"
    ),
    "moe_branch_combine": (
        "(Tensor h1, Tensor h2, Tensor residual, Tensor w1, Tensor w2, Tensor w3, Tensor? scalar, "
        "Tensor? next_weight, float eps1, float eps2, float eps3, float? next_eps) "
        "-> (Tensor normed, Tensor residual_out)"
    ),
    "moe_router": (
        "(Tensor logits, Tensor per_expert_scale, int top_k, bool topk_first=False) -> (Tensor weights, Tensor ids)"
    ),
    "moe_dispatch": (
        "(Tensor expert_ids, Tensor hidden, Tensor weights, int num_experts, int top_k, "
        "bool zero_sentinel_rows=False) -> (Tensor sorted_ids, Tensor perm, Tensor offsets, Tensor inv_perm, "
        "Tensor hidden_sorted, Tensor weights_sorted)"
    ),
    "allreduce_moe_branch_combine": (
        "(Tensor h1, Tensor h2, Tensor residual, Tensor w1, Tensor w2, Tensor w3, Tensor? scalar, "
        "Tensor? next_weight, float eps1, float eps2, float eps3, float? next_eps, str group_name) "
        "-> (Tensor normed, Tensor residual_out)"
    ),
}

_SPECS = {
    "rmsnorm_add": (_rmsnorm_add, _rmsnorm_add_fake, "_rmsnorm_add_cuda"),
    "rmsnorm_add_rmsnorm": (_rmsnorm_add_rmsnorm, _rmsnorm_add_rmsnorm_fake, "_rmsnorm_add_rmsnorm_cuda"),
    "gelu_tanh_mul": (_gelu_tanh_mul, _gelu_tanh_mul_fake, "_gelu_tanh_mul_cuda"),
    "q_norm_rope": (_q_norm_rope, _q_norm_rope_fake, "_q_norm_rope_cuda"),
    "qkv_norm_rope": (_qkv_norm_rope, _qkv_norm_rope_fake, "_qkv_norm_rope_cuda"),
    "moe_input_norms": (_moe_input_norms, _moe_input_norms_fake, "_moe_input_norms_cuda"),
    "moe_branch_combine": (_moe_branch_combine, _moe_branch_combine_fake, "_moe_branch_combine_cuda"),
    "moe_router": (_moe_router, _moe_router_fake, "_moe_router_cuda"),
    "moe_dispatch": (_moe_dispatch, _moe_dispatch_fake, "_moe_dispatch_cuda"),
    "allreduce_moe_branch_combine": (_allreduce_moe_branch_combine, _allreduce_moe_branch_combine_fake, None),
    "allreduce_rmsnorm_add": (_allreduce_rmsnorm_add, _allreduce_rmsnorm_add_fake, "_allreduce_rmsnorm_add_cuda"),
    "allreduce_rmsnorm_add_rmsnorm": (
        _allreduce_rmsnorm_add_rmsnorm, _allreduce_rmsnorm_add_rmsnorm_fake, "_allreduce_rmsnorm_add_rmsnorm_cuda"
    ),
}

#: the CustomOpDef objects created by THIS module instance (empty for ops registered earlier)
_OPDEFS: dict = {}


def ensure_registered() -> None:
    """Define every ``gemma4_passes::*`` op not yet in the dispatcher (idempotent, cheap)."""
    for name, (impl, fake, cuda_name) in _SPECS.items():
        if is_registered(name):
            continue
        opdef = torch.library.custom_op(
            f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=_SCHEMAS[name]
        )
        opdef.register_fake(fake)
        if HAVE_TRITON and cuda_name is not None:
            opdef.register_kernel("cuda")(globals()[cuda_name])
        _OPDEFS[name] = opdef


ensure_registered()

rmsnorm_add = torch.ops.gemma4_passes.rmsnorm_add
rmsnorm_add_rmsnorm = torch.ops.gemma4_passes.rmsnorm_add_rmsnorm
gelu_tanh_mul = torch.ops.gemma4_passes.gelu_tanh_mul
q_norm_rope = torch.ops.gemma4_passes.q_norm_rope
qkv_norm_rope = torch.ops.gemma4_passes.qkv_norm_rope
moe_input_norms = torch.ops.gemma4_passes.moe_input_norms
moe_branch_combine = torch.ops.gemma4_passes.moe_branch_combine
moe_router = torch.ops.gemma4_passes.moe_router
moe_dispatch = torch.ops.gemma4_passes.moe_dispatch
allreduce_moe_branch_combine = torch.ops.gemma4_passes.allreduce_moe_branch_combine
allreduce_rmsnorm_add = torch.ops.gemma4_passes.allreduce_rmsnorm_add
allreduce_rmsnorm_add_rmsnorm = torch.ops.gemma4_passes.allreduce_rmsnorm_add_rmsnorm

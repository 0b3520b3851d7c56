"""Fused Triton kernels for Gemma-4 and the ``gemma4_passes::*`` custom ops over them.

Importing this package registers the ops (idempotently; :func:`ensure_registered` does it again
on demand).  Op handles (``OpOverloadPacket``; ``.default`` is the overload graphs hold):

* ``rmsnorm_add_op``          gemma4_passes::rmsnorm_add
* ``rmsnorm_add_rmsnorm_op``  gemma4_passes::rmsnorm_add_rmsnorm
* ``gelu_tanh_mul_op``        gemma4_passes::gelu_tanh_mul
* ``q_norm_rope_op``          gemma4_passes::q_norm_rope
* ``qkv_norm_rope_op``        gemma4_passes::qkv_norm_rope
* ``moe_router_op``           gemma4_passes::moe_router
* ``moe_dispatch_op``         gemma4_passes::moe_dispatch

(The ``_op`` suffix keeps the handles from shadowing the kernel submodules, e.g.
``gemma4_passes.kernels.qkv_norm_rope``.)  Triton launchers live in the submodules
(``norm_residual``, ``gelu_mul``, ``qkv_norm_rope``, ``moe_router``, ``moe_dispatch``), the plain-torch references
in ``reference``.
"""

from .ops import NAMESPACE, OP_NAMES, ensure_registered, is_registered
from .ops import gelu_tanh_mul as gelu_tanh_mul_op
from .ops import moe_dispatch as moe_dispatch_op
from .ops import moe_router as moe_router_op
from .ops import q_norm_rope as q_norm_rope_op
from .ops import qkv_norm_rope as qkv_norm_rope_op
from .ops import rmsnorm_add as rmsnorm_add_op
from .ops import rmsnorm_add_rmsnorm as rmsnorm_add_rmsnorm_op

__all__ = [
    "NAMESPACE",
    "OP_NAMES",
    "ensure_registered",
    "is_registered",
    "rmsnorm_add_op",
    "rmsnorm_add_rmsnorm_op",
    "gelu_tanh_mul_op",
    "q_norm_rope_op",
    "qkv_norm_rope_op",
    "moe_router_op",
    "moe_dispatch_op",
]

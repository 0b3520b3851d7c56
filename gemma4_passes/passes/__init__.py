"""The fusion passes, in the order they run.

Order matters where one fusion's output is another's input: the post-attention
epilogue runs before the FFN/PLE tails (a tail recognises the post-attention
residual either as a plain add or as that fusion's output).  The MoE-layer fusions
run before the dense ones, which would otherwise take the same residual adds.
``kv_shared_dead_kv`` runs first: it only removes work (the K/V columns of a KV-shared
layer's QKV GEMM), so every later pass, qkv_norm included, sees the shrunk graph.
"""

from __future__ import annotations

from .allreduce_norm import AllReduceNorm
from .base import FusionPass
from .dead_kv import KvSharedDeadKv
from .moe_norms import MoeBranchCombine, MoeInputNorms
from .moe_dispatch import MoeDispatch
from .moe_router import MoeRouter
from .norm_residual import FfnTail, PleTail, PostAttnNorm
from .ple_gate import PleGate
from .qkv_norm import QkvNorm

FUSION_CLASSES: tuple[type[FusionPass], ...] = (
    KvSharedDeadKv,  # first: removes dead K/V work before anything matches on the graph
    MoeInputNorms,
    PostAttnNorm,
    MoeBranchCombine,
    FfnTail,
    PleTail,
    PleGate,
    QkvNorm,
    MoeRouter,
    MoeDispatch,  # the experts' index work (reads the router's ids, whichever op made them)
    AllReduceNorm,  # after the epilogue fusions: it folds the all-reduce into their ops
)

FUSIONS: dict[str, type[FusionPass]] = {cls.name: cls for cls in FUSION_CLASSES}

#: what runs when no selection is given: the fusions that beat Inductor alone where measured
DEFAULT_FUSIONS: tuple[str, ...] = tuple(name for name, cls in FUSIONS.items() if cls.default)

__all__ = ["DEFAULT_FUSIONS", "FUSIONS", "FUSION_CLASSES", "FusionPass"]

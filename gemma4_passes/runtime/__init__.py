"""Runtime pieces that the rewritten graphs run under: the piecewise backend and its split-op
registry (CUDA-graph capture, KV-shared guards, the parity guard, YOCO and the SWA pool build on
these; issues 5 and 6)."""

from .graphed_piece import DEFAULT_BUCKETS, CudaGraphCapture, EmulatedCapture, GraphedPiece
from .parity_guard import ParityGuard
from .piece_shapes import PieceShape, analyse_piece
from .piecewise import SplitResult, piecewise_backend, split_at_ops
from .split_ops import is_split_node, register_split_op, split_targets, unregister_split_op

__all__ = [
    "DEFAULT_BUCKETS",
    "CudaGraphCapture",
    "EmulatedCapture",
    "GraphedPiece",
    "ParityGuard",
    "PieceShape",
    "analyse_piece",
    "SplitResult",
    "is_split_node",
    "piecewise_backend",
    "register_split_op",
    "split_at_ops",
    "split_targets",
    "unregister_split_op",
]

"""Capture-time parity guard: a captured size is trusted only after its first replay matched.

When a piece is captured at a size, its first replay is compared with the uncaptured compiled run
of the same piece on the same probe input (the call that triggered the capture).  A replay that
differs past the tolerance (or has NaN/inf where the compiled run has none) means the graph does
not compute what the compiled code does (a capture-unsafe op, a stale pointer, a bad gate: the
seed's dense-31B graph that produced garbage for every prompt); that size, or the whole model,
then runs uncaptured and one warning names the piece, the size and the error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: default max-abs-error / max-abs-reference per output dtype; a replay of the same kernels on the
#: same input is normally bit-identical, the slack covers kernels with atomics (split-K GEMMs)
DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class ParityGuard:
    """``enabled``: compare the first replay of every captured size (on by default).
    ``tolerance``: relative error allowed (None: per dtype, :data:`DEFAULT_TOLERANCE`).
    ``on_mismatch``: "size" drops the capture of that size of that piece; "model" stops capturing
    for the whole compiled model."""

    enabled: bool = True
    tolerance: float | None = None
    on_mismatch: str = "size"

    def __post_init__(self) -> None:
        if self.on_mismatch not in ("size", "model"):
            raise ValueError(f"ParityGuard.on_mismatch must be 'size' or 'model', not {self.on_mismatch!r}")

    def tolerance_for(self, dtype: torch.dtype) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return DEFAULT_TOLERANCE.get(dtype, 0.0)


def first_mismatch(replayed: Sequence, reference: Sequence, guard: ParityGuard) -> str | None:
    """A description of the first output where ``replayed`` and ``reference`` differ, or None."""
    for i, (got, ref) in enumerate(zip(replayed, reference)):
        if not isinstance(ref, torch.Tensor):
            if got != ref:
                return f"output {i}: {got!r} != {ref!r}"
            continue
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return f"output {i}: {tuple(got.shape)}/{got.dtype} vs {tuple(ref.shape)}/{ref.dtype}"
        if ref.numel() == 0:
            continue
        if not ref.is_floating_point():
            bad = int((got != ref).sum())
            if bad:
                return f"output {i}: {bad} of {ref.numel()} elements differ"
            continue
        g, r = got.float(), ref.float()
        nonfinite = ~torch.isfinite(g) & torch.isfinite(r)
        if bool(nonfinite.any()):
            return f"output {i}: {int(nonfinite.sum())} non-finite values where the compiled run has none"
        finite = torch.isfinite(r)
        if not bool(finite.all()):
            g, r = g[finite], r[finite]
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((g - r).abs().max()) if r.numel() else 0.0
        rel = err / scale if scale > 0 else err
        if rel > guard.tolerance_for(ref.dtype):
            return f"output {i}: relative error {rel:.3g} (max abs {err:.3g})"
    return None

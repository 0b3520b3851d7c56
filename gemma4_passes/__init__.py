"""gemma4-passes: torch.compile/Inductor passes and fused kernels for Gemma-4.

    import gemma4_passes
    gemma4_passes.enable()                 # the default fusions, process-wide
    model = torch.compile(model)
    ...
    gemma4_passes.match_report()           # {"post_attn_norm": 35, ...}
"""

from __future__ import annotations

from .compat import UnsupportedTorchError
from .manager import (
    Gemma4PostGradPass,
    available_fusions,
    default_fusions,
    build_pass,
    disable,
    enable,
    enabled,
)
from .report import match_report, reset_match_report

__version__ = "0.1.0"

__all__ = [
    "Gemma4PostGradPass",
    "UnsupportedTorchError",
    "available_fusions",
    "default_fusions",
    "build_pass",
    "disable",
    "enable",
    "enabled",
    "match_report",
    "reset_match_report",
    "__version__",
]

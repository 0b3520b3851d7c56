"""Which torch this runs on, and the few APIs that moved between 2.11 and 2.14."""

from __future__ import annotations

import re

import torch

MIN_TORCH = (2, 11)


class UnsupportedTorchError(RuntimeError):
    """The installed torch is older than the passes support."""


def torch_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def torch_supported() -> bool:
    return torch_version() >= MIN_TORCH


def require_supported_torch() -> None:
    if not torch_supported():
        raise UnsupportedTorchError(
            f"gemma4_passes needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (Inductor's post-grad "
            f"custom pass API it relies on); this is torch {torch.__version__}"
        )


def custom_graph_pass_base():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    return CustomGraphPass

"""On/off switches read from the environment (``GEMMA4_PASSES``, ``GEMMA4_PASSES_YOCO``, ...),
spelled the same way everywhere: 0/false/off/no and 1/true/on/yes, any case."""

from __future__ import annotations

import os

OFF_VALUES = ("0", "false", "off", "no")
ON_VALUES = ("1", "true", "on", "yes")


def env_flag(name: str) -> str:
    """The variable's value, stripped and lower-cased ("" when unset)."""
    return os.environ.get(name, "").strip().lower()


def switched_off(name: str) -> bool:
    """True when ``name`` is set to an off value (unset means on)."""
    return env_flag(name) in OFF_VALUES


def switched_on(name: str) -> bool:
    """True when ``name`` is set to an on value."""
    return env_flag(name) in ON_VALUES

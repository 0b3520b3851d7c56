"""The ops a piecewise graph is split at (attention and collectives that must run outside the
compiled pieces), as a registry.

A split op runs eagerly between compiled pieces: its inputs and outputs are piece boundaries, so no
fusion pass can match a pattern that spans it.  Registered by default when their namespace exists:
SGLang's attention and split all-reduce ops.  ``register_split_op`` adds any other call target
(an ``OpOverload``, ``OpOverloadPacket`` or a plain function as it appears in a Dynamo graph).
"""

from __future__ import annotations

from typing import Any

import torch

_REGISTERED: set = set()

#: (namespace, op) pairs split at when the op is registered in this process
_KNOWN = (
    ("sglang", "unified_attention_with_output"),
    ("sglang", "inplace_all_reduce"),
    ("gemma4_passes", "paged_attention"),
)


def register_split_op(target: Any) -> None:
    """Split piecewise graphs at calls of ``target`` (idempotent)."""
    _REGISTERED.add(target)


def unregister_split_op(target: Any) -> None:
    _REGISTERED.discard(target)


def split_targets() -> set:
    """Every target split at now: the registered ones plus the known ops that exist."""
    targets = set(_REGISTERED)
    for ns, name in _KNOWN:
        packet = getattr(getattr(torch.ops, ns, None), name, None) if hasattr(torch.ops, ns) else None
        if packet is not None:
            targets.add(packet)
    return targets


def is_split_node(node: torch.fx.Node, targets: set | None = None) -> bool:
    if node.op != "call_function":
        return False
    targets = split_targets() if targets is None else targets
    t = node.target
    return t in targets or getattr(t, "overloadpacket", None) in targets

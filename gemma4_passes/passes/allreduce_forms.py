"""The all-reduce forms a tensor-parallel graph holds, each resolved to the c10d group it sums over.

* plain PyTorch (transformers' TP plans, funcol): ``wait_tensor(_c10d_functional.all_reduce(x, "sum",
  group))``; ``group`` is already a c10d group name;
* SGLang: ``sglang::outplace_all_reduce(x, group_name, method)``;
* vLLM: ``vllm::all_reduce(x, group_name)``.

SGLang's and vLLM's ``group_name`` keys THEIR registry (``parallel_state._groups``: a unique name such
as ``"tp:0"`` -> a weakref to a ``GroupCoordinator``), not c10d's.  A fused op must sum over exactly
that group, so the name is resolved here, at pass time: registry entry -> coordinator ->
``device_group.group_name``.  A name that cannot be resolved leaves the all-reduce unfused (said once
per process).

The registries are read from modules already imported (an op in the graph means its registering
module ran); nothing is imported here.  :data:`GROUP_REGISTRIES` holds one loader per form: the
injection point for other hosts and for tests.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Optional

import torch
from torch.fx import Node

from .base import log
from .graph_match import is_op

_c10d = torch.ops._c10d_functional
_aten = torch.ops.aten

#: shape-only ops a reduced value may pass through on its way to a fused op (:func:`match_all_reduce_viewed`)
VIEW_OPS = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default)

#: form -> the op (default overload) it calls with a framework group name
FRAMEWORK_OPS = {"sglang": "sglang::outplace_all_reduce", "vllm": "vllm::all_reduce"}


def _loaded_groups(module: str) -> Optional[Mapping]:
    return getattr(sys.modules.get(module), "_groups", None)


#: form -> loader of that framework's group registry (name -> GroupCoordinator or a weakref to one);
#: a loader returns None where the framework is not loaded
GROUP_REGISTRIES: dict[str, Callable[[], Optional[Mapping]]] = {
    "sglang": lambda: _loaded_groups("sglang.srt.distributed.parallel_state"),
    "vllm": lambda: _loaded_groups("vllm.distributed.parallel_state"),
}


@dataclass(frozen=True)
class Reduced:
    """A sum all-reduce: what it sums, the nodes a fold removes (users first), its c10d group.

    ``views``: the sizes of the reshapes/views between the all-reduce and its reader, first applied
    first; the fused op reads ``source`` through ``aten.reshape`` to each (a reshape never fails where
    the view of the contiguous all-reduce result did not, and gives the same values).
    """

    source: Node
    erase: tuple[Node, ...]
    group: str
    form: str
    views: tuple = ()


_SAID: set = set()


def log_once(key: Hashable, msg: str, *args) -> None:
    """INFO once per ``key`` per process: a graph compiled again must not repeat the same reason."""
    if key in _SAID:
        return
    _SAID.add(key)
    log.info(msg, *args)


# ---- one function per form ------------------------------------------------------------------------


def match_c10d(value: Node) -> Optional[Reduced]:
    if not is_op(value, _c10d.wait_tensor.default):
        return None
    ar = value.args[0]
    if not is_op(ar, _c10d.all_reduce.default) or len(ar.users) != 1:
        return None
    src, op, group = ar.args[:3]
    if op != "sum" or not isinstance(group, str) or not isinstance(src, Node):
        return None
    return Reduced(src, (value, ar), group, "c10d")


def match_sglang(value: Node) -> Optional[Reduced]:
    return _match_framework(value, "sglang")  # (x, group_name, outplace_all_reduce_method)


def match_vllm(value: Node) -> Optional[Reduced]:
    return _match_framework(value, "vllm")  # (x, group_name)


def _match_framework(value: Node, form: str) -> Optional[Reduced]:
    """A framework's out-of-place all-reduce (always a sum) whose group resolves to a c10d group."""
    if op_name(value) != FRAMEWORK_OPS[form] or len(value.args) < 2 or not isinstance(value.args[0], Node):
        return None
    group = resolve_group(form, value.args[1])
    return None if group is None else Reduced(value.args[0], (value,), group, form)


FORMS = (match_c10d, match_sglang, match_vllm)


def match_all_reduce(value) -> Optional[Reduced]:
    """``value`` is a sum all-reduce in any form, read by exactly one node (the fused op replaces both)."""
    if not isinstance(value, Node) or len(value.users) != 1:
        return None
    for form in FORMS:
        m = form(value)
        if m is not None:
            return m
    return None


def match_all_reduce_viewed(value) -> Optional[Reduced]:
    """:func:`match_all_reduce`, also through a chain of reshapes/views each read once.

    transformers' TP'd MoE experts all-reduce their ``[T, H]`` sum inside the experts module; the
    decoder layer reshapes it to ``[B, S, H]`` after the ``wait_tensor``.  A sum all-reduce is
    elementwise, so ``reshape(AR(x)) == AR(reshape(x))`` bit for bit: the fold applies the views to
    ``x`` instead.  No other op is seen through (a cast is not neutral: it changes the dtype summed).
    """
    views = []
    while (is_op(value, *VIEW_OPS) and len(value.users) == 1 and len(value.args) == 2 and not value.kwargs
           and isinstance(value.args[0], Node)):
        views.append(value)
        value = value.args[0]
    r = match_all_reduce(value)
    if r is None or not views:
        return r
    return dataclasses.replace(r, erase=(*views, *r.erase),
                               views=tuple(v.args[1] for v in reversed(views)))


# ---- framework groups -> c10d groups ------------------------------------------------------------


def op_name(node) -> Optional[str]:
    """``"ns::op"`` of a node calling an op's default overload (None for anything else)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._overloadname != "default":
        return None
    return target._schema.name


def resolve_group(form: str, name) -> Optional[str]:
    """The c10d group name behind ``form``'s group ``name``; None (said once) when it cannot be told."""
    group, reason = _lookup(form, name)
    if reason is not None:
        log_once(("resolve", form, name, reason),
                 "allreduce_norm: leaving the %s all-reduce over group %r unfused: %s", form, name, reason)
    return group


def _lookup(form: str, name) -> tuple[Optional[str], Optional[str]]:
    if not isinstance(name, str):
        return None, "its group name is not a constant string"
    loader = GROUP_REGISTRIES.get(form)
    registry = loader() if loader is not None else None
    if registry is None:
        return None, f"{form}'s group registry is not loaded"
    entry = registry.get(name)
    # the registries hold weakrefs: call one to get the coordinator (None once it is destroyed)
    coordinator = entry() if callable(entry) and not hasattr(entry, "device_group") else entry
    if coordinator is None:
        return None, f"{form} has no live group {name!r}"
    try:
        group = coordinator.device_group.group_name
    except Exception as exc:  # noqa: BLE001 - no device group yet, an unnamed group, ...
        return None, f"{form} group {name!r} has no named c10d device group ({type(exc).__name__}: {exc})"
    if not isinstance(group, str) or not group:
        return None, f"{form} group {name!r} has no named c10d device group"
    return group, None

"""The one Inductor pass the package installs, and how it is installed.

Inductor's ``post_grad_custom_pre_pass`` slot holds ONE callable (torch 2.11 and
2.12 reject a list), so the package installs a single :class:`Gemma4PostGradPass`
that runs the selected fusions in order and then whatever pass was in the slot
before (another package's), instead of overwriting it.

The pass's ``uuid()`` covers the package's sources (kernels included), the
selected fusions, the chained pass and the torch/triton versions: a change to any
of them is a different FX-graph-cache key, so the cache never serves a graph
compiled without (or with other) passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
from typing import Callable, Iterable, Iterator

import torch

from . import report
from .compat import custom_graph_pass_base, require_supported_torch
from .passes import DEFAULT_FUSIONS, FUSIONS

log = logging.getLogger("gemma4_passes")

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_SOURCE_HASH: str | None = None


def available_fusions() -> list[str]:
    """Names accepted by :func:`enable` / :func:`build_pass`, in the order they run."""
    return list(FUSIONS)


def default_fusions() -> list[str]:
    """The fusions that run when none are named (those that beat Inductor alone where measured)."""
    return list(DEFAULT_FUSIONS)


def select_fusions(fusions: Iterable[str] | None) -> tuple[str, ...]:
    """Validate a user's selection; ``None`` means the default set, ``"all"`` every fusion."""
    if fusions is None:
        return tuple(DEFAULT_FUSIONS)
    if isinstance(fusions, str):
        fusions = [f for f in fusions.split(",") if f.strip()]
    wanted = [f.strip() for f in fusions]
    if wanted == ["all"]:
        return tuple(FUSIONS)
    unknown = [f for f in wanted if f not in FUSIONS]
    if unknown:
        raise ValueError(
            f"unknown gemma4_passes fusion(s) {unknown}; available: {available_fusions()}"
        )
    return tuple(name for name in FUSIONS if name in wanted)


def source_hash() -> str:
    """Hash of every file of the package: kernels and passes change the compiled result."""
    global _SOURCE_HASH
    if _SOURCE_HASH is None:
        h = hashlib.sha256()
        for path in sorted(_PACKAGE_DIR.rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE_DIR)).encode())
            h.update(path.read_bytes())
        _SOURCE_HASH = h.hexdigest()
    return _SOURCE_HASH


def _uuid_of(pass_) -> str | None:
    if pass_ is None:
        return ""
    uuid = getattr(pass_, "uuid", None)
    if uuid is None:
        return None  # a plain function: no cache key can describe it
    value = uuid()
    return None if value is None else repr(value)


class Gemma4PostGradPass(custom_graph_pass_base()):
    """Runs the selected Gemma-4 fusions on a post-grad graph, then the chained pass."""

    def __init__(self, fusions: Iterable[str] | None = None, chained: Callable | None = None):
        self.fusions = select_fusions(fusions)
        self.passes = [FUSIONS[name]() for name in self.fusions]
        self.chained = chained
        self.strict = os.environ.get("GEMMA4_PASSES_STRICT", "0") == "1"

    def __call__(self, graph: torch.fx.Graph) -> None:
        counts = {}
        for p in self.passes:
            try:
                counts[p.name] = p.apply(graph)
            except Exception:
                if self.strict:
                    raise
                log.warning("gemma4_passes: fusion %s failed on this graph; left unfused", p.name, exc_info=True)
                counts[p.name] = 0
        report.record(counts)
        _explain_symbolic_eps()
        matched = ", ".join(f"{k}={v}" for k, v in counts.items())
        log.info("gemma4_passes: rewrote graph (%s)", matched or "no fusions selected")
        if self.chained is not None:
            self.chained(graph)

    def uuid(self) -> str | None:
        chained = _uuid_of(self.chained)
        if chained is None:
            return None
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        # env switches that change what a pass emits must change the key too
        from .kernels.allreduce_workspace import ENV_SWITCH
        from .envflags import env_flag

        key = "|".join([source_hash(), ",".join(self.fusions), torch.__version__, triton_version, chained,
                        f"{ENV_SWITCH}={env_flag(ENV_SWITCH)}"])
        return hashlib.sha256(key.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Gemma4PostGradPass(fusions={list(self.fusions)}, chained={self.chained!r})"


_EPS_EXPLAINED = [False]


def _explain_symbolic_eps() -> None:
    from .passes.graph_match import SYMBOLIC_EPS_SEEN

    if SYMBOLIC_EPS_SEEN[0] and not _EPS_EXPLAINED[0]:
        _EPS_EXPLAINED[0] = True
        log.warning(
            "gemma4_passes: RMSNorm eps is a graph input here (torch.compile(dynamic=True) lifts module "
            "floats when torch._dynamo.config.specialize_float is False), so norms stay unfused; compile "
            "with dynamic=None/False or set torch._dynamo.config.specialize_float = True"
        )


def build_pass(fusions: Iterable[str] | None = None, chained: Callable | None = None) -> Gemma4PostGradPass:
    """A pass object for ``torch.compile(options={"post_grad_custom_pre_pass": ...})``."""
    require_supported_torch()
    return Gemma4PostGradPass(fusions, chained)


def _slot():
    import torch._inductor.config as inductor_config

    return inductor_config


def installed_pass() -> Gemma4PostGradPass | None:
    current = _slot().post_grad_custom_pre_pass
    return current if isinstance(current, Gemma4PostGradPass) else None


def enable(fusions: Iterable[str] | None = None) -> Gemma4PostGradPass:
    """Install the passes into Inductor's post-grad pre slot (process-wide).

    Calling it again replaces the package's pass (new selection) and keeps the
    chained pass; a pass another package installed stays chained after ours.
    """
    require_supported_torch()
    cfg = _slot()
    current = cfg.post_grad_custom_pre_pass
    chained = current.chained if isinstance(current, Gemma4PostGradPass) else current
    p = Gemma4PostGradPass(fusions, chained)
    cfg.post_grad_custom_pre_pass = p
    log.info("gemma4_passes: enabled %s%s", list(p.fusions), f" (chaining {chained!r})" if chained else "")
    return p


def disable() -> None:
    """Remove the package's pass, putting back the pass it chained (if any)."""
    cfg = _slot()
    current = cfg.post_grad_custom_pre_pass
    if isinstance(current, Gemma4PostGradPass):
        cfg.post_grad_custom_pre_pass = current.chained
        log.info("gemma4_passes: disabled")


@contextlib.contextmanager
def enabled(fusions: Iterable[str] | None = None) -> Iterator[Gemma4PostGradPass]:
    """``with gemma4_passes.enabled(): ...``: the passes for the block, then the previous slot."""
    cfg = _slot()
    previous = cfg.post_grad_custom_pre_pass
    p = enable(fusions)
    try:
        yield p
    finally:
        cfg.post_grad_custom_pre_pass = previous

"""SGLang general plugin: install the gemma4_passes Inductor pass when SGLang
configures ``torch.compile``.

SGLang discovers this through the ``sglang.srt.plugins`` entry point declared in
pyproject.toml and calls :func:`register` (no arguments) in every SGLang process
(``sglang.srt.plugins.load_plugins()``), then applies the hooks registered here.

Where the pass goes (SGLang 0.5.23):

- ``--enable-torch-compile`` compiles ``model.forward`` with plain
  ``torch.compile`` (``torch_compile_decoration.patch_model``; the CPU graph
  runner has its own copy), after ``set_torch_compile_config()`` has set the
  global Inductor/Dynamo config. Neither path builds SGLang's
  ``PostGradPassManager``: only ``SGLangBackend`` of the removed ``tc_piecewise``
  prefill backend did, and 0.5.23 rejects that backend in its config. So the pass
  goes into ``torch._inductor.config.post_grad_custom_pre_pass`` through
  :func:`gemma4_passes.enable`, right after SGLang's config step; a pass
  already in that slot is chained, not overwritten.
- Hooks (``HookType.AFTER``):
    * ``sglang.srt.compilation.torch_compile_decoration.set_torch_compile_config``:
      the config step of the GPU runners (decode CUDA graph runner, the
      prefill/base runner's dummy run, the speculative draft runners);
    * ``sglang.srt.utils.patch_torch.monkey_patch_torch_compile``: the last call
      of both ``set_torch_compile_config`` copies, so it also covers
      ``sglang.srt.model_executor.cpu_graph_runner.set_torch_compile_config``
      without importing the CPU runner (and the model runner behind it) in
      every process.
  Installing is idempotent: SGLang calls its config step several times per
  process and both hooks fire on the GPU path.

Environment:
  ``GEMMA4_PASSES=0`` (or false/off/no): register nothing.
  ``GEMMA4_PASSES_FUSIONS=a,b``: install only these fusions (names from
  ``gemma4_passes.available_fusions()``; an unknown name fails ``register``,
  which SGLang logs as a failed plugin, and nothing is installed).
  ``GEMMA4_PASSES_STRICT=1``: a failure to install raises instead of logging a
  warning and serving without the passes.

Nothing SGLang-specific is imported at module import time, and :func:`register`
imports only ``sglang.srt.plugins.hook_registry``; SGLang imports the hook
targets when it applies the hooks.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable

from gemma4_passes.envflags import switched_off

log = logging.getLogger("gemma4_passes.sglang")

ENV_SWITCH = "GEMMA4_PASSES"
ENV_FUSIONS = "GEMMA4_PASSES_FUSIONS"
ENV_STRICT = "GEMMA4_PASSES_STRICT"

#: SGLang's torch.compile config step on the GPU runners' path.
CONFIG_STEP_TARGET = "sglang.srt.compilation.torch_compile_decoration.set_torch_compile_config"
#: The last call inside every ``set_torch_compile_config`` (GPU and CPU runners).
CONFIG_TAIL_TARGET = "sglang.srt.utils.patch_torch.monkey_patch_torch_compile"


_lock = threading.Lock()
_announced = False
_warned = False


def _switched_off() -> bool:
    return switched_off(ENV_SWITCH)


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "0") == "1"


def requested_fusions() -> tuple[str, ...] | None:
    """The selection from ``GEMMA4_PASSES_FUSIONS`` (validated), or None for all."""
    raw = os.environ.get(ENV_FUSIONS, "").strip()
    if not raw:
        return None
    from gemma4_passes.manager import select_fusions

    selected = select_fusions(raw)
    if not selected:
        raise ValueError(f"{ENV_FUSIONS}={raw!r} selects no fusion")
    return selected


def install(where: str = "a direct call") -> Any:
    """Install the package's pass into Inductor's post-grad pre slot, once.

    Returns the installed ``Gemma4PostGradPass`` (or None when switched off or
    when installing failed and ``GEMMA4_PASSES_STRICT`` is not set). A pass of the
    package already in the slot with the wanted fusions is kept as is; any other
    pass in the slot is chained by :func:`gemma4_passes.enable`.
    """
    global _announced, _warned
    if _switched_off():
        return None
    with _lock:
        try:
            from gemma4_passes import manager

            wanted = requested_fusions()
            current = manager.installed_pass()
            if current is not None and (wanted is None or tuple(current.fusions) == wanted):
                installed = current
            else:
                installed = manager.enable(wanted)
        except Exception:
            if _strict():
                raise
            if not _warned:
                _warned = True
                log.warning(
                    "gemma4_passes: could not install the Inductor pass after %s; "
                    "SGLang continues without it",
                    where,
                    exc_info=True,
                )
            return None
        if not _announced:
            _announced = True
            chained = f", chaining {installed.chained!r}" if installed.chained is not None else ""
            log.info(
                "gemma4_passes: installed fusions %s into "
                "torch._inductor.config.post_grad_custom_pre_pass after SGLang's %s%s",
                list(installed.fusions),
                where,
                chained,
            )
        return installed


def _after_config_step(result, *args, **kwargs):
    """AFTER hook on ``set_torch_compile_config``: receives its result (None)."""
    install("set_torch_compile_config()")
    return None  # keep SGLang's result


def _after_config_tail(result, *args, **kwargs):
    """AFTER hook on ``monkey_patch_torch_compile`` (end of every config step)."""
    install("set_torch_compile_config() (monkey_patch_torch_compile)")
    return None


#: target -> AFTER hook, in the order they are registered.
HOOKS: dict[str, Callable] = {
    CONFIG_STEP_TARGET: _after_config_step,
    CONFIG_TAIL_TARGET: _after_config_tail,
}


#: modules of ``gemma4_passes.integrations`` with more SGLang hooks (runtime shims): each exposes
#: ``SGLANG_HOOKS``, a list of ``(target_path, hook, hook_type_name)`` with hook_type_name one of
#: SGLang's ``HookType`` member names ("BEFORE", "AFTER", "AROUND", "REPLACE").
FEATURE_MODULES: tuple[str, ...] = ("sglang_swa", "sglang_yoco")


def all_hooks() -> list[tuple[str, Callable, str]]:
    """Every (target, hook, hook type name) this plugin registers, in order."""
    import importlib

    hooks = [(target, hook, "AFTER") for target, hook in HOOKS.items()]
    for name in FEATURE_MODULES:
        hooks.extend(importlib.import_module(f"gemma4_passes.integrations.{name}").SGLANG_HOOKS)
    return hooks


def _registered(registry, target: str, hook: Callable) -> bool:
    # HookRegistry._hooks is a defaultdict(list) of (HookType, hook, source);
    # .get() does not create an entry.
    entries = getattr(registry, "_hooks", {}).get(target, ())
    return any(entry[1] is hook for entry in entries)


def register() -> None:
    """SGLang plugin entry point (``sglang.srt.plugins``): register the hooks.

    Safe in every SGLang process and idempotent: a hook already in SGLang's
    ``HookRegistry`` is not registered again. SGLang's ``load_plugins()`` applies
    the hooks after all plugins ran.
    """
    if _switched_off():
        log.info(
            "gemma4_passes: %s=%s, SGLang plugin disabled (no hooks registered)",
            ENV_SWITCH,
            os.environ.get(ENV_SWITCH),
        )
        return
    requested_fusions()  # fail at startup, not at compile time, on a bad selection

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    added = []
    for target, hook, kind in all_hooks():
        if not _registered(HookRegistry, target, hook):
            HookRegistry.register(target, hook, getattr(HookType, kind))
            added.append(target)
    log.debug("gemma4_passes: registered SGLang hooks on %s", added or "nothing (already registered)")

"""SGLang hooks for Gemma-4's hybrid SWA KV pools (sglang 0.5.23).

Registered by the gemma4_passes SGLang plugin (``sglang_plugin.FEATURE_MODULES``); each is a
no-op for models other than Gemma-4. ``docs/sglang_kv_pools.md`` has the source reading.

1. Planned ``swa_full_tokens_ratio`` (AFTER ``pool_configurator.create_memory_pool_configurator``).
   The budget is only known when SGLang sizes the pools (``HybridSWAPoolConfigurator.
   calculate_pool_sizes(available_bytes, page_size)``), not at server-args time, so the hook
   wraps that method of each new configurator: when the user gave no ``--swa-full-tokens-ratio``
   (the raw ``ServerArgs.swa_full_tokens_ratio`` is None: the field is declared
   ``Optional[float] = None`` with a resolution fallback of 0.8, ``arg_groups/fields/schedule.py``,
   and SGLang records ``_swa_full_tokens_ratio_explicitly_set`` from exactly that,
   ``arg_groups/kv_cache_hook.py:415-420``; an explicit ``0.8`` is a user value and is kept), it
   replaces the 0.8 fallback by :func:`gemma4_passes.runtime.swa.plan_pools` for the budget, the
   configurator's own bytes per token and window, and logs the old and new pool sizes in one
   line. The first planned ratio is kept for the rest of the process, so later re-sizings
   (post-capture) cannot grow a pool past what was reserved. Left alone: a user ratio, the
   request-capped configurator (``--max-running-requests`` with the radix cache off: SGLang sizes
   the SWA pool from the cap itself), unified memory, draft KV priced in the same pool.
   Workload: ``GEMMA4_PASSES_SWA_WORKLOAD="REQUESTSxTOKENS"`` (or ``"xTOKENS"``); default tokens
   per request 8192 (capped at the context length), requests: ``--max-running-requests`` if set,
   else as many as fit.

2. KV-shared layers get no pool slots (AFTER ``layer_setup.resolve_layer_indices``). E2B/E4B's
   KV-shared layers attend through a ``RadixAttention`` whose ``layer_id`` is their producer's
   (``models/gemma4_causal.py:428-435``) and never save KV (``save_kv_cache=not
   self.is_kv_shared_layer``, :540), yet ``SWAKVPool`` allocates a buffer for every id in the
   runner's ``ModelLayerInfo`` lists, shared layers included. The hook drops the ids that no
   ``RadixAttention`` of the loaded model points at, so both the pool sizing and the pool
   allocation leave them out (E4B: 42 -> 24 layers of KV). Only on the target model, with the
   whole stack on this rank, and with no peer that shares the pool layout (PD disaggregation,
   hierarchical cache): off otherwise, and with ``GEMMA4_PASSES_KV_SHARED_RECLAIM=0``.

3. SWA state follows the pool in the frozen-KV MTP views (AROUND
   ``frozen_kv_mtp_utils.frozen_kv_target_view`` and ``target_kv_pool_view``): inside SGLang's
   own pool swap, :func:`gemma4_passes.runtime.state_swap.swa_backend_view` switches the draft
   backend's sliding-window flags to the target pool, and restores them before SGLang restores
   the pool. ``GEMMA4_PASSES_SWA_VIEW=0`` turns it off.

``GEMMA4_PASSES_SWA_PLAN=0`` turns off (1). ``GEMMA4_PASSES_STRICT=1`` raises where a hook would
otherwise log a warning and leave SGLang's behaviour unchanged.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from gemma4_passes.envflags import switched_off
from gemma4_passes.runtime.state_swap import swa_backend_view
from gemma4_passes.runtime.swa import SglangSchedule, plan_pools, sglang_pool_sizes

log = logging.getLogger("gemma4_passes.sglang")

POOL_CONFIGURATOR_TARGET = "sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator"
LAYER_INDICES_TARGET = "sglang.srt.model_executor.model_runner_components.layer_setup.resolve_layer_indices"
FROZEN_TARGET_VIEW_TARGET = "sglang.srt.speculative.frozen_kv_mtp_utils.frozen_kv_target_view"
FROZEN_POOL_VIEW_TARGET = "sglang.srt.speculative.frozen_kv_mtp_utils.target_kv_pool_view"

ENV_PLAN = "GEMMA4_PASSES_SWA_PLAN"
ENV_WORKLOAD = "GEMMA4_PASSES_SWA_WORKLOAD"
ENV_RECLAIM = "GEMMA4_PASSES_KV_SHARED_RECLAIM"
ENV_VIEW = "GEMMA4_PASSES_SWA_VIEW"
ENV_STRICT = "GEMMA4_PASSES_STRICT"

#: SGLang architectures of Gemma-4 targets (``configs/model_config.py`` hybrid-SWA list).
GEMMA4_ARCHITECTURES = frozenset(
    {"Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration"}
)
DEFAULT_TOKENS_PER_REQUEST = 8192
AS_MANY_AS_FIT = 1 << 40

_lock = threading.Lock()
_planned_ratio: float | None = None  # the first ratio planned in this process


def _enabled(env: str) -> bool:
    return not switched_off(env)


def _strict() -> bool:
    return os.environ.get(ENV_STRICT, "0") == "1"


def is_gemma4(model_config: Any) -> bool:
    """True when SGLang's ``ModelConfig`` describes a Gemma-4 target."""
    archs = getattr(getattr(model_config, "hf_config", None), "architectures", None) or ()
    return bool(GEMMA4_ARCHITECTURES.intersection(archs))


# ------------------------------------------------------------------------------------------------
# (1) the planned ratio
# ------------------------------------------------------------------------------------------------
def ratio_given_by_user(server_args: Any) -> bool:
    """Whether ``--swa-full-tokens-ratio`` was given (any value, 0.8 included).

    The raw field is None unless the user set it; SGLang's own record of that
    (``_swa_full_tokens_ratio_explicitly_set``) is read too where it is already resolved.
    """
    if getattr(server_args, "swa_full_tokens_ratio", None) is not None:
        return True
    recorded = getattr(server_args, "_swa_full_tokens_ratio_explicitly_set", None)
    if recorded is None:
        try:
            from sglang.srt.runtime_context import get_schedule

            recorded = get_schedule()._swa_full_tokens_ratio_explicitly_set
        except Exception:  # bags not published (tests, tools): the raw field decides
            recorded = None
    return bool(recorded)


def _runtime_value(bag: str, name: str, default: Any) -> Any:
    try:
        from sglang.srt import runtime_context

        value = getattr(getattr(runtime_context, f"get_{bag}")(), name)
    except Exception:
        return default
    return default if value is None else value


def schedule_for(configurator: Any, kvc: Any) -> SglangSchedule:
    """SGLang's scheduling facts the pool needs depend on: the resolved config bags, else the raw args."""
    raw = getattr(kvc, "server_args", None)

    def pick(bag: str, name: str, default: Any) -> Any:
        value = _runtime_value(bag, name, None)
        if value is None:
            value = getattr(raw, name, None)
        return default if value is None else value

    chunk = int(pick("schedule", "chunked_prefill_size", SglangSchedule.chunked_prefill_size))
    draft = int(pick("spec", "speculative_num_draft_tokens", 1) or 1)
    no_overlap = bool(pick("schedule", "disable_overlap_schedule", False))
    return SglangSchedule(
        page_size=int(getattr(configurator, "_page_size", None) or pick("schedule", "page_size", 1)),
        chunked_prefill_size=max(chunk, 0),
        swa_eviction_interval=max(1, int(os.environ.get("SGLANG_SWA_EVICTION_INTERVAL", "128"))),
        draft_tokens=max(1, draft),
        chunks_in_flight=1 if no_overlap else 2,
    )


def workload_for(kvc: Any) -> tuple[int, int]:
    """(requests, tokens per request) to plan for (see the module docstring)."""
    raw = os.environ.get(ENV_WORKLOAD, "").strip().lower()
    requests, tokens = None, None
    if raw:
        m = re.fullmatch(r"(\d*)\s*x\s*(\d+)", raw)
        if not m:
            raise ValueError(f"{ENV_WORKLOAD}={raw!r}: expected REQUESTSxTOKENS (e.g. 64x8192) or xTOKENS")
        requests = int(m.group(1)) if m.group(1) else None
        tokens = int(m.group(2))
    if tokens is None:
        context = getattr(getattr(kvc, "model_config", None), "context_len", None)
        tokens = min(DEFAULT_TOKENS_PER_REQUEST, int(context)) if context else DEFAULT_TOKENS_PER_REQUEST
    if requests is None:
        requests = _runtime_value("schedule", "max_running_requests", None)
        if requests is None:
            requests = getattr(getattr(kvc, "server_args", None), "max_running_requests", None)
    return int(requests or AS_MANY_AS_FIT), tokens


def why_not_planned(configurator: Any, kvc: Any) -> str | None:
    """None when the planner may size this configurator's pools, else the reason it may not."""
    if not _enabled(ENV_PLAN):
        return f"{ENV_PLAN}=0"
    if type(configurator).__name__ != "HybridSWAPoolConfigurator":
        return f"{type(configurator).__name__} sizes its pools itself"
    if not is_gemma4(getattr(kvc, "model_config", None)):
        return "not a Gemma-4 model"
    if ratio_given_by_user(getattr(kvc, "server_args", None)):
        return "--swa-full-tokens-ratio was given"
    if getattr(configurator, "_enable_unified_memory", False):
        return "unified memory pool"
    if not getattr(configurator, "_full_layers_num", 0):
        return "no full-attention pool"
    drafts = ("_draft_full_layers_num", "_draft_swa_layers_num", "_draft_swa_full_layers_num", "_draft_cell_size")
    if any(getattr(configurator, a, 0) for a in drafts) or any(
        getattr(configurator, a, None) is not None for a in ("_fused_full_entry", "_fused_swa_entry")
    ):
        return "draft KV is priced in the same pools"
    return None


def _plan_ratio(configurator: Any, kvc: Any, available_bytes: int) -> tuple[float, str]:
    requests, tokens = workload_for(kvc)
    plan = plan_pools(
        full_bytes_per_token=configurator._full_cell_bytes(),
        swa_bytes_per_token=configurator._swa_cell_bytes(),
        window=configurator._sliding_window_size,
        budget_bytes=int(available_bytes),
        requests=requests,
        tokens_per_request=tokens,
        schedule=schedule_for(configurator, kvc),
        model="Gemma-4",
    )
    shape = f"{plan.admitted} x {tokens} tokens" + (f" of {requests} requested" if requests != AS_MANY_AS_FIT else "")
    return plan.swa_full_tokens_ratio, shape


def install_planned_sizing(configurator: Any, kvc: Any) -> None:
    """Wrap ``configurator.calculate_pool_sizes`` (this instance only) to size with the planned ratio."""
    original = configurator.calculate_pool_sizes
    sglang_ratio = configurator._swa_full_tokens_ratio  # SGLang's fallback, for the log line
    with _lock:
        if _planned_ratio is not None:  # planned earlier in this process: keep it
            configurator._swa_full_tokens_ratio = _planned_ratio
            configurator._recompute_cell_size()

    def calculate_pool_sizes(available_bytes: int, page_size: int):
        global _planned_ratio
        old_ratio = sglang_ratio
        with _lock:
            first = _planned_ratio is None
            try:
                ratio, shape = (_planned_ratio, "as planned before") if not first else _plan_ratio(
                    configurator, kvc, available_bytes
                )
            except ValueError as e:
                if _strict():
                    raise
                log.warning("gemma4_passes: SWA pool planner left SGLang's ratio %s in place: %s", old_ratio, e)
                configurator._swa_full_tokens_ratio = old_ratio
                configurator._recompute_cell_size()
                return original(available_bytes, page_size)
            _planned_ratio = ratio
        full_b, swa_b = configurator._full_cell_bytes(), configurator._swa_cell_bytes()
        old_full, old_swa = sglang_pool_sizes(int(available_bytes), old_ratio, full_b, swa_b, page_size)
        configurator._swa_full_tokens_ratio = ratio
        configurator._recompute_cell_size()
        config = original(available_bytes, page_size)
        (log.info if first else log.debug)(
            "gemma4_passes: Gemma-4 swa_full_tokens_ratio %s -> %s (planned for %s, %.2f GiB KV): "
            "full pool %d -> %d tokens, SWA pool %d -> %d tokens",
            old_ratio, ratio, shape, available_bytes / 2**30, old_full, config.full_max_total_num_tokens,
            old_swa, config.swa_max_total_num_tokens,
        )
        return config

    configurator.calculate_pool_sizes = calculate_pool_sizes


def after_create_memory_pool_configurator(result: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER hook on ``create_memory_pool_configurator(kvc)``: plan the ratio where allowed."""
    kvc = kwargs.get("kvc", args[0] if args else None)
    reason = why_not_planned(result, kvc)
    if reason is not None:
        log.debug("gemma4_passes: SWA pool planner not applied (%s)", reason)
        return None
    install_planned_sizing(result, kvc)
    return None  # keep SGLang's configurator (patched in place)


def reset_planned_ratio() -> None:
    """Forget the ratio planned in this process (tests)."""
    global _planned_ratio
    with _lock:
        _planned_ratio = None


# ------------------------------------------------------------------------------------------------
# (2) no pool slots for KV-shared layers
# ------------------------------------------------------------------------------------------------
def _decoder_layers(model: Any) -> list | None:
    for root in (model, getattr(model, "model", None)):
        for attr in ("language_model", "model"):
            inner = getattr(root, attr, None)
            if inner is not None and hasattr(inner, "layers"):
                return list(inner.layers)
    return None


def pool_layout_is_local() -> bool:
    """True when no other process must agree with this rank's KV pool layout.

    PD disaggregation ships KV buffers layer by layer to a peer and the hierarchical cache
    keys host/storage pages by layer: a peer without the plugin would disagree. Unknown counts
    as not local.
    """
    try:
        from sglang.srt.runtime_context import get_disagg, get_memory

        return get_disagg().disaggregation_mode in (None, "null") and not get_memory().enable_hierarchical_cache
    except Exception:
        return False


def unread_kv_shared_layers(model: Any) -> list[int]:
    """KV-shared layers whose own pool slot no attention layer of ``model`` reads or writes.

    A layer reaches the KV pool only through its ``RadixAttention.layer_id`` (reads and, with
    ``save_kv_cache``, writes); a KV-shared layer's points at its producer.
    """
    layers = _decoder_layers(model)
    if not layers:
        return []
    pointed_at = set()
    for layer in layers:
        radix = getattr(getattr(layer, "self_attn", None), "attn", None)
        if radix is not None and getattr(radix, "layer_id", None) is not None:
            pointed_at.add(int(radix.layer_id))
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if getattr(attn, "is_kv_shared_layer", False) and i not in pointed_at:
            out.append(i)
    return out


def reclaim_kv_shared_slots(layer_info: Any, *, model: Any, model_config: Any, is_draft_worker: bool = False) -> Any:
    """``layer_info`` without the pool ids of unread KV-shared layers, or None to keep it."""
    if not _enabled(ENV_RECLAIM) or is_draft_worker or not is_gemma4(model_config):
        return None
    if not getattr(model_config, "is_hybrid_swa", False) or getattr(layer_info, "swa_attention_layer_ids", None) is None:
        return None
    n_layers = len(_decoder_layers(model) or ())
    if getattr(layer_info, "start_layer", 0) != 0 or getattr(layer_info, "end_layer", n_layers) != n_layers:
        log.info("gemma4_passes: KV-shared pool slots kept (pipeline-parallel slice)")
        return None
    unread = set(unread_kv_shared_layers(model))
    if not unread:
        return None
    if not pool_layout_is_local():
        log.info("gemma4_passes: KV-shared pool slots kept (PD disaggregation or hierarchical cache: a peer "
                 "must agree on the pool layout)")
        return None
    import msgspec

    swa = [i for i in layer_info.swa_attention_layer_ids if i not in unread]
    full = [i for i in layer_info.full_attention_layer_ids if i not in unread]
    log.info(
        "gemma4_passes: Gemma-4 KV-shared layers %s own no KV: no pool slots for them "
        "(full-attention pool %d -> %d layers, SWA pool %d -> %d layers)",
        _ranges(sorted(unread)), len(layer_info.full_attention_layer_ids), len(full),
        len(layer_info.swa_attention_layer_ids), len(swa),
    )
    return msgspec.structs.replace(layer_info, swa_attention_layer_ids=swa, full_attention_layer_ids=full)


def after_resolve_layer_indices(result: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on ``resolve_layer_indices(*, model, model_config, is_draft_worker, draft_model_idx)``."""
    try:
        return reclaim_kv_shared_slots(
            result,
            model=kwargs.get("model"),
            model_config=kwargs.get("model_config"),
            is_draft_worker=bool(kwargs.get("is_draft_worker", False)),
        )
    except Exception:
        if _strict():
            raise
        log.warning("gemma4_passes: KV-shared pool slots kept (the check failed)", exc_info=True)
        return None


def _ranges(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return str(ids)


# ------------------------------------------------------------------------------------------------
# (3) SWA state follows the pool in the frozen-KV MTP views
# ------------------------------------------------------------------------------------------------
@contextmanager
def around_frozen_kv_view(original_fn: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    """AROUND hook on ``frozen_kv_target_view`` / ``target_kv_pool_view`` (context managers).

    SGLang's view swaps ``draft_attn_backend.token_to_kv_pool``; inside it, the backend's
    sliding-window state is switched to that pool and restored first on the way out.
    """
    backend = kwargs.get("draft_attn_backend", args[2] if len(args) > 2 else None)
    with original_fn(*args, **kwargs):
        if backend is None or not _enabled(ENV_VIEW):
            yield
            return
        with swa_backend_view(backend, backend.token_to_kv_pool):
            yield


#: (target, hook, HookType name) for ``sglang_plugin.all_hooks``.
SGLANG_HOOKS = [
    (POOL_CONFIGURATOR_TARGET, after_create_memory_pool_configurator, "AFTER"),
    (LAYER_INDICES_TARGET, after_resolve_layer_indices, "AFTER"),
    (FROZEN_TARGET_VIEW_TARGET, around_frozen_kv_view, "AROUND"),
    (FROZEN_POOL_VIEW_TARGET, around_frozen_kv_view, "AROUND"),
]

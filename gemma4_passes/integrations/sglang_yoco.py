"""YOCO fast prefill in SGLang 0.5.23: an AROUND hook on ``Gemma4TextModel.forward``.

For an eligible extend batch the hook runs the model's own forward twice, as two pipeline stages of
one process, and keeps only the last token of each request in between:

1. stage "first": layers ``0 .. first_kv_shared - 1`` on every token (embeddings, PLE, the KV
   writes of the owner layers: everything the full run does there), ending in the model's own
   pipeline hand-off (``PPProxyTensors``: the residual stream, the PLE tensor);
2. the hand-off tensors and ``positions`` keep the rows ``cumsum(extend_seq_lens) - 1`` (one per
   request); a shallow copy of the ``ForwardBatch`` becomes a DECODE batch over the same requests
   (same ``seq_lens``, ``req_pool_indices``; ``input_ids``/``positions``/``out_cache_loc`` at the
   kept rows) and the attention backend plans decode metadata for it: one query per request at its
   last position, attending over every KV slot of the request, which the owner layers have just
   written (the KV-shared layers read their owner's cache and write none);
3. stage "last": the KV-shared layers on the kept rows, the final norm;
4. the result is scattered back to a ``[num_tokens, hidden]`` tensor at the kept rows, which are
   exactly the rows ``LogitsProcessor`` reads for an extend batch without input logprobs, so the
   logits processor and everything after it are unchanged.

What it relies on (sglang 0.5.23, paths under ``sglang/srt/``):

* ``models/gemma4_causal.py:1024`` ``Gemma4TextModel.forward(input_ids, positions, forward_batch,
  input_embeds, per_layer_inputs, pp_proxy_tensors, **kwargs)``; it branches on
  ``self.pp_group.is_first_rank`` (:1034) / ``is_last_rank`` (:1078), runs
  ``range(self.start_layer, self.end_layer)`` (:1062), returns ``PPProxyTensors`` with
  ``hidden_states``, ``residual`` and ``per_layer_inputs`` before the last rank (:1078-1088),
  re-imports them with ``layers[start_layer].attn_boundary.from_pp`` and
  ``pp_proxy_tensors.tensors.get("per_layer_inputs")`` (:1052-1057), and ends in
  ``residual_batch.final_norm`` (:1096). The hook swaps ``pp_group``/``start_layer``/``end_layer``
  for the two calls and restores them.
* ``models/gemma4_causal.py:433`` / ``:540``: KV-shared layers attend with their owner's
  ``layer_id`` and ``save_kv_cache=False``.
* ``layers/logits_processor.py:722``: an extend batch without input logprobs reads
  ``hidden_states[cumsum(extend_seq_lens) - 1]``; ``:367-386``: input logprobs are on when
  ``return_logprob`` and some ``extend_seq_lens_cpu - extend_logprob_start_lens_cpu > 0``.
* ``model_executor/forward_batch_info.py:198`` ``ForwardMode`` (``EXTEND``, ``DECODE``) and the
  ``ForwardBatch`` fields (``:493``) named in ``BATCH_FIELDS``.
* ``model_executor/forward_context.py:73`` ``get_attn_backend()``;
  ``layers/attention/base_attn_backend.py:99`` ``init_forward_metadata(forward_batch)`` and ``:321-343``
  ``forward`` dispatching a DECODE batch to ``forward_decode``; ``layers/radix_attention.py:133-185``
  (outside prefill graphs a DECODE batch goes straight to the backend).
* The prefill CUDA-graph runner captures this very forward
  (``model_executor/runner/prefill_cuda_graph_runner.py:676``): inside its scope
  (``model_executor/runner_utils/prefill_graph.py:21`` ``is_in_prefill_graph_scope``,
  ``runner_backend_utils/breakable_cuda_graph/context.py:31`` ``is_in_breakable_cuda_graph``) or any
  stream capture, the hook runs the full forward. Long prompts (above the graph's token buckets)
  run eagerly, which is where YOCO applies.

Full forward (one INFO line per reason) for: ``GEMMA4_PASSES_YOCO=0``; batches other than EXTEND
(MIXED, TARGET_VERIFY, DRAFT_EXTEND_V2, SPLIT_PREFILL, DLLM; DECODE/IDLE pass through silently);
speculative decoding (``spec_info`` / ``spec_algorithm``); input logprobs; hidden-state capture
(``capture_hidden_mode`` FULL, aux layers, ``return_hidden_states_before_norm``); scoring
(``token_indices_to_pool``, ``multi_item_delimiter_indices``, ``is_prefill_only``); pipeline
parallelism (``pp_group.world_size > 1``, ``pp_proxy_tensors``); DP attention / MLP sync
(``global_num_tokens_cpu``), two-batch overlap, context / sequence parallel attention, LayerNorm SP,
LoRA; prefill graphs. If planning the decode metadata fails, the KV-shared layers run on every row
with the batch's own metadata re-planned (a warning, once).

Registration: SGLang resolves (imports) every hook target when it applies the hooks, and
``models/gemma4_causal.py`` imports CUDA-only kernels, so the hook is registered where CUDA is
available; ``GEMMA4_PASSES_YOCO=1`` registers it anyway, ``=0`` never. Nothing from SGLang is
imported at module import time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import sys
import threading
from typing import Any, Callable, Iterator

import torch

from gemma4_passes.envflags import switched_off, switched_on

log = logging.getLogger("gemma4_passes.sglang.yoco")

ENV_SWITCH = "GEMMA4_PASSES_YOCO"
TARGET = "sglang.srt.models.gemma4_causal.Gemma4TextModel.forward"

#: ForwardBatch fields the hook reads or sets (checked against sglang's dataclass by the tests).
BATCH_FIELDS = (
    "forward_mode",
    "batch_size",
    "input_ids",
    "positions",
    "out_cache_loc",
    "seq_lens",
    "extend_seq_lens",
    "extend_seq_lens_cpu",
    "extend_logprob_start_lens_cpu",
    "return_logprob",
    "spec_info",
    "spec_algorithm",
    "capture_hidden_mode",
    "return_hidden_states_before_norm",
    "token_indices_to_pool",
    "multi_item_delimiter_indices",
    "is_prefill_only",
    "global_num_tokens_cpu",
    "tbo_split_seq_index",
    "tbo_children",
    "attn_tp_sequence_sharded",
    "attn_cp_metadata",
    "attn_dcp_metadata",
    "lora_ids",
)

# Modules whose state says "inside a prefill graph" (looked up in sys.modules, never imported:
# if a module is not loaded, nothing can be inside its scope).
_GRAPH_SCOPE_CHECKS = (
    ("sglang.srt.model_executor.runner_utils.prefill_graph", "is_in_prefill_graph_scope"),
    ("sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context", "is_in_breakable_cuda_graph"),
)
_LAYERNORM_SP = ("sglang.srt.layers.layernorm_sp", "layernorm_sp_enabled")

_SILENT = ("decode", "nothing_to_prune")

_logged: set[str] = set()
_log_lock = threading.Lock()


def is_switched_off() -> bool:
    return switched_off(ENV_SWITCH)


def should_register() -> bool:
    """Register the hook: forced by ``GEMMA4_PASSES_YOCO=1``, never with ``=0``, else where CUDA is."""
    if switched_off(ENV_SWITCH):
        return False
    if switched_on(ENV_SWITCH):
        return True
    return torch.cuda.is_available()


def _note(reason: str, level: int = logging.INFO) -> None:
    key = reason.split(":")[0]
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.log(level, "gemma4_passes YOCO (SGLang): full prefill (%s)", reason)


def _module_flag(module: str, fn: str) -> bool:
    mod = sys.modules.get(module)
    check = getattr(mod, fn, None) if mod is not None else None
    return bool(check()) if callable(check) else False


def _in_prefill_graph() -> bool:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return True
    return any(_module_flag(m, f) for m, f in _GRAPH_SCOPE_CHECKS)


def first_kv_shared_layer(config: Any) -> int | None:
    n = int(config.num_hidden_layers)
    shared = int(getattr(config, "num_kv_shared_layers", 0) or 0)
    return n - shared if 0 < shared < n else None


def _wants_input_logprobs(fb: Any) -> bool:
    if not fb.return_logprob:
        return False
    starts = fb.extend_logprob_start_lens_cpu or []
    return any(e - s > 0 for e, s in zip(fb.extend_seq_lens_cpu or [], starts))


def fallback_reason(model: Any, fb: Any, pp_proxy_tensors: Any = None) -> str | None:
    """Why this call must run the full forward, or None for YOCO (see the module docstring)."""
    if is_switched_off():
        return f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    mode = fb.forward_mode
    name = getattr(mode, "name", str(mode))
    if name in ("DECODE", "IDLE", "PREBUILT"):
        return "decode"
    if name in ("TARGET_VERIFY", "DRAFT_EXTEND_V2"):
        return f"speculative: a {name} batch"
    if name != "EXTEND":
        return f"mode: {name} batches are left alone"
    spec_alg = fb.spec_algorithm
    if fb.spec_info is not None or (spec_alg is not None and not spec_alg.is_none()):
        return "speculative: speculative decoding"
    first = first_kv_shared_layer(model.config)
    if first is None:
        return "no_shared_layers: the model has no KV-shared layers"
    pp = getattr(model, "pp_group", None)
    if pp_proxy_tensors is not None or (pp is not None and getattr(pp, "world_size", 1) > 1):
        return "pipeline: pipeline parallelism"
    if model.start_layer != 0 or model.end_layer != model.config.num_hidden_layers:
        return "pipeline: the model holds a layer range"
    if _wants_input_logprobs(fb):
        return "logprobs: input-token logprobs requested"
    capture = fb.capture_hidden_mode
    if (capture is not None and capture.is_full()) or getattr(model, "layers_to_capture", None):
        return "hidden_states: hidden states of every position captured"
    if fb.return_hidden_states_before_norm:
        return "hidden_states: hidden states before the norm requested"
    if fb.token_indices_to_pool is not None or fb.multi_item_delimiter_indices is not None or fb.is_prefill_only:
        return "scoring: a prefill-only / scoring batch"
    if fb.global_num_tokens_cpu is not None:
        return "dp_attention: DP attention / MLP sync"
    if fb.tbo_split_seq_index is not None or fb.tbo_children:
        return "two_batch_overlap: two-batch overlap"
    if fb.attn_tp_sequence_sharded or fb.attn_cp_metadata is not None or fb.attn_dcp_metadata is not None:
        return "context_parallel: sequence / context-parallel attention"
    if _module_flag(*_LAYERNORM_SP):
        return "layernorm_sp: LayerNorm sequence parallelism"
    if fb.lora_ids and any(x is not None for x in fb.lora_ids):
        return "lora: LoRA adapters"
    if _in_prefill_graph():
        return "prefill_graph: inside a prefill CUDA-graph capture / replay"
    if fb.extend_seq_lens is None or fb.extend_seq_lens_cpu is None:
        return "no_extend_lens: the batch has no extend_seq_lens"
    if all(n <= 1 for n in fb.extend_seq_lens_cpu):
        return "nothing_to_prune"
    return None


def kept_rows(fb: Any) -> torch.Tensor:
    """The row of each request's last token in the flat extend batch (what LogitsProcessor reads)."""
    return torch.cumsum(fb.extend_seq_lens, dim=0) - 1


def pruned_batch(fb: Any, keep: torch.Tensor) -> Any:
    """A shallow copy of ``fb`` as a DECODE batch over the same requests, one row each."""
    out = copy.copy(fb)
    out.forward_mode = type(fb.forward_mode).DECODE
    if fb.input_ids is not None:
        out.input_ids = fb.input_ids[keep]
    if fb.positions is not None:
        out.positions = fb.positions[keep]
    if fb.out_cache_loc is not None:
        out.out_cache_loc = fb.out_cache_loc[keep]
    return out


def attention_backend() -> Any:
    """SGLang's attention backend of the running forward (``forward_context.get_attn_backend``)."""
    from sglang.srt.model_executor.forward_context import get_attn_backend

    return get_attn_backend()


class _StageGroup:
    """``pp_group`` as one pipeline stage sees it; every other attribute is the real group's."""

    def __init__(self, real: Any, *, first: bool, last: bool):
        self._real = real
        self.is_first_rank = first
        self.is_last_rank = last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@contextlib.contextmanager
def as_stage(model: Any, *, first: bool, last: bool, start: int, end: int) -> Iterator[None]:
    """Run ``model.forward`` as the pipeline stage holding layers ``start .. end - 1``."""
    saved = (model.pp_group, model.start_layer, model.end_layer)
    model.pp_group = _StageGroup(saved[0], first=first, last=last)
    model.start_layer, model.end_layer = start, end
    try:
        yield
    finally:
        model.pp_group, model.start_layer, model.end_layer = saved


def _scatter_rows(hidden: torch.Tensor, keep: torch.Tensor, num_tokens: int) -> torch.Tensor:
    out = hidden.new_zeros((num_tokens, *hidden.shape[1:]))
    out[keep] = hidden
    return out


def _take_rows(proxy: Any, keep: torch.Tensor) -> Any:
    return type(proxy)({name: t[keep] for name, t in proxy.tensors.items()})


def yoco_text_model_forward(
    original: Callable,
    self: Any,
    input_ids: torch.Tensor | None,
    positions: torch.Tensor,
    forward_batch: Any,
    input_embeds: torch.Tensor | None = None,
    per_layer_inputs: torch.Tensor | None = None,
    pp_proxy_tensors: Any = None,
    **kwargs: Any,
):
    """AROUND hook on ``Gemma4TextModel.forward`` (HookRegistry calls it as ``hook(original, *args)``)."""
    reason = fallback_reason(self, forward_batch, pp_proxy_tensors)
    if reason is not None:
        if reason not in _SILENT:
            _note(reason)
        return original(
            self, input_ids, positions, forward_batch, input_embeds, per_layer_inputs,
            pp_proxy_tensors=pp_proxy_tensors, **kwargs,
        )  # fmt: skip

    first = first_kv_shared_layer(self.config)
    end = self.end_layer
    num_tokens = positions.shape[0]

    # 1. owner layers, every token: the model's own forward as a first pipeline stage.
    with as_stage(self, first=True, last=False, start=self.start_layer, end=first):
        handoff = original(
            self, input_ids, positions, forward_batch, input_embeds, per_layer_inputs,
            pp_proxy_tensors=None, **kwargs,
        )  # fmt: skip

    # 2. the last token of each request; decode metadata for the KV-shared layers.
    keep = kept_rows(forward_batch)
    small = pruned_batch(forward_batch, keep)
    backend = attention_backend()
    try:
        backend.init_forward_metadata(small)
        stage_batch, stage_handoff, stage_ids, stage_pos = small, _take_rows(handoff, keep), small.input_ids, small.positions
    except Exception:
        _note("replan_failed: could not plan decode metadata for the KV-shared layers", logging.WARNING)
        log.debug("decode re-plan failed", exc_info=True)
        backend.init_forward_metadata(forward_batch)
        stage_batch, stage_handoff, stage_ids, stage_pos = forward_batch, handoff, input_ids, positions

    # 3. KV-shared layers on the kept rows, final norm: the model's own forward as a last stage.
    with as_stage(self, first=False, last=True, start=first, end=end):
        hidden = original(
            self, stage_ids, stage_pos, stage_batch, None, None,
            pp_proxy_tensors=stage_handoff, **kwargs,
        )  # fmt: skip
    if stage_batch is forward_batch:
        return hidden

    # 4. back to one row per token, at the rows LogitsProcessor reads.
    return _scatter_rows(hidden, keep, num_tokens)


def __getattr__(name: str) -> Any:
    # SGLANG_HOOKS is computed when read (at plugin registration), so the environment of that
    # moment decides (see should_register).
    if name == "SGLANG_HOOKS":
        return [(TARGET, yoco_text_model_forward, "AROUND")] if should_register() else []
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""YOCO fast prefill for Gemma-4 models with KV-shared layers (E2B, E4B).

E2B and E4B end in a "cross-decoder": their last 20 of 35 / 18 of 42 layers read the K/V of an
earlier layer and write none. During a prefill only the rows whose logits are returned (the last
token of each request, or the rows asked for) need those layers, so YOCO keeps only those rows
before the first KV-shared layer. The outputs at the kept rows and the KV cache are the full run's.

transformers (opt-in)::

    from gemma4_passes.runtime.yoco import wrap
    fast = wrap(model)                                    # a Gemma4ForCausalLM
    out = fast(input_ids, attention_mask=mask)            # logits [B, 1, V]: each request's last token
    out = fast(input_ids, attention_mask=mask, logits_to_keep=4)   # the last 4 columns, as transformers

or ``yoco_forward(model, ...)`` (what the wrapper and the piecewise runtime call). Batches of mixed
prompt lengths: a padded ``[B, T]`` batch with a 2-D ``attention_mask`` (left or right padding), or
a packed batch whose ``position_ids`` restart at every request (transformers builds packed masks
only without a cache: pass ``use_cache=False``). See ``yoco_rows`` for ``logits_to_keep``.

Each guard below runs the full, unmodified forward instead and says why once per reason in the
``gemma4_passes.yoco`` log (INFO):

* ``GEMMA4_PASSES_YOCO=0`` (or false/off/no);
* ``speculative=True``: a speculative / verify forward (the caller says so);
* ``pipeline_parallel=True``, or a model that is a pipeline stage (layers removed or replaced, no
  embedding, final norm or LM head: ``yoco_hf.structure_problem``);
* hidden states, attentions or router logits asked for (``output_hidden_states`` etc., in the call or
  the config): they include the KV-shared layers at every position;
* ``logits_to_keep=0`` (every position, e.g. prompt logprobs) or ``labels`` (a loss over every
  position);
* attention other than SDPA / eager; training mode; an argument YOCO does not know.

Decode steps (one token per row) gain nothing and pass through unchanged, without a log line.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch

from ..envflags import switched_off
from . import yoco_hf
from .yoco_rows import LAST, RowRequest, RowSelectionError, gather_rows, needed_rows

__all__ = [
    "ENV_SWITCH",
    "LAST",
    "UnsupportedModelError",
    "YocoForCausalLM",
    "fallback_reason",
    "is_switched_off",
    "wrap",
    "yoco_forward",
]

log = logging.getLogger("gemma4_passes.yoco")

ENV_SWITCH = "GEMMA4_PASSES_YOCO"

# Arguments of Gemma4ForCausalLM.forward YOCO handles itself, besides the explicit ones.
_KNOWN_KWARGS = ("shared_kv_states", "return_shared_kv_states", "return_dict")
_RECORD_FLAGS = ("output_hidden_states", "output_attentions", "output_router_logits")

_logged: set[str] = set()
_log_lock = threading.Lock()


class UnsupportedModelError(TypeError):
    """``wrap`` was given a model whose structure YOCO does not know."""


def is_switched_off() -> bool:
    """``GEMMA4_PASSES_YOCO=0`` (read on every call, so it can be flipped at run time)."""
    return switched_off(ENV_SWITCH)


def _note_fallback(reason: str) -> None:
    """One INFO line per distinct reason, for the life of the process."""
    key = reason.split(":")[0]
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info("gemma4_passes YOCO: full prefill (%s)", reason)


def _structure_problem(model: torch.nn.Module) -> str | None:
    # The structure does not change between calls: check once per model object.
    cached = getattr(model, "_gemma4_yoco_structure", None)
    if cached is None:
        cached = yoco_hf.structure_problem(model) or ""
        try:
            object.__setattr__(model, "_gemma4_yoco_structure", cached)
        except Exception:  # pragma: no cover - exotic module classes
            pass
    return cached or None


def fallback_reason(
    model: torch.nn.Module,
    *,
    seq_len: int,
    logits_to_keep: RowRequest,
    labels: Any = None,
    speculative: bool = False,
    pipeline_parallel: bool = False,
    kwargs: dict | None = None,
) -> str | None:
    """Why this forward must be the full run (see the module docstring), or None for YOCO.

    ``"decode"`` for single-token steps (not logged).
    """
    kwargs = kwargs or {}
    if is_switched_off():
        return f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    if speculative:
        return "speculative: a speculative / verify forward"
    if pipeline_parallel:
        return "pipeline_parallel: a pipeline-parallel stage"
    problem = _structure_problem(model)
    if problem:
        return f"structure: {problem}"
    cfg = model.config
    if not getattr(cfg, "num_kv_shared_layers", 0):
        return "no_shared_layers: the model has no KV-shared layers"
    if seq_len <= 1:
        return "decode"
    for flag in _RECORD_FLAGS:
        if kwargs.get(flag) or getattr(cfg, flag, False):
            return f"{flag}: per-position outputs of the KV-shared layers requested"
    if labels is not None:
        return "labels: a loss over every position"
    if isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0:
        return "all_logits: logits_to_keep=0 asks for every position"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in yoco_hf.SUPPORTED_ATTENTION:
        return f"attention: {impl!r} (YOCO handles {', '.join(yoco_hf.SUPPORTED_ATTENTION)})"
    if model.training:
        return "training: the model is in training mode"
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _KNOWN_KWARGS + _RECORD_FLAGS)
    if unknown:
        return f"arguments: {unknown} not handled by YOCO"
    return None


def _as_transformers_request(rows: torch.Tensor, seq_len: int) -> int | torch.Tensor | None:
    """The ``logits_to_keep`` that makes transformers return exactly ``rows``, or None if none does."""
    k = rows.shape[1]
    if bool((rows == torch.arange(seq_len - k, seq_len, device=rows.device)).all()):
        return k
    if bool((rows == rows[:1]).all()):
        return rows[0]
    return None


def _full_run(model, rows: torch.Tensor | None, logits_to_keep: RowRequest, seq_len: int, **call):
    """The unmodified forward; for per-row requests, its logits gathered at ``rows``."""
    if rows is None:
        return model(logits_to_keep=logits_to_keep, **call)
    request = _as_transformers_request(rows, seq_len)
    if request is not None:
        return model(logits_to_keep=request, **call)
    out = model(logits_to_keep=0, **call)
    out.logits = gather_rows(out.logits, rows)
    return out


def yoco_forward(
    model: torch.nn.Module,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: RowRequest = LAST,
    per_layer_inputs: torch.Tensor | None = None,
    *,
    speculative: bool = False,
    pipeline_parallel: bool = False,
    **kwargs: Any,
):
    """``model(...)`` (a transformers ``Gemma4ForCausalLM``) with YOCO where it applies.

    Same arguments and output class as ``Gemma4ForCausalLM.forward``; ``logits_to_keep`` also takes
    ``"last"`` (default: each request's last real token) and a ``[B, K]`` LongTensor (see
    ``yoco_rows``). ``logits`` is ``[B, K, V]`` for the K kept rows; ``past_key_values`` is the
    cache the full run would leave. ``speculative`` / ``pipeline_parallel`` force the full run.
    """
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch, seq_len = ref.shape[0], ref.shape[1]
    call = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        labels=labels,
        use_cache=use_cache,
        per_layer_inputs=per_layer_inputs,
        **kwargs,
    )
    try:
        rows = needed_rows(
            logits_to_keep,
            batch=batch,
            seq_len=seq_len,
            attention_mask=attention_mask if isinstance(attention_mask, torch.Tensor) else None,
            position_ids=position_ids,
            device=ref.device,
        )
    except RowSelectionError as e:
        rows, row_problem = None, str(e)
    else:
        row_problem = None

    reason = fallback_reason(
        model,
        seq_len=seq_len,
        logits_to_keep=logits_to_keep,
        labels=labels,
        speculative=speculative,
        pipeline_parallel=pipeline_parallel,
        kwargs=kwargs,
    )
    if reason is None and row_problem is not None:
        reason = f"rows: {row_problem}"
    if reason is not None:
        if reason != "decode":
            _note_fallback(reason)
        return _full_run(model, rows, logits_to_keep, seq_len, **call)

    return_shared = bool(kwargs.pop("return_shared_kv_states", False))
    kwargs.pop("return_dict", None)
    hidden, cache, shared = yoco_hf.forward_kept_rows(
        model,
        rows,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        per_layer_inputs=per_layer_inputs,
        use_cache=use_cache,
        **kwargs,
    )
    logits = yoco_hf.lm_head_logits(model, hidden)
    output_cls = yoco_hf._modeling_module(model.model).Gemma4CausalLMOutputWithPast
    return output_cls(
        logits=logits,
        past_key_values=cache,
        shared_kv_states=shared if return_shared else None,
    )


class YocoForCausalLM(torch.nn.Module):
    """A transformers ``Gemma4ForCausalLM`` whose prefills run YOCO (``yoco_forward``).

    ``causal_lm`` is the wrapped model (its parameters are this module's); ``config`` is its config.
    """

    def __init__(self, causal_lm: torch.nn.Module):
        super().__init__()
        problem = yoco_hf.identity_problem(causal_lm)
        if problem is not None:
            raise UnsupportedModelError(f"YOCO cannot wrap {type(causal_lm).__name__}: {problem}")
        self.causal_lm = causal_lm

    @property
    def config(self):
        return self.causal_lm.config

    def forward(self, *args: Any, **kwargs: Any):
        return yoco_forward(self.causal_lm, *args, **kwargs)


def wrap(model: torch.nn.Module) -> YocoForCausalLM:
    """``YocoForCausalLM(model)``; raises ``UnsupportedModelError`` if ``model`` is not a Gemma-4
    causal LM. A Gemma-4 model YOCO cannot run (no KV-shared layers, a pipeline stage, a transformers
    version whose code differs from the mirrored one) is accepted and always runs the full forward.
    """
    return YocoForCausalLM(model)

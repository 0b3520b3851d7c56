"""YOCO for transformers' Gemma-4: the decoder stack, run on every token up to the first KV-shared
layer and on the kept rows only from there on.

``forward_kept_rows`` mirrors ``Gemma4TextModel.forward`` (transformers 5.17 - 5.23: embeddings,
per-layer inputs, cache, position ids, masks, RoPE tables, the ``shared_kv_states`` container, the
layer loop, the final norm) and cuts the sequence at the first KV-shared layer:

* the owner layers (``0 .. first-1``) run exactly as in the full run, on every token, so the KV cache
  they write and the K/V they hand to the shared layers (``shared_kv_states[layer_type]``, the full
  length K/V the producer's attention returned) are the full run's;
* at the first KV-shared layer the hidden states, the per-layer inputs (PLE), the RoPE cos/sin and
  the position ids are gathered at the kept rows, and each attention mask keeps the query rows of
  the kept positions (keys stay the owner layer's full K/V). A mask transformers left out (SDPA's
  ``is_causal`` shortcut: upper-left causal, no padding) is built explicitly for the kept rows,
  since SDPA would otherwise treat a one-row query as attending to everything;
* the KV-shared layers write no KV (transformers never calls ``past_key_values.update`` there), so
  running them on fewer rows changes no cache.

Only SDPA and eager attention are supported (their masks are dense ``[B, 1, Q, KV]`` tensors whose
query rows can be taken); flash and flex attention, and anything that is not the module structure
checked by ``structure_problem``, fall back to the full run (see ``yoco.py``).
"""

from __future__ import annotations

import inspect
import sys
from collections import UserDict
from typing import Any

import torch

from .yoco_rows import gather_rows

__all__ = ["SUPPORTED_ATTENTION", "identity_problem", "structure_problem", "forward_kept_rows", "kept_rows_mask", "lm_head_logits"]

#: attention implementations whose masks YOCO can restrict to the kept query rows.
SUPPORTED_ATTENTION = ("sdpa", "eager")

# Parameter names of the transformers code this module mirrors (5.17 - 5.23).
_LAYER_PARAMS = (
    "self",
    "hidden_states",
    "per_layer_input",
    "shared_kv_states",
    "position_embeddings",
    "attention_mask",
    "position_ids",
    "past_key_values",
)
_TEXT_MODEL_PARAMS = {
    "input_ids",
    "attention_mask",
    "position_ids",
    "past_key_values",
    "inputs_embeds",
    "per_layer_inputs",
    "use_cache",
}
_MODELING_NAMES = ("create_causal_mask", "create_sliding_window_causal_mask", "DynamicCache")


def _modeling_module(text_model: torch.nn.Module):
    return sys.modules[type(text_model).__module__]


def _transformers_version() -> str:
    try:
        import transformers

        return transformers.__version__
    except Exception:  # pragma: no cover
        return "?"


def _first_shared(cfg) -> int:
    return cfg.num_hidden_layers - (cfg.num_kv_shared_layers or 0)


def identity_problem(model: torch.nn.Module) -> str | None:
    """Why ``model`` is not a Gemma-4 causal LM at all (``.model`` a gemma4_text model, ``.lm_head``)."""
    text_model = getattr(model, "model", None)
    if text_model is None or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} has no .model / .lm_head (not a Gemma4ForCausalLM)"
    cfg = getattr(text_model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "gemma4_text":
        return f"{type(text_model).__name__} is not a Gemma-4 text model (model_type {getattr(cfg, 'model_type', None)!r})"
    return None


def structure_problem(model: torch.nn.Module) -> str | None:
    """Why ``forward_kept_rows`` cannot run ``model`` (a ``Gemma4ForCausalLM``), or None.

    Checks the attributes and call signatures the mirror relies on against the installed
    transformers, that the KV-shared layers are the ones the config says, and that the model is
    whole (a pipeline stage has layers removed or replaced, or no embedding / final norm / LM head).
    """
    problem = identity_problem(model)
    if problem is not None:
        return problem
    version = _transformers_version()
    text_model = model.model
    cfg = text_model.config
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        mod = getattr(text_model, name, None)
        if mod is None or isinstance(mod, torch.nn.Identity):
            return f"the text model has no {name} (a pipeline-parallel stage?)"
    if model.lm_head is None or isinstance(model.lm_head, torch.nn.Identity):
        return "the LM head is an Identity (a pipeline-parallel stage?)"
    layers = text_model.layers
    n = cfg.num_hidden_layers
    if len(layers) != n:
        return f"{len(layers)} decoder layers for num_hidden_layers={n} (a pipeline-parallel stage?)"
    layer_cls = type(layers[0])
    if any(type(layer) is not layer_cls for layer in layers):
        return "the decoder layers are not all of one class (a pipeline-parallel stage?)"

    params = tuple(inspect.signature(layer_cls.forward).parameters)
    if params[: len(_LAYER_PARAMS)] != _LAYER_PARAMS:
        return f"{layer_cls.__name__}.forward{params} is not the signature YOCO mirrors (transformers {version})"
    tm_params = set(inspect.signature(type(text_model).forward).parameters)
    if not _TEXT_MODEL_PARAMS <= tm_params:
        return (
            f"{type(text_model).__name__}.forward lacks {sorted(_TEXT_MODEL_PARAMS - tm_params)} "
            f"(transformers {version})"
        )
    modeling = _modeling_module(text_model)
    missing = [name for name in _MODELING_NAMES if not hasattr(modeling, name)]
    if missing:
        return f"{modeling.__name__} lacks {missing} (transformers {version})"
    if getattr(cfg, "hidden_size_per_layer_input", 0):
        for name in ("get_per_layer_inputs", "project_per_layer_inputs"):
            if not hasattr(text_model, name):
                return f"the text model has per-layer inputs but no {name}()"

    first = _first_shared(cfg)
    for i, layer in enumerate(layers):
        shared = getattr(getattr(layer, "self_attn", None), "is_kv_shared_layer", None)
        if shared is None:
            return f"layer {i} has no self_attn.is_kv_shared_layer (transformers {version})"
        if bool(shared) != (i >= first and first < n):
            return f"layer {i}: is_kv_shared_layer={shared} but the config's first KV-shared layer is {first}"
    return None


def kept_rows_mask(
    mask: torch.Tensor | None,
    rows: torch.Tensor,
    kv_len: int,
    attn_implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The attention mask of the kept query ``rows`` ([B, K]) against ``kv_len`` keys.

    A 4-D mask from the full run keeps its query rows. ``None`` (SDPA's is_causal shortcut, only
    taken when the mask is plain upper-left causal) becomes that causal mask, materialised for the
    kept rows: boolean for SDPA, additive (0 / dtype min) for eager, as transformers builds them.
    """
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"expected a 4-D attention mask, got shape {tuple(mask.shape)}")
        return gather_rows(mask, rows, dim=2)
    kv = torch.arange(kv_len, device=rows.device)
    allowed = kv.view(1, 1, 1, kv_len) <= rows.view(rows.shape[0], 1, rows.shape[1], 1)
    if attn_implementation == "eager":
        zero = torch.zeros((), device=rows.device, dtype=dtype)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def _new_shared_kv_states(modeling, given: Any):
    """The container transformers passes between layers (KVSharingDict >= 5.2x, UserDict before)."""
    container = getattr(modeling, "KVSharingDict", None)
    if container is None:
        return given if given is not None else UserDict()
    return given if isinstance(given, container) else container(given)


def forward_kept_rows(
    model: torch.nn.Module,
    rows: torch.Tensor,
    *,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | dict | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    per_layer_inputs: torch.Tensor | None = None,
    use_cache: bool | None = None,
    shared_kv_states: Any = None,
    **layer_kwargs: Any,
) -> tuple[torch.Tensor, Any, Any]:
    """Run ``model.model`` (a Gemma-4 text model) with the KV-shared layers on ``rows`` only.

    ``rows`` is a ``[B, K]`` LongTensor of positions (``yoco_rows.needed_rows``). Returns
    ``(hidden [B, K, H] after the final norm, past_key_values, shared_kv_states)``; ``hidden`` equals
    the full run's last hidden state at ``rows``. The caller has checked ``structure_problem`` and
    the guards; ``layer_kwargs`` go to every decoder layer, as in transformers.
    """
    tm = model.model
    cfg = tm.config
    modeling = _modeling_module(tm)
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if input_ids is not None and per_layer_inputs is not None:
        raise ValueError("You cannot specify per_layer_inputs if input_ids is provided")
    if use_cache is None:
        use_cache = getattr(cfg, "use_cache", False)

    # -- embeddings, PLE, cache, positions, masks, RoPE: as Gemma4TextModel.forward ------------------
    if input_ids is not None:
        inputs_embeds = tm.embed_tokens(input_ids)
    if getattr(tm, "hidden_size_per_layer_input", 0):
        if per_layer_inputs is None:
            per_layer_inputs = tm.get_per_layer_inputs(input_ids, inputs_embeds)
        per_layer_inputs = tm.project_per_layer_inputs(inputs_embeds, per_layer_inputs)
    if use_cache and past_key_values is None:
        past_key_values = modeling.DynamicCache(config=cfg)
    if position_ids is None:
        past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)
    if isinstance(attention_mask, dict):
        masks = dict(attention_mask)
    else:
        mask_kwargs = dict(
            config=cfg,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        masks = {
            "full_attention": modeling.create_causal_mask(**mask_kwargs),
            "sliding_attention": modeling.create_sliding_window_causal_mask(**mask_kwargs),
        }
    hidden = inputs_embeds
    layer_types = list(cfg.layer_types)
    rope = {t: tm.rotary_emb(hidden, position_ids, t) for t in set(layer_types)}
    shared_kv_states = _new_shared_kv_states(modeling, shared_kv_states)

    n = cfg.num_hidden_layers
    first = _first_shared(cfg)

    def run(i: int, hidden, ple, rope_i, mask_i, pos) -> torch.Tensor:
        return tm.layers[i](
            hidden,
            ple[:, :, i, :] if ple is not None else None,
            shared_kv_states=shared_kv_states,
            position_embeddings=rope_i,
            attention_mask=mask_i,
            position_ids=pos,
            past_key_values=past_key_values,
            **layer_kwargs,
        )

    # -- owner layers: every token, exactly the full run ---------------------------------------------
    for i in range(first):
        hidden = run(i, hidden, per_layer_inputs, rope[layer_types[i]], masks[layer_types[i]], position_ids)

    # -- KV-shared layers: the kept rows only ---------------------------------------------------------
    if first < n:
        hidden = gather_rows(hidden, rows)
        ple = gather_rows(per_layer_inputs, rows) if per_layer_inputs is not None else None
        pos = gather_rows(position_ids, rows)
        rope_rows = {t: (gather_rows(cos, rows), gather_rows(sin, rows)) for t, (cos, sin) in rope.items()}
        impl = cfg._attn_implementation
        mask_rows: dict[str, torch.Tensor] = {}
        for i in range(first, n):
            t = layer_types[i]
            if t not in mask_rows:
                kv_len = shared_kv_states[t][0].shape[-2]
                mask_rows[t] = kept_rows_mask(masks[t], rows, kv_len, impl, hidden.dtype)
            hidden = run(i, hidden, ple, rope_rows[t], mask_rows[t], pos)

    return tm.norm(hidden), past_key_values, shared_kv_states


def lm_head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``Gemma4ForCausalLM``'s head on ``hidden``: the LM head, then the final logit soft-cap (same ops)."""
    logits = model.lm_head(hidden)
    cap = model.config.final_logit_softcapping
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits

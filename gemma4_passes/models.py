"""Gemma-4 models for tests and benchmarks: HF configs from presets, random-weight builds, local
checkpoint loading, and per-layer facts.

* ``to_hf_config(preset)`` -> ``transformers.Gemma4TextConfig``
* ``build_model(preset, ...)`` -> ``transformers.Gemma4ForCausalLM`` in eval mode with random weights
  chosen so that every op changes the output (see ``build_model``)
* ``load_checkpoint(path, ...)`` -> ``Gemma4ForCausalLM`` from a LOCAL directory (never the hub)
* ``describe(x)`` -> per-layer facts derived from the transformers config

transformers is imported lazily, so ``import gemma4_passes.models`` stays cheap.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .presets import FULL, SLIDING, Gemma4Preset, resolve

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

__all__ = [
    "GEMMA4_MODEL_TYPES",
    "NotAGemma4CheckpointError",
    "to_hf_config",
    "build_model",
    "init_random_weights",
    "load_checkpoint",
    "describe",
]

#: ``model_type`` values ``load_checkpoint`` accepts.
GEMMA4_MODEL_TYPES = ("gemma4_text", "gemma4")

# Random-init constants (see build_model's docstring).
NORM_WEIGHT_STD = 0.3  # norm weights ~ 1 + 0.3 * N(0, 1)
SCALAR_RANGE = (0.5, 1.5)  # layer_scalar, router scale / per_expert_scale ~ U(0.5, 1.5)
ROUTER_PROJ_STD = 1.0  # router input is normed * hidden^-0.5, so std 1 gives O(1) expert scores
_CHUNK_ELEMS = 1 << 24  # draw random numbers in chunks of at most this many elements


class NotAGemma4CheckpointError(ValueError):
    """``load_checkpoint`` was pointed at something that is not a Gemma-4 checkpoint."""

    def __init__(self, path: str | os.PathLike, model_type: str | None, detail: str | None = None):
        self.path = str(path)
        self.model_type = model_type
        found = detail or (f"model_type {model_type!r}" if model_type is not None else "no model_type")
        super().__init__(
            f"{self.path} is not a Gemma-4 checkpoint: {found} "
            f"(expected model_type {' or '.join(repr(t) for t in GEMMA4_MODEL_TYPES)})"
        )


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def to_hf_config(
    preset: Gemma4Preset | str,
    *,
    attn_implementation: str = "sdpa",
    experts_implementation: str | None = None,
    tie_word_embeddings: bool | None = None,
) -> "Gemma4TextConfig":
    """The ``transformers.Gemma4TextConfig`` of a preset (or preset name).

    ``attn_implementation``: "sdpa" (default) or "eager" (or any name transformers knows).
    ``experts_implementation`` (MoE presets): None lets transformers pick ("grouped_mm" where it can
    dispatch, else "eager"); "eager" is the per-expert loop, "batched_mm"/"grouped_mm" the others.
    ``tie_word_embeddings``: None keeps the preset's value (True for all published configs).
    """
    from transformers import Gemma4TextConfig

    p = resolve(preset)
    kwargs: dict[str, Any] = dict(
        vocab_size=p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        head_dim=p.head_dim,
        global_head_dim=p.global_head_dim,  # popped by Gemma4TextConfig -> per_layer_config
        hidden_activation=p.hidden_activation,
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=p.rms_norm_eps,
        tie_word_embeddings=p.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
        rope_parameters={
            SLIDING: {"rope_type": "default", "rope_theta": p.rope_theta_sliding},
            FULL: {
                "rope_type": "proportional",
                "partial_rotary_factor": p.partial_rotary_factor_full,
                "rope_theta": p.rope_theta_full,
            },
        },
        sliding_window=p.sliding_window,
        layer_types=list(p.layer_types),
        final_logit_softcapping=p.final_logit_softcapping,
        vocab_size_per_layer_input=p.vocab_size_per_layer_input,
        hidden_size_per_layer_input=p.hidden_size_per_layer_input,
        attention_k_eq_v=p.attention_k_eq_v,
        num_kv_shared_layers=p.num_kv_shared_layers,
        enable_moe_block=p.enable_moe_block,
        use_double_wide_mlp=p.use_double_wide_mlp,
        num_experts=p.num_experts,
        top_k_experts=p.top_k_experts,
        moe_intermediate_size=p.moe_intermediate_size,
        attn_implementation=attn_implementation,
    )
    if p.num_global_key_value_heads is not None:
        kwargs["num_global_key_value_heads"] = p.num_global_key_value_heads  # popped -> per_layer_config
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    cfg = Gemma4TextConfig(**kwargs)
    if list(cfg.layer_types) != list(p.layer_types):  # pragma: no cover - transformers rewrote them
        raise RuntimeError(f"transformers changed the layer types of {p.name!r}: {cfg.layer_types}")
    return cfg


# ------------------------------------------------------------------------------------------------
# Random weights
# ------------------------------------------------------------------------------------------------
def _fill(t: torch.Tensor, gen: torch.Generator, gen_device: torch.device, kind: str, a: float, b: float) -> None:
    """Fill ``t`` in place, drawing fp32 numbers on ``gen_device`` chunk by chunk along dim 0.

    kind "normal": a + b * N(0, 1); kind "uniform": U(a, b).
    """
    flat_rows = t.shape[0] if t.dim() else 1
    row = max(1, t.numel() // max(flat_rows, 1))
    rows_per_chunk = max(1, _CHUNK_ELEMS // row)
    view = t.view(flat_rows, row) if t.dim() else t.view(1, 1)
    with torch.no_grad():
        for start in range(0, flat_rows, rows_per_chunk):
            n = min(rows_per_chunk, flat_rows - start)
            if kind == "normal":
                x = torch.randn((n, row), generator=gen, device=gen_device, dtype=torch.float32)
                x.mul_(b).add_(a)
            elif kind == "uniform":
                x = torch.rand((n, row), generator=gen, device=gen_device, dtype=torch.float32)
                x.mul_(b - a).add_(a)
            else:  # pragma: no cover
                raise ValueError(kind)
            view[start : start + n].copy_(x)


def init_random_weights(
    model: "Gemma4ForCausalLM",
    *,
    seed: int = 0,
    lm_head_scale: float = 1.0,
    init_device: str | torch.device = "cpu",
) -> "Gemma4ForCausalLM":
    """Overwrite every parameter and ``layer_scalar`` buffer of a Gemma-4 causal LM (see build_model).

    Raises if a parameter is left that the rules below do not know (a new transformers version),
    so nothing silently keeps HF's default init.
    """
    from transformers.models.gemma4 import modeling_gemma4 as m

    gen_device = torch.device(init_device)
    gen = torch.Generator(device=gen_device)
    gen.manual_seed(int(seed))
    done: set[int] = set()

    def fill(t: torch.Tensor, kind: str, a: float, b: float) -> None:
        if id(t) in done:
            return
        _fill(t, gen, gen_device, kind, a, b)
        done.add(id(t))

    lm_head_weight = model.lm_head.weight
    tied = lm_head_weight is model.model.embed_tokens.weight

    for name, mod in model.named_modules():
        if isinstance(mod, m.Gemma4RMSNorm):
            if mod.with_scale:
                fill(mod.weight, "normal", 1.0, NORM_WEIGHT_STD)
        elif isinstance(mod, m.Gemma4TextScaledWordEmbedding):
            # output = weight * embed_scale: std 1/embed_scale gives unit-RMS embeddings
            fill(mod.weight, "normal", 0.0, 1.0 / float(mod.scalar_embed_scale))
        elif isinstance(mod, m.Gemma4TextRouter):
            fill(mod.proj.weight, "normal", 0.0, ROUTER_PROJ_STD)
            fill(mod.scale, "uniform", *SCALAR_RANGE)
            fill(mod.per_expert_scale, "uniform", *SCALAR_RANGE)
        elif isinstance(mod, m.Gemma4TextExperts):
            fill(mod.gate_up_proj, "normal", 0.0, mod.hidden_dim**-0.5)
            fill(mod.down_proj, "normal", 0.0, mod.intermediate_dim**-0.5)
        elif isinstance(mod, m.Gemma4TextDecoderLayer):
            fill(mod.layer_scalar, "uniform", *SCALAR_RANGE)
        elif isinstance(mod, torch.nn.Linear):
            if mod.weight is lm_head_weight:
                continue  # the LM head is the (scaled) embedding, set below
            # unit-variance outputs for unit-RMS inputs
            fill(mod.weight, "normal", 0.0, mod.in_features**-0.5)
            if mod.bias is not None:
                fill(mod.bias, "normal", 0.0, 0.02)

    with torch.no_grad():
        if tied:
            if lm_head_scale != 1.0:
                raise ValueError(
                    "lm_head_scale != 1 needs an untied LM head (config.tie_word_embeddings=False); "
                    "build_model does that for you"
                )
        else:
            lm_head_weight.copy_(model.model.embed_tokens.weight.float().mul(lm_head_scale))
            done.add(id(lm_head_weight))

    missing = [n for n, prm in model.named_parameters() if id(prm) not in done]
    if missing:
        raise RuntimeError(f"init_random_weights does not know how to initialise: {missing[:8]}")
    return model


def build_model(
    preset: Gemma4Preset | str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    lm_head_scale: float = 1.0,
    experts_implementation: str | None = None,
    init_device: str | torch.device | None = "cpu",
) -> "Gemma4ForCausalLM":
    """A ``Gemma4ForCausalLM`` for ``preset`` in eval mode, with random weights in which every op matters.

    Weights (all drawn in fp32 from one generator seeded with ``seed``, in module order, then cast):
      * every RMSNorm weight ~ 1 + 0.3 N(0,1) (so a dropped weight, or Gemma-2/3's ``x * (1 + w)``,
        changes the output); ``v_norm`` and the router norm have no weight;
      * ``layer_scalar`` ~ U(0.5, 1.5); router ``scale`` and ``per_expert_scale`` ~ U(0.5, 1.5);
      * embeddings (token and PLE) ~ N(0, 1/embed_scale^2), so the scaled embeddings have unit RMS;
      * every projection ~ N(0, 1/fan_in) (experts too), keeping activations O(1) through the layers;
        the router projection ~ N(0, 1), since its input is scaled by hidden^-0.5;
      * the LM head is the token embedding: tied (as published) when ``lm_head_scale == 1``; otherwise
        the config is built with ``tie_word_embeddings=False`` and ``lm_head.weight`` is a copy of the
        embedding times ``lm_head_scale``, so logits (before the soft-cap) are scaled by exactly that
        factor and greedy tokens become meaningful. The random stream does not depend on
        ``lm_head_scale``: all other weights are identical.
    The same ``seed`` gives the same weights for every ``dtype``/``device`` while ``init_device`` is
    "cpu" (the default); pass ``init_device=None`` to draw on ``device`` instead (faster for the
    full-size presets on a GPU, but then the weights depend on the device).
    ``dtype`` is set as torch's default dtype while the model is built (as transformers'
    ``from_pretrained`` does), so ``layer_scalar`` and the embedding scale are in ``dtype`` too.
    """
    from transformers import Gemma4ForCausalLM

    p = resolve(preset)
    cfg = to_hf_config(
        p,
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
        tie_word_embeddings=p.tie_word_embeddings and lm_head_scale == 1.0,
    )
    device = torch.device(device)
    with _default_dtype(dtype), device:
        # Parameters and persistent buffers come out in ``dtype``; the RoPE inverse frequencies stay
        # fp32, as with from_pretrained (a blanket ``model.to(dtype)`` would round them).
        model = Gemma4ForCausalLM(cfg)
    init_random_weights(
        model,
        seed=seed,
        lm_head_scale=lm_head_scale,
        init_device=device if init_device is None else init_device,
    )
    return model.eval()


class _default_dtype:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.prev = torch.get_default_dtype()
        if self.dtype.is_floating_point:
            torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.prev)


# ------------------------------------------------------------------------------------------------
# Local checkpoints
# ------------------------------------------------------------------------------------------------
def _read_model_type(path: Path) -> str:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise NotAGemma4CheckpointError(path, None, "not a directory (no config.json)")
    if not cfg_file.is_file():
        raise NotAGemma4CheckpointError(path, None, "no config.json")
    try:
        data = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise NotAGemma4CheckpointError(path, None, f"unreadable config.json ({e})") from e
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in GEMMA4_MODEL_TYPES:
        raise NotAGemma4CheckpointError(path, model_type)
    return model_type


def load_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> "Gemma4ForCausalLM":
    """A ``Gemma4ForCausalLM`` (eval mode) from a LOCAL checkpoint directory (``local_files_only``).

    * ``model_type == "gemma4_text"``: loaded directly.
    * ``model_type == "gemma4"`` (multimodal ``Gemma4ForConditionalGeneration``): the checkpoint is
      loaded with transformers, then its language model (``model.language_model``) and ``lm_head`` are
      moved into a ``Gemma4ForCausalLM`` whose config is the checkpoint's ``text_config`` (with the
      top-level ``tie_word_embeddings``); the vision/audio towers are dropped. Text in, logits out,
      identical to the multimodal model on text-only input.
    * anything else: ``NotAGemma4CheckpointError`` naming the path and the model_type found (or
      "no config.json").
    """
    from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    path = Path(path).expanduser()
    model_type = _read_model_type(path)
    common = dict(local_files_only=True, dtype=dtype, attn_implementation=attn_implementation)
    if model_type == "gemma4_text":
        model = Gemma4ForCausalLM.from_pretrained(str(path), **common)
    else:
        full = Gemma4ForConditionalGeneration.from_pretrained(str(path), **common)
        text_model = full.model.language_model
        lm_head = full.lm_head
        text_cfg = text_model.config
        text_cfg.tie_word_embeddings = bool(full.config.tie_word_embeddings)
        with torch.device("meta"):
            model = Gemma4ForCausalLM(copy.deepcopy(text_cfg))
        model.config = text_cfg
        model.model = text_model
        model.lm_head = lm_head
        del full
    model.to(device=torch.device(device))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Per-layer facts
# ------------------------------------------------------------------------------------------------
def _as_text_config(x: Any) -> "Gemma4TextConfig":
    from transformers import Gemma4Config, Gemma4TextConfig, PreTrainedModel

    if isinstance(x, (Gemma4Preset, str)):
        return to_hf_config(x)
    if isinstance(x, PreTrainedModel):
        x = x.config
    if isinstance(x, Gemma4Config):
        x = x.text_config
    if isinstance(x, Gemma4TextConfig):
        return x
    raise TypeError(f"describe() takes a Gemma4Preset, a preset name, a Gemma-4 config or model, not {type(x)!r}")


def _kv_sharing_modes(cfg) -> list[str | None]:
    """Per layer: "reuse" (KV-shared), "store" (the producer shared layers read) or None.

    transformers >= 5.2x has ``config.kv_sharing_modes``; 5.17 (the GPU image) decides the same
    thing inside the attention module, from ``num_kv_shared_layers`` and ``layer_types``.
    """
    modes = getattr(cfg, "kv_sharing_modes", None)
    if modes is not None:
        return list(modes)
    n, shared = cfg.num_hidden_layers, cfg.num_kv_shared_layers or 0
    if not shared:
        return [None] * n
    first = n - shared
    out: list[str | None] = [None if i < first else "reuse" for i in range(n)]
    types = list(cfg.layer_types)
    for t in set(types):
        producers = [i for i in range(first) if types[i] == t]
        if producers:
            out[producers[-1]] = "store"
    return out


def describe(preset_or_config: Any) -> dict[str, Any]:
    """Per-layer facts, derived from the transformers config (so they agree with what it builds).

    Accepts a ``Gemma4Preset``, a preset name, a ``Gemma4TextConfig``, a ``Gemma4Config`` (its
    text_config) or a model. Returns model-level facts plus ``layers``, a list indexed by layer with:
    ``index``, ``layer_type`` ("sliding_attention"/"full_attention"), ``kv_shared`` (reuses another
    layer's K/V, has no k/v projections), ``kv_store`` (a producer whose K/V shared layers read),
    ``kv_source`` (the layer whose K/V it attends over), ``has_ple``, ``is_moe``, ``k_eq_v`` (attention_k_eq_v
    and a full layer: V is the raw k_proj output, no v_proj), ``intermediate_size``
    (double-wide applied), ``head_dim``, ``num_key_value_heads``, ``sliding_window`` (None on full
    layers).
    """
    cfg = _as_text_config(preset_or_config)
    n = cfg.num_hidden_layers
    types = list(cfg.layer_types)
    modes = _kv_sharing_modes(cfg)
    first_shared = n - cfg.num_kv_shared_layers if cfg.num_kv_shared_layers else None
    producers: dict[str, int] = {}
    if first_shared is not None:
        for i in range(first_shared):
            producers[types[i]] = i
    has_ple = bool(cfg.hidden_size_per_layer_input)
    is_moe = bool(cfg.enable_moe_block)
    layers = []
    for i in range(n):
        layer_cfg = cfg.per_layer_config[i]
        kv_shared = modes[i] == "reuse"
        double = bool(cfg.use_double_wide_mlp) and kv_shared
        layers.append(
            dict(
                index=i,
                layer_type=types[i],
                kv_shared=kv_shared,
                kv_store=modes[i] == "store",
                kv_source=producers[types[i]] if kv_shared else i,
                has_ple=has_ple,
                is_moe=is_moe,
                k_eq_v=bool(cfg.attention_k_eq_v) and types[i] == FULL,
                intermediate_size=cfg.intermediate_size * (2 if double else 1),
                head_dim=int(layer_cfg.head_dim),
                num_key_value_heads=int(layer_cfg.num_key_value_heads),
                sliding_window=cfg.sliding_window if types[i] == SLIDING else None,
            )
        )
    return dict(
        num_layers=n,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        num_attention_heads=cfg.num_attention_heads,
        layer_types=types,
        full_attention_layers=[i for i, t in enumerate(types) if t == FULL],
        num_kv_shared_layers=cfg.num_kv_shared_layers,
        first_kv_shared_layer=first_shared,
        kv_producers=producers,
        hidden_size_per_layer_input=cfg.hidden_size_per_layer_input,
        enable_moe_block=is_moe,
        num_experts=cfg.num_experts,
        top_k_experts=cfg.top_k_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        attention_k_eq_v=bool(cfg.attention_k_eq_v),
        sliding_window=cfg.sliding_window,
        final_logit_softcapping=cfg.final_logit_softcapping,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        layers=layers,
    )

"""The published Gemma-4 text-decoder configurations, as data, in one place.

``PRESETS`` holds the four published text decoders (keys ``"e2b"``, ``"e4b"``,
``"26b-a4b"``, ``"31b"``); ``TINY_PRESETS`` a CPU-sized variant of each (keys
``"tiny-e2b"`` ...) that keeps every structural feature of its parent:

* the layer-type pattern (a full-attention layer every 5th (E2B) / 6th layer, the last layer full),
* KV sharing (E2B/E4B): the tail of the stack reuses the K/V of the last non-shared layer of the
  same attention type; the tiny variants keep at least one sliding and one full consumer, each
  reading from a producer of its type,
* the double-wide MLP of the KV-shared layers (E2B),
* per-layer embeddings (PLE, ``hidden_size_per_layer_input``; E2B/E4B),
* MoE beside the dense MLP (26B-A4B: experts, top-k, expert width),
* ``attention_k_eq_v`` with fewer KV heads on the full layers (26B-A4B/31B),
* distinct sliding / global head dims, sliding window, final logit soft-cap.

Published values: GEMMA4.md's table, checked against public copies of the published
``config.json`` files (text_config). ``max_position_embeddings`` is not in GEMMA4.md: public copies
give 131072 for E2B/E4B and mostly 262144 for 26B-A4B/31B (one copy says 131072); it does not change
the computation of a forward pass.

Nothing here imports torch or transformers; ``gemma4_passes.models`` turns a preset into a
``transformers.Gemma4TextConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "SLIDING",
    "FULL",
    "Gemma4Preset",
    "PRESETS",
    "TINY_PRESETS",
    "ALL_PRESETS",
    "layer_types_for",
    "layer_slice",
    "tiny",
    "resolve",
    "names",
]

SLIDING = "sliding_attention"
FULL = "full_attention"


def layer_types_for(num_layers: int, full_every: int) -> tuple[str, ...]:
    """``full_every - 1`` sliding layers then one full layer, repeated; the last layer is always full.

    (transformers forces the last layer to full attention too; doing it here keeps the preset and the
    built model in agreement.)
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if full_every < 1:
        raise ValueError(f"full_every must be >= 1, got {full_every}")
    types = [FULL if (i + 1) % full_every == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return tuple(types)


@dataclass(frozen=True)
class Gemma4Preset:
    """One Gemma-4 text-decoder configuration.

    Field names follow ``transformers.Gemma4TextConfig`` (``global_head_dim`` and
    ``num_global_key_value_heads`` are constructor kwargs there that end up in ``per_layer_config``).
    ``layer_types`` is the authority on which layer is sliding/full; ``full_attention_every`` only
    records the period it was built from.
    """

    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int  # sliding layers (and full layers unless overridden, see below)
    head_dim: int  # sliding layers
    global_head_dim: int  # full-attention layers
    sliding_window: int
    full_attention_every: int
    layer_types: tuple[str, ...]
    # Full-layer KV heads. Only applied by transformers when attention_k_eq_v is set (the published
    # E2B/E4B configs carry null here; their full layers use num_key_value_heads).
    num_global_key_value_heads: int | None = None
    vocab_size: int = 262_144
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    hidden_size_per_layer_input: int = 0  # PLE width; 0 = no PLE
    vocab_size_per_layer_input: int = 262_144
    attention_k_eq_v: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta_sliding: float = 10_000.0
    rope_theta_full: float = 1_000_000.0
    partial_rotary_factor_full: float = 0.25  # "proportional" RoPE on full layers
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    tie_word_embeddings: bool = True
    hf_id: str | None = None  # informational only; nothing here downloads
    parent: str | None = None  # for tiny / sliced presets: the preset they were derived from

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = _validate(self)
        if problems:
            raise ValueError(f"invalid Gemma-4 preset {self.name!r}: " + "; ".join(problems))

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def full_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL)

    @property
    def sliding_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING)

    @property
    def first_kv_shared_layer(self) -> int | None:
        if not self.num_kv_shared_layers:
            return None
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def kv_shared_layers(self) -> tuple[int, ...]:
        first = self.first_kv_shared_layer
        return () if first is None else tuple(range(first, self.num_hidden_layers))

    @property
    def kv_producers(self) -> dict[str, int]:
        """Layer type -> index of the last non-shared layer of that type (whose K/V the shared layers read)."""
        first = self.first_kv_shared_layer
        if first is None:
            return {}
        out: dict[str, int] = {}
        for i in range(first):
            out[self.layer_types[i]] = i
        return out

    def kv_source(self, layer: int) -> int:
        """Index of the layer whose K/V ``layer`` attends over (itself unless KV-shared)."""
        first = self.first_kv_shared_layer
        if first is None or layer < first:
            return layer
        return self.kv_producers[self.layer_types[layer]]

    @property
    def full_kv_heads(self) -> int:
        """KV heads of the full-attention layers, as transformers applies it."""
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def has_ple(self) -> bool:
        return bool(self.hidden_size_per_layer_input)

    def intermediate_size_of(self, layer: int) -> int:
        double = self.use_double_wide_mlp and layer in self.kv_shared_layers
        return self.intermediate_size * (2 if double else 1)

    def replace(self, **changes) -> "Gemma4Preset":
        return dataclasses.replace(self, **changes)


def _validate(p: Gemma4Preset) -> list[str]:
    problems: list[str] = []
    n = p.num_hidden_layers
    if n < 1:
        problems.append("num_hidden_layers must be >= 1")
        return problems
    if len(p.layer_types) != n:
        problems.append(f"len(layer_types)={len(p.layer_types)} != num_hidden_layers={n}")
        return problems
    bad = sorted(set(p.layer_types) - {SLIDING, FULL})
    if bad:
        problems.append(f"unknown layer types {bad}")
    if p.layer_types[-1] != FULL:
        problems.append("the last layer must be full attention")
    if p.num_attention_heads % p.num_key_value_heads:
        problems.append("num_attention_heads must be a multiple of num_key_value_heads")
    if p.num_attention_heads % p.full_kv_heads:
        problems.append("num_attention_heads must be a multiple of the full-layer KV heads")
    if not 0 <= p.num_kv_shared_layers < n:
        problems.append(f"num_kv_shared_layers must be in [0, {n})")
    elif p.num_kv_shared_layers:
        first = n - p.num_kv_shared_layers
        producer_types = set(p.layer_types[:first])
        consumer_types = set(p.layer_types[first:])
        if not consumer_types <= producer_types:
            problems.append(
                f"KV-shared layers of type(s) {sorted(consumer_types - producer_types)} have no producer "
                f"among layers 0..{first - 1}"
            )
    if p.use_double_wide_mlp and not p.num_kv_shared_layers:
        problems.append("use_double_wide_mlp only applies to KV-shared layers, but there are none")
    if p.enable_moe_block:
        if not (p.num_experts and p.top_k_experts and p.moe_intermediate_size):
            problems.append("MoE needs num_experts, top_k_experts and moe_intermediate_size")
        elif p.top_k_experts > p.num_experts:
            problems.append("top_k_experts > num_experts")
    elif any(v is not None for v in (p.num_experts, p.top_k_experts, p.moe_intermediate_size)):
        problems.append("MoE sizes given but enable_moe_block is False")
    if p.has_ple and p.vocab_size_per_layer_input < 1:
        problems.append("PLE needs vocab_size_per_layer_input >= 1")
    return problems


# ------------------------------------------------------------------------------------------------
# The four published text decoders (GEMMA4.md; see the module docstring for sources).
# ------------------------------------------------------------------------------------------------
E2B = Gemma4Preset(
    name="e2b",
    hf_id="google/gemma-4-E2B-it",
    num_hidden_layers=35,
    hidden_size=1536,
    intermediate_size=6144,  # 12288 in the KV-shared layers (double-wide)
    num_attention_heads=8,
    num_key_value_heads=1,
    num_global_key_value_heads=None,  # full layers: 1 KV head too
    head_dim=256,
    global_head_dim=512,
    sliding_window=512,
    full_attention_every=5,  # layers 4, 9, ..., 34
    layer_types=layer_types_for(35, 5),
    num_kv_shared_layers=20,  # layers 15..34 read layer 13 (sliding) / 14 (full)
    use_double_wide_mlp=True,
    hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262_144,
    max_position_embeddings=131_072,
)

E4B = Gemma4Preset(
    name="e4b",
    hf_id="google/gemma-4-E4B-it",
    num_hidden_layers=42,
    hidden_size=2560,
    intermediate_size=10240,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_global_key_value_heads=None,  # full layers: 2 KV heads too
    head_dim=256,
    global_head_dim=512,
    sliding_window=512,
    full_attention_every=6,  # layers 5, 11, ..., 41
    layer_types=layer_types_for(42, 6),
    num_kv_shared_layers=18,  # layers 24..41 read layer 22 (sliding) / 23 (full)
    hidden_size_per_layer_input=256,
    vocab_size_per_layer_input=262_144,
    max_position_embeddings=131_072,
)

A26B = Gemma4Preset(
    name="26b-a4b",
    hf_id="google/gemma-4-26B-A4B-it",
    num_hidden_layers=30,
    hidden_size=2816,
    intermediate_size=2112,  # the dense MLP that runs beside the MoE
    num_attention_heads=16,
    num_key_value_heads=8,
    num_global_key_value_heads=2,
    head_dim=256,
    global_head_dim=512,
    sliding_window=1024,
    full_attention_every=6,
    layer_types=layer_types_for(30, 6),
    attention_k_eq_v=True,
    enable_moe_block=True,
    num_experts=128,
    top_k_experts=8,
    moe_intermediate_size=704,
    max_position_embeddings=262_144,
)

D31B = Gemma4Preset(
    name="31b",
    hf_id="google/gemma-4-31B-it",
    num_hidden_layers=60,
    hidden_size=5376,
    intermediate_size=21504,
    num_attention_heads=32,
    num_key_value_heads=16,
    num_global_key_value_heads=4,
    head_dim=256,
    global_head_dim=512,
    sliding_window=1024,
    full_attention_every=6,
    layer_types=layer_types_for(60, 6),
    attention_k_eq_v=True,
    max_position_embeddings=262_144,
)

PRESETS: Mapping[str, Gemma4Preset] = {p.name: p for p in (E2B, E4B, A26B, D31B)}


# ------------------------------------------------------------------------------------------------
# Layer slicing: fewer layers, same structure.
# ------------------------------------------------------------------------------------------------
def _kv_split_ok(types: tuple[str, ...], num_shared: int) -> bool:
    first = len(types) - num_shared
    producers, consumers = set(types[:first]), set(types[first:])
    # Keep both kinds of consumer (sliding and full), each with a producer of its kind.
    return first >= 1 and consumers == {SLIDING, FULL} and consumers <= producers


def _tail_types(num_layers: int, full_every: int) -> tuple[str, ...]:
    """The last ``num_layers`` types of a periodic pattern that ends on a full layer."""
    return tuple(FULL if (num_layers - 1 - j) % full_every == 0 else SLIDING for j in range(num_layers))


def _kv_shared_layout(p: Gemma4Preset, num_layers: int) -> tuple[tuple[str, ...], int]:
    """(layer_types, num_kv_shared_layers) for a KV-sharing preset cut to ``num_layers`` layers."""
    target = round(num_layers * p.num_kv_shared_layers / p.num_hidden_layers)
    types = layer_types_for(num_layers, p.full_attention_every)
    candidates = [k for k in range(1, num_layers) if _kv_split_ok(types, k)]
    if candidates:
        return types, min(candidates, key=lambda k: (abs(k - target), -k))
    # Too few layers for the plain periodic pattern to hold both producers and both consumers:
    # a non-shared head (periodic, last layer full) followed by the parent's shared tail.
    if num_layers < 4:
        raise ValueError(
            f"cannot slice {p.name!r} to {num_layers} layers and keep KV sharing (needs a sliding and a "
            f"full KV-shared layer plus a producer of each type, so at least 4 layers)"
        )
    num_shared = min(max(target, 2), num_layers - 2)
    head = layer_types_for(num_layers - num_shared, p.full_attention_every)
    types = head + _tail_types(num_shared, p.full_attention_every)
    assert _kv_split_ok(types, num_shared)
    return types, num_shared


def layer_slice(preset: Gemma4Preset | str, num_layers: int) -> Gemma4Preset:
    """A preset with ``num_layers`` layers and the same structure as ``preset``.

    The layer types are the parent's period pattern cut to ``num_layers`` layers, last layer full (so
    there is always at least one full-attention layer). For KV-sharing parents (E2B/E4B) the number of
    KV-shared layers stays close to the parent's share, with a sliding and a full layer among the
    KV-shared ones and a producer of each type before them; where the plain pattern is too short for
    that (E2B < 7 layers, E4B < 8), the layers are a periodic non-shared head followed by a shared
    tail ending "... sliding, full". KV-sharing parents need at least 4 layers. Everything else (dims,
    MoE, PLE, double-wide MLP, k_eq_v, window, soft-cap) is kept.
    """
    p = resolve(preset)
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if p.num_kv_shared_layers:
        types, num_shared = _kv_shared_layout(p, num_layers)
    else:
        types, num_shared = layer_types_for(num_layers, p.full_attention_every), 0
    same = types == p.layer_types and num_shared == p.num_kv_shared_layers
    return dataclasses.replace(
        p,
        name=p.name if same else f"{p.name}-l{num_layers}",
        num_hidden_layers=num_layers,
        layer_types=types,
        num_kv_shared_layers=num_shared,
        parent=p.parent or (None if same else p.name),
    )


# ------------------------------------------------------------------------------------------------
# Tiny CPU variants: small dims (hidden sizes not powers of two), same structure.
# ------------------------------------------------------------------------------------------------
_TINY_COMMON = dict(
    vocab_size=256,
    head_dim=16,
    global_head_dim=32,
    max_position_embeddings=512,
)

_TINY_SPECS: dict[str, tuple[int, dict]] = {
    # name: (num_layers, dims)
    "e2b": (8, dict(  # S S S S F | S S F ; layers 5,6 read 3, layer 7 reads 4; 5-7 double-wide
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=1,
        sliding_window=8, hidden_size_per_layer_input=12, vocab_size_per_layer_input=256,
    )),
    "e4b": (8, dict(  # S S S S S F | S F ; layer 6 reads 4, layer 7 reads 5
        hidden_size=80, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
        sliding_window=8, hidden_size_per_layer_input=12, vocab_size_per_layer_input=256,
    )),
    "26b-a4b": (8, dict(  # S S S S S F S F ; k_eq_v + 1 KV head on full layers; MoE everywhere
        hidden_size=72, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2,
        num_global_key_value_heads=1, sliding_window=16,
        num_experts=8, top_k_experts=2, moe_intermediate_size=24,
    )),
    "31b": (8, dict(  # S S S S S F S F ; k_eq_v + 1 KV head on full layers
        hidden_size=96, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
        num_global_key_value_heads=1, sliding_window=16,
    )),
}


def _make_tiny(parent_name: str) -> Gemma4Preset:
    num_layers, dims = _TINY_SPECS[parent_name]
    parent = PRESETS[parent_name]
    small = dataclasses.replace(parent, name=f"tiny-{parent_name}", hf_id=None, **_TINY_COMMON, **dims)
    sliced = layer_slice(small, num_layers)
    return dataclasses.replace(sliced, name=f"tiny-{parent_name}", parent=parent_name)


def names() -> list[str]:
    return list(ALL_PRESETS)


def tiny(name: str | Gemma4Preset) -> Gemma4Preset:
    """The tiny CPU variant of a published preset ("e2b", "tiny-e2b" and a Gemma4Preset all work)."""
    if isinstance(name, Gemma4Preset):
        key = name.parent or name.name
    else:
        key = str(name).strip().lower()
    key = key.removeprefix("tiny-")
    if key not in PRESETS:
        raise ValueError(f"unknown Gemma-4 preset {name!r}; valid names: {', '.join(PRESETS)}")
    return TINY_PRESETS[f"tiny-{key}"]


def resolve(name_or_preset: str | Gemma4Preset) -> Gemma4Preset:
    """A preset by name ("e4b", "tiny-e4b", case-insensitive) or the preset itself."""
    if isinstance(name_or_preset, Gemma4Preset):
        return name_or_preset
    if isinstance(name_or_preset, str):
        key = name_or_preset.strip().lower()
        if key in ALL_PRESETS:
            return ALL_PRESETS[key]
    raise ValueError(
        f"unknown Gemma-4 preset {name_or_preset!r}; valid names: {', '.join(ALL_PRESETS)}"
    )


TINY_PRESETS: Mapping[str, Gemma4Preset] = {f"tiny-{n}": _make_tiny(n) for n in PRESETS}

ALL_PRESETS: Mapping[str, Gemma4Preset] = {**PRESETS, **TINY_PRESETS}

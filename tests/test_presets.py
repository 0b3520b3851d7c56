"""Published Gemma-4 numbers, tiny presets that keep their parent's structure, layer slicing, lookup."""

from __future__ import annotations

import dataclasses

import pytest

from gemma4_passes.models import describe
from gemma4_passes.presets import (
    ALL_PRESETS,
    FULL,
    PRESETS,
    SLIDING,
    TINY_PRESETS,
    Gemma4Preset,
    layer_slice,
    layer_types_for,
    resolve,
    tiny,
)

# --------------------------------------------------------------------------------------------
# The published configurations, as /work/shared/GEMMA4.md gives them (one table).
# kv_full = KV heads of the full-attention layers; full_first/full_every = full-attention layers.
# --------------------------------------------------------------------------------------------
PUBLISHED = {
    # layers, hidden, intermediate, heads, kv, kv_full, head_dim, global_head_dim, window,
    # full_first, full_every, kv_shared, ple, double_wide, moe (experts, top_k, moe_inter), k_eq_v
    "e2b":     (35, 1536, 6144, 8, 1, 1, 256, 512, 512, 4, 5, 20, 256, True, None, False),
    "e4b":     (42, 2560, 10240, 8, 2, 2, 256, 512, 512, 5, 6, 18, 256, False, None, False),
    "26b-a4b": (30, 2816, 2112, 16, 8, 2, 256, 512, 1024, 5, 6, 0, 0, False, (128, 8, 704), True),
    "31b":     (60, 5376, 21504, 32, 16, 4, 256, 512, 1024, 5, 6, 0, 0, False, None, True),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_numbers(name):
    (layers, hidden, inter, heads, kv, kv_full, hd, ghd, window, full_first, every, kv_shared, ple,
     double, moe, k_eq_v) = PUBLISHED[name]
    p = PRESETS[name]
    assert p.name == name
    assert p.num_hidden_layers == layers == len(p.layer_types)
    assert p.hidden_size == hidden
    assert p.intermediate_size == inter
    assert p.num_attention_heads == heads
    assert p.num_key_value_heads == kv
    assert p.full_kv_heads == kv_full
    assert (p.head_dim, p.global_head_dim) == (hd, ghd)
    assert p.sliding_window == window
    assert p.full_attention_layers == tuple(range(full_first, layers, every))
    assert p.layer_types[-1] == FULL
    assert p.num_kv_shared_layers == kv_shared
    assert p.hidden_size_per_layer_input == ple
    assert p.use_double_wide_mlp is double
    if moe is None:
        assert not p.enable_moe_block and p.num_experts is None
    else:
        assert p.enable_moe_block
        assert (p.num_experts, p.top_k_experts, p.moe_intermediate_size) == moe
    assert p.attention_k_eq_v is k_eq_v
    # shared by all four
    assert p.vocab_size == 262144
    assert p.final_logit_softcapping == 30.0
    assert p.hidden_activation == "gelu_pytorch_tanh"
    assert p.rms_norm_eps == 1e-6
    assert (p.rope_theta_sliding, p.rope_theta_full, p.partial_rotary_factor_full) == (1e4, 1e6, 0.25)
    assert p.tie_word_embeddings


def test_published_kv_sharing_and_double_wide():
    e2b, e4b = PRESETS["e2b"], PRESETS["e4b"]
    assert e4b.kv_shared_layers == tuple(range(24, 42))
    assert e4b.kv_producers == {SLIDING: 22, FULL: 23}
    assert e4b.kv_source(24) == 22 and e4b.kv_source(29) == 23 and e4b.kv_source(23) == 23
    assert e2b.kv_shared_layers == tuple(range(15, 35))
    assert e2b.kv_producers == {SLIDING: 13, FULL: 14}
    assert [e2b.intermediate_size_of(i) for i in (0, 14, 15, 34)] == [6144, 6144, 12288, 12288]
    assert all(e4b.intermediate_size_of(i) == 10240 for i in range(42))


@pytest.mark.parametrize("name", list(PRESETS))
def test_published_describe_matches_preset(name):
    p = PRESETS[name]
    d = describe(p)
    assert d["num_layers"] == p.num_hidden_layers and d["hidden_size"] == p.hidden_size
    for i, layer in enumerate(d["layers"]):
        assert layer["layer_type"] == p.layer_types[i]
        assert layer["kv_shared"] == (i in p.kv_shared_layers)
        assert layer["kv_source"] == p.kv_source(i)
        assert layer["intermediate_size"] == p.intermediate_size_of(i)
        full = p.layer_types[i] == FULL
        assert layer["head_dim"] == (p.global_head_dim if full else p.head_dim)
        assert layer["num_key_value_heads"] == (p.full_kv_heads if full else p.num_key_value_heads)
        assert layer["k_eq_v"] == (p.attention_k_eq_v and full)
        assert layer["is_moe"] == p.enable_moe_block
        assert layer["has_ple"] == p.has_ple
        assert layer["sliding_window"] == (None if full else p.sliding_window)


# --------------------------------------------------------------------------------------------
# Tiny presets
# --------------------------------------------------------------------------------------------
def _is_pow2(n: int) -> bool:
    return n & (n - 1) == 0


def test_tiny_keys_and_lookup():
    assert set(TINY_PRESETS) == {f"tiny-{n}" for n in PRESETS}
    for n in PRESETS:
        assert tiny(n) is TINY_PRESETS[f"tiny-{n}"]
        assert tiny(f"TINY-{n.upper()}") is TINY_PRESETS[f"tiny-{n}"]
        assert tiny(PRESETS[n]) is TINY_PRESETS[f"tiny-{n}"]
        assert TINY_PRESETS[f"tiny-{n}"].parent == n
    with pytest.raises(ValueError, match="valid names"):
        tiny("7b")


@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_is_small(name):
    t = tiny(name)
    assert 5 <= t.num_hidden_layers <= 8
    assert not _is_pow2(t.hidden_size) and t.hidden_size <= 96
    assert (t.head_dim, t.global_head_dim) == (16, 32)
    assert t.vocab_size == 256
    assert t.sliding_window <= 16  # tests use longer sequences, so the window is exercised
    if t.has_ple:
        assert t.vocab_size_per_layer_input == t.vocab_size
    if t.enable_moe_block:
        assert (t.num_experts, t.top_k_experts) == (8, 2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_keeps_structure(name):
    parent, t = PRESETS[name], tiny(name)
    dp, dt = describe(parent), describe(t)
    lp, lt = dp["layers"], dt["layers"]

    # layer-type pattern: same first full layer (full every 5th / 6th), last layer full
    assert dt["full_attention_layers"][0] == dp["full_attention_layers"][0] == parent.full_attention_every - 1
    assert lt[-1]["layer_type"] == FULL and {l["layer_type"] for l in lt} == {SLIDING, FULL}

    # KV sharing: a sliding and a full consumer, each reading a stored producer of its own type
    if dp["num_kv_shared_layers"]:
        shared = [l for l in lt if l["kv_shared"]]
        assert {l["layer_type"] for l in shared} == {SLIDING, FULL}
        assert [l["index"] for l in shared] == list(range(dt["first_kv_shared_layer"], dt["num_layers"]))
        for l in shared:
            src = lt[l["kv_source"]]
            assert not src["kv_shared"] and src["kv_store"] and src["layer_type"] == l["layer_type"]
        assert set(dt["kv_producers"]) == {SLIDING, FULL}
    else:
        assert not any(l["kv_shared"] for l in lt)

    # double-wide MLP exactly on the KV-shared layers
    def widths(layers, base):
        return {(l["kv_shared"], l["intermediate_size"] // base) for l in layers}

    assert widths(lt, t.intermediate_size) == widths(lp, parent.intermediate_size)

    # PLE, MoE, k_eq_v, heads: same features
    assert bool(dt["hidden_size_per_layer_input"]) == bool(dp["hidden_size_per_layer_input"])
    assert all(l["has_ple"] == bool(dp["hidden_size_per_layer_input"]) for l in lt)
    assert dt["enable_moe_block"] == dp["enable_moe_block"]
    if dp["enable_moe_block"]:
        assert all(l["is_moe"] for l in lt)
        assert dt["num_experts"] > dt["top_k_experts"] > 1
        assert dt["moe_intermediate_size"] < t.intermediate_size  # small experts beside a dense MLP
    assert [l["k_eq_v"] for l in lt] == [l["layer_type"] == FULL and dp["attention_k_eq_v"] for l in lt]

    def kv_heads(d, kind):
        (heads,) = {l["num_key_value_heads"] for l in d["layers"] if l["layer_type"] == kind}
        return heads

    # fewer KV heads on full layers iff the parent has them (26B/31B); MQA iff parent is MQA (E2B)
    assert (kv_heads(dt, FULL) < kv_heads(dt, SLIDING)) == (kv_heads(dp, FULL) < kv_heads(dp, SLIDING))
    assert (t.num_key_value_heads == 1) == (parent.num_key_value_heads == 1)
    assert t.num_attention_heads > t.num_key_value_heads
    assert t.global_head_dim > t.head_dim
    assert t.final_logit_softcapping == parent.final_logit_softcapping
    assert t.sliding_window < parent.sliding_window


# --------------------------------------------------------------------------------------------
# layer_slice
# --------------------------------------------------------------------------------------------
def _check_structure(p: Gemma4Preset, parent: Gemma4Preset) -> None:
    assert len(p.layer_types) == p.num_hidden_layers
    assert p.layer_types[-1] == FULL
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "global_head_dim", "sliding_window", "hidden_size_per_layer_input",
                  "use_double_wide_mlp", "attention_k_eq_v", "enable_moe_block", "num_experts",
                  "top_k_experts", "moe_intermediate_size", "final_logit_softcapping", "vocab_size"):
        assert getattr(p, field) == getattr(parent, field), field
    if parent.num_kv_shared_layers:
        assert p.num_kv_shared_layers >= 2
        consumers = {p.layer_types[i] for i in p.kv_shared_layers}
        assert consumers == {SLIDING, FULL} and set(p.kv_producers) == {SLIDING, FULL}
    else:
        assert p.num_kv_shared_layers == 0


@pytest.mark.parametrize("name", list(PRESETS))
def test_layer_slice(name):
    parent = PRESETS[name]
    assert layer_slice(parent, parent.num_hidden_layers) == parent
    min_layers = 4 if parent.num_kv_shared_layers else 1
    for n in range(1, 15):
        if n < min_layers:
            with pytest.raises(ValueError, match="layers"):
                layer_slice(name, n)
            continue
        s = layer_slice(name, n)
        assert s.num_hidden_layers == n and s.parent == name and s.name == f"{name}-l{n}"
        _check_structure(s, parent)
        d = describe(s)  # transformers accepts it and agrees on the KV layout
        assert [l["kv_shared"] for l in d["layers"]] == [i in s.kv_shared_layers for i in range(n)]
    # the periodic pattern is kept where it fits
    assert layer_slice("e2b", 10).layer_types == layer_types_for(10, 5)
    assert layer_slice("e2b", 10).num_kv_shared_layers == 5
    assert layer_slice("31b", 12).layer_types == layer_types_for(12, 6)
    # slicing a tiny preset keeps it tiny
    small = layer_slice(tiny(name), min(6, tiny(name).num_hidden_layers))
    assert small.hidden_size == tiny(name).hidden_size and small.parent == name


def test_layer_types_for():
    assert layer_types_for(6, 6) == (SLIDING,) * 5 + (FULL,)
    assert layer_types_for(7, 6) == (SLIDING,) * 5 + (FULL, FULL)  # last layer forced full
    assert layer_types_for(1, 5) == (FULL,)


# --------------------------------------------------------------------------------------------
# resolve / validation
# --------------------------------------------------------------------------------------------
def test_resolve():
    assert resolve("e4b") is PRESETS["e4b"]
    assert resolve(" E4B ") is PRESETS["e4b"]
    assert resolve("Tiny-E4B") is TINY_PRESETS["tiny-e4b"]
    assert resolve("26B-A4B") is PRESETS["26b-a4b"]
    p = layer_slice("31b", 3)
    assert resolve(p) is p
    with pytest.raises(ValueError) as e:
        resolve("gemma-7b")
    for n in ALL_PRESETS:
        assert n in str(e.value)
    with pytest.raises(ValueError):
        resolve(42)


def test_preset_is_frozen_and_validated():
    p = PRESETS["e2b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.hidden_size = 1
    with pytest.raises(ValueError, match="last layer"):
        p.replace(layer_types=p.layer_types[:-1] + (SLIDING,))
    with pytest.raises(ValueError, match="no producer"):  # all 30 shared layers' full type lacks a producer
        p.replace(num_kv_shared_layers=31)
    with pytest.raises(ValueError, match="MoE"):
        p.replace(enable_moe_block=True)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        p.replace(num_hidden_layers=34)

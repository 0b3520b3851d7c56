"""HF config, random-weight builds, checkpoint loading and describe() for the Gemma-4 presets."""

from __future__ import annotations

import json

import pytest
import torch

from gemma4_passes.models import (
    NotAGemma4CheckpointError,
    build_model,
    describe,
    load_checkpoint,
    to_hf_config,
)
from gemma4_passes.presets import FULL, PRESETS, SLIDING, TINY_PRESETS

TINY = list(TINY_PRESETS)
SEQ = 24  # longer than every tiny sliding window


def _ids(vocab=256, batch=2, seq=SEQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits.float()


@pytest.fixture(scope="module")
def fp32_models():
    return {name: build_model(name) for name in TINY}


# --------------------------------------------------------------------------------------------
# to_hf_config / describe
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS) + TINY)
def test_to_hf_config_fields(name):
    from transformers import Gemma4TextConfig

    p = PRESETS.get(name) or TINY_PRESETS[name]
    cfg = to_hf_config(name)
    assert isinstance(cfg, Gemma4TextConfig) and cfg.model_type == "gemma4_text"
    assert cfg._attn_implementation == "sdpa"
    # (cfg.head_dim raises AmbiguousGlobalPerLayerAttributeError: it is per-layer, checked below)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "sliding_window", "num_kv_shared_layers",
                  "use_double_wide_mlp", "attention_k_eq_v", "enable_moe_block", "num_experts", "top_k_experts",
                  "moe_intermediate_size", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
                  "final_logit_softcapping", "rms_norm_eps", "hidden_activation", "tie_word_embeddings"):
        assert getattr(cfg, field) == getattr(p, field), field
    assert list(cfg.layer_types) == list(p.layer_types)
    assert cfg.rope_parameters[SLIDING]["rope_theta"] == p.rope_theta_sliding
    assert cfg.rope_parameters[FULL]["rope_type"] == "proportional"
    assert cfg.rope_parameters[FULL]["partial_rotary_factor"] == p.partial_rotary_factor_full
    # global_head_dim / num_global_key_value_heads are popped into per_layer_config
    for i, kind in enumerate(p.layer_types):
        lc = cfg.per_layer_config[i]
        assert lc.head_dim == (p.global_head_dim if kind == FULL else p.head_dim)
        assert lc.num_key_value_heads == (p.full_kv_heads if kind == FULL else p.num_key_value_heads)
    assert to_hf_config(name, attn_implementation="eager")._attn_implementation == "eager"


@pytest.mark.parametrize("name", TINY)
def test_describe_matches_built_model(name, fp32_models):
    model = fp32_models[name]
    d = describe(TINY_PRESETS[name])
    assert d == describe(model) == describe(model.config)
    assert d["num_layers"] == len(model.model.layers) and d["hidden_size"] == model.config.hidden_size
    for facts, layer in zip(d["layers"], model.model.layers):
        attn = layer.self_attn
        assert facts["layer_type"] == attn.layer_type
        assert facts["kv_shared"] == attn.is_kv_shared_layer == (not hasattr(attn, "k_proj"))
        assert facts["kv_store"] == attn.store_full_length_kv
        assert attn.q_proj.out_features == model.config.num_attention_heads * facts["head_dim"]
        if not facts["kv_shared"]:
            assert attn.k_proj.out_features == facts["num_key_value_heads"] * facts["head_dim"]
            assert (attn.v_proj is None) == facts["k_eq_v"]
        assert layer.mlp.intermediate_size == facts["intermediate_size"] == layer.mlp.up_proj.out_features
        assert hasattr(layer, "per_layer_input_gate") == facts["has_ple"]
        assert hasattr(layer, "router") == hasattr(layer, "experts") == facts["is_moe"]
        assert attn.sliding_window == facts["sliding_window"]


def test_describe_multimodal_config():
    from transformers import Gemma4Config

    text = to_hf_config("tiny-e4b")
    mm = Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    assert describe(mm)["layers"] == describe(text)["layers"]
    with pytest.raises(TypeError):
        describe(3.0)


# --------------------------------------------------------------------------------------------
# build_model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", TINY)
def test_build_forward_finite(name, dtype, fp32_models):
    model = fp32_models[name] if dtype == torch.float32 else build_model(name, dtype=dtype)
    assert not model.training
    assert all(prm.dtype == dtype for prm in model.parameters())
    batch = 2 if dtype == torch.float32 else 1
    ids = _ids(batch=batch)
    with torch.no_grad():
        out = model(ids, use_cache=False, output_hidden_states=True)
    logits = out.logits.float()
    assert logits.shape == (batch, SEQ, 256)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(h.float()).all() for h in out.hidden_states)
    # O(1) activations through the layers, logits neither collapsed nor saturated by the soft-cap
    rms = [h.float().pow(2).mean().sqrt().item() for h in out.hidden_states]
    assert all(0.2 < r < 20 for r in rms), rms
    assert 0.3 < logits.std().item() < 5.0
    assert logits.abs().max().item() < 0.5 * model.config.final_logit_softcapping
    if dtype == torch.bfloat16:  # bf16 build = fp32 build rounded: close outputs
        with torch.no_grad():
            ref = fp32_models[name](ids, use_cache=False, output_hidden_states=True)
        cos = lambda a, b: torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0)  # noqa: E731
        assert cos(out.hidden_states[1], ref.hidden_states[1]) > 0.99  # after the first layer
        # MoE: bf16 rounding flips some top-k choices, so the outputs drift further apart
        assert cos(logits, ref.logits) > (0.8 if model.config.enable_moe_block else 0.95)


@pytest.mark.parametrize("name", TINY)
def test_random_weights_make_every_op_matter(name, fp32_models):
    model = fp32_models[name]
    norms = [mod.weight for mod in model.modules() if type(mod).__name__ == "Gemma4RMSNorm" and mod.with_scale]
    assert norms and all(0.15 < (w - 1).std().item() < 0.45 for w in norms if w.numel() >= 16)
    scalars = torch.cat([layer.layer_scalar for layer in model.model.layers])
    assert ((scalars >= 0.5) & (scalars <= 1.5)).all() and scalars.std() > 0.05
    for layer in model.model.layers:
        if hasattr(layer, "router"):
            for t in (layer.router.scale, layer.router.per_expert_scale):
                assert (t > 0).all() and t.std() > 0.05
    # a Gemma-2/3 style (1 + w) norm would change the output
    ids = _ids(batch=1)
    ref = _logits(model, ids)
    w = model.model.norm.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    try:
        assert (_logits(model, ids) - ref).abs().max() > 1e-2
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_moe_and_ple_paths_matter(fp32_models):
    ids = _ids(batch=1)
    for name, attr in (("tiny-26b-a4b", "experts"), ("tiny-e2b", "per_layer_projection")):
        model = fp32_models[name]
        ref = _logits(model, ids)
        mod = getattr(model.model.layers[1], attr)
        tensor = mod.down_proj if attr == "experts" else mod.weight
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor.zero_()
        try:
            assert (_logits(model, ids) - ref).abs().max() > 1e-2, name
        finally:
            with torch.no_grad():
                tensor.copy_(saved)


def test_deterministic_by_seed(fp32_models):
    a = fp32_models["tiny-26b-a4b"].state_dict()
    b = build_model("tiny-26b-a4b", seed=0).state_dict()
    c = build_model("tiny-26b-a4b", seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "norm.weight" in k)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # same numbers for every dtype: the bf16 build is the fp32 build rounded
    bf_model = build_model("tiny-26b-a4b", dtype=torch.bfloat16)
    bf = bf_model.state_dict()
    assert all(torch.equal(bf[k], a[k].to(torch.bfloat16)) for k in a)
    # as with from_pretrained(dtype=bf16): RoPE frequencies stay fp32, layer_scalar / embed scale are bf16
    buffers = dict(bf_model.named_buffers())
    assert all(b.dtype == torch.float32 for n, b in buffers.items() if "inv_freq" in n)
    assert buffers["model.layers.0.layer_scalar"].dtype == torch.bfloat16


def test_lm_head_scale_sharpens(fp32_models):
    base = fp32_models["tiny-e4b"]
    sharp = build_model("tiny-e4b", lm_head_scale=8.0)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # published: tied
    assert sharp.lm_head.weight is not sharp.model.embed_tokens.weight
    assert not sharp.config.tie_word_embeddings
    assert torch.allclose(sharp.lm_head.weight, 8.0 * sharp.model.embed_tokens.weight)
    sb, ss = base.state_dict(), sharp.state_dict()
    assert all(torch.equal(sb[k], ss[k]) for k in sb if k != "lm_head.weight")
    ids = _ids()
    lb, ls = _logits(base, ids), _logits(sharp, ids)
    top1 = lambda lg: lg.softmax(-1).max(-1).values.mean().item()  # noqa: E731
    assert top1(ls) > 3 * top1(lb) and top1(ls) > 0.3
    assert torch.equal(lb.argmax(-1), ls.argmax(-1))  # same ranking, just peaked
    cap = base.config.final_logit_softcapping
    raw = lambda lg: cap * torch.atanh(lg / cap)  # noqa: E731  # undo the soft-cap
    assert torch.allclose(raw(ls), 8.0 * raw(lb), rtol=1e-3, atol=1e-3)


def test_sdpa_eager_and_logits_to_keep_agree(fp32_models):
    ids = _ids(batch=1)
    for name in ("tiny-e2b", "tiny-31b"):
        ref = _logits(fp32_models[name], ids)
        eager = build_model(name, attn_implementation="eager")
        assert eager.config._attn_implementation == "eager"
        assert (_logits(eager, ids) - ref).abs().max() < 1e-3
        # KV-shared layers only see the kept positions; the logits do not change
        last = _logits(fp32_models[name], ids, logits_to_keep=1)
        assert last.shape[1] == 1 and (last[:, 0] - ref[:, -1]).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# load_checkpoint
# --------------------------------------------------------------------------------------------
def test_save_load_roundtrip_text(tmp_path, fp32_models):
    ids = _ids(batch=1)
    for name, kw in (("tiny-26b-a4b", {}), ("tiny-e2b", {"lm_head_scale": 4.0})):
        model = build_model(name, **kw) if kw else fp32_models[name]
        path = tmp_path / name
        model.save_pretrained(path)
        assert json.loads((path / "config.json").read_text())["model_type"] == "gemma4_text"
        loaded = load_checkpoint(path, dtype=torch.float32, device="cpu")
        assert type(loaded).__name__ == "Gemma4ForCausalLM" and not loaded.training
        assert describe(loaded) == describe(model)
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    loaded_bf16 = load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded_bf16.parameters()} == {torch.bfloat16}


def test_load_multimodal_checkpoint_gives_text_lm(tmp_path, fp32_models):
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    model = fp32_models["tiny-e2b"]
    mm = Gemma4ForConditionalGeneration(
        Gemma4Config(text_config=model.config.to_dict(), vision_config=None, audio_config=None)
    )
    state = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
             for k, v in model.state_dict().items()}
    missing, unexpected = mm.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "language_model" in k]
    mm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma4"
    loaded = load_checkpoint(tmp_path, dtype=torch.float32)
    assert type(loaded).__name__ == "Gemma4ForCausalLM"
    assert loaded.config.model_type == "gemma4_text"
    assert not any(p.is_meta for p in loaded.parameters())
    assert describe(loaded)["layers"] == describe(model)["layers"]
    ids = _ids(batch=1)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_not_a_gemma4_checkpoint(tmp_path):
    fake = tmp_path / "llama"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(NotAGemma4CheckpointError) as e:
        load_checkpoint(fake, dtype=torch.float32)
    assert isinstance(e.value, ValueError)
    assert str(fake) in str(e.value) and "'llama'" in str(e.value)
    assert e.value.model_type == "llama" and e.value.path == str(fake)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAGemma4CheckpointError, match="no config.json") as e:
        load_checkpoint(empty)
    assert str(empty) in str(e.value) and e.value.model_type is None

    with pytest.raises(NotAGemma4CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "does-not-exist")

    for other in ("gemma3_text", "gemma4_vision"):
        d = tmp_path / other
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": other}))
        with pytest.raises(NotAGemma4CheckpointError, match=other):
            load_checkpoint(d)

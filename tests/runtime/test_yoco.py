"""YOCO for transformers' Gemma-4 (``gemma4_passes.runtime.yoco``) on the tiny E2B / E4B presets.

YOCO runs the KV-shared layers on the kept rows only; everything it returns must be the full run's:
the logits at the kept rows (fp32 to reassociation, float64 to 1e-12, bf16 no worse than the full
bf16 run against an fp32 reference), the KV cache (bit-equal), for padded (left / right), packed and
chunked batches of mixed prompt lengths. Each guard runs the unmodified forward and logs once.
"""

from __future__ import annotations

import logging

import pytest
import torch

from gemma4_passes.models import build_model
from gemma4_passes.runtime import yoco, yoco_hf
from gemma4_passes.runtime.yoco_rows import LAST, RowSelectionError, gather_rows, needed_rows, packed_ends

PRESETS = ("tiny-e2b", "tiny-e4b")
LENS = (21, 13, 5)  # mixed prompt lengths; the tiny presets' sliding window is 8
T = max(LENS)
FP32_REL = 1e-6  # max |yoco - full| / max |full|: GEMMs of a few rows reassociate (CPU GEMV path)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread is ~50x faster than two contending ones on a shared CI box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=PRESETS)
def model_fp32(request):
    return build_model(request.param, seed=3)


@pytest.fixture(autouse=True)
def _fresh_log_state(monkeypatch):
    monkeypatch.delenv(yoco.ENV_SWITCH, raising=False)
    yoco._logged.clear()


def _batch(side: str, lens=LENS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (len(lens), max(lens)), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, max(lens) - n :] = 1
    return ids, mask


def _last_rows(mask):
    return (mask.shape[1] - 1 - mask.flip(1).argmax(1)).unsqueeze(1)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _cache_tensors(cache):
    return [(i, layer.keys, layer.values) for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None]


# ------------------------------------------------------------------------------------------------
# equality with the full run
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_mixed_lengths_fp32_logits_and_cache(model_fp32, side, attn):
    model = model_fp32
    model.config._attn_implementation = attn
    try:
        ids, mask = _batch(side)
        with torch.no_grad():
            full = model(ids, attention_mask=mask, logits_to_keep=0, use_cache=True)
            fast = yoco.yoco_forward(model, ids, attention_mask=mask, use_cache=True)
    finally:
        model.config._attn_implementation = "sdpa"
    ref = gather_rows(full.logits, _last_rows(mask))
    assert fast.logits.shape == (len(LENS), 1, model.config.vocab_size)
    assert _rel(fast.logits, ref) <= FP32_REL
    # the owner layers wrote exactly the full run's cache; the KV-shared layers wrote none
    got, want = _cache_tensors(fast.past_key_values), _cache_tensors(full.past_key_values)
    first = model.config.num_hidden_layers - model.config.num_kv_shared_layers
    assert [i for i, *_ in got] == [i for i, *_ in want] == list(range(first))
    for (_, k1, v1), (_, k2, v2) in zip(got, want):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_float64_is_exact_to_rounding():
    model = build_model("tiny-e2b", dtype=torch.float64, seed=5)
    ids, mask = _batch("right")
    with torch.no_grad():
        full = model(ids, attention_mask=mask, logits_to_keep=0)
        fast = yoco.yoco_forward(model, ids, attention_mask=mask)
    assert _rel(fast.logits, gather_rows(full.logits, _last_rows(mask))) <= 1e-12


def test_packed_batch_matches_full_run_and_separate_prompts(model_fp32):
    model = model_fp32
    lens = (9, 5, 7)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    ids = torch.randint(0, 256, (1, sum(lens)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, position_ids=pos, use_cache=False, logits_to_keep=0)
        fast = yoco.yoco_forward(model, ids, position_ids=pos, use_cache=False)
        starts = [0, lens[0], lens[0] + lens[1]]
        alone = torch.cat([model(ids[:, s : s + n], use_cache=False).logits[:, -1] for s, n in zip(starts, lens)])
    ends = torch.tensor([[8, 13, 20]])
    assert fast.logits.shape == (1, 3, model.config.vocab_size)
    assert _rel(fast.logits, gather_rows(full.logits, ends)) <= FP32_REL
    assert _rel(fast.logits[0], alone) <= 1e-5  # packing itself is exact up to shapes


@pytest.mark.parametrize("keep", [1, 4, [3, 9, 16], [[2, 16], [5, 11]]])
def test_logits_to_keep_forms(model_fp32, keep):
    model = model_fp32
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(2))
    request = keep if isinstance(keep, int) else torch.tensor(keep)
    with torch.no_grad():
        full = model(ids, logits_to_keep=0).logits
        fast = yoco.yoco_forward(model, ids, logits_to_keep=request).logits
    if isinstance(keep, int):
        ref = full[:, -keep:]
    elif request.dim() == 1:
        ref = full[:, request]
    else:
        ref = gather_rows(full, request)
    assert fast.shape == ref.shape
    assert _rel(fast, ref) <= FP32_REL


def test_chunked_right_padded_prefill_with_masks_covering_the_cache(model_fp32):
    """transformers' 2-D mask spans cached + new tokens; the kept row is each request's last new token."""
    model = model_fp32
    ids, mask = _batch("right", (30, 24, 19), seed=6)
    with torch.no_grad():
        f1 = model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
        f2 = model(ids[:, 12:], attention_mask=mask, past_key_values=f1.past_key_values, use_cache=True,
                   logits_to_keep=0)
        y1 = yoco.yoco_forward(model, ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
        y2 = yoco.yoco_forward(model, ids[:, 12:], attention_mask=mask, past_key_values=y1.past_key_values,
                               use_cache=True)
        nxt = torch.randint(0, 256, (3, 1))
        mask3 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        d_fast = yoco.yoco_forward(model, nxt, attention_mask=mask3, past_key_values=y2.past_key_values)
        d_full = model(nxt, attention_mask=mask3, past_key_values=f2.past_key_values)
    assert y1.logits.shape == (3, 1, model.config.vocab_size)
    assert _rel(y2.logits, gather_rows(f2.logits, _last_rows(mask[:, 12:]))) <= FP32_REL
    assert torch.equal(d_fast.logits, d_full.logits)


def test_chunked_prefill_then_decode(model_fp32):
    model = model_fp32
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(4))
    nxt = torch.randint(0, 256, (2, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f1 = model(ids[:, :18], use_cache=True)
        f2 = model(ids[:, 18:], past_key_values=f1.past_key_values, use_cache=True, logits_to_keep=1)
        y1 = yoco.yoco_forward(model, ids[:, :18], use_cache=True)
        y2 = yoco.yoco_forward(model, ids[:, 18:], past_key_values=y1.past_key_values, use_cache=True)
        assert _rel(y2.logits, f2.logits) <= FP32_REL
        for (_, k1, v1), (_, k2, v2) in zip(_cache_tensors(y2.past_key_values), _cache_tensors(f2.past_key_values)):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        d_full = model(nxt, past_key_values=f2.past_key_values)
        d_fast = yoco.yoco_forward(model, nxt, past_key_values=y2.past_key_values)
    assert torch.equal(d_fast.logits, d_full.logits)  # decode passes through, same cache


def _temper_attention(model, scale=0.25):
    """Random weights with attention scaling 1.0 give |q.k| ~ sqrt(head_dim): a near one-hot,
    chaotic softmax. Smaller q/k norm weights make bf16-vs-fp32 errors measure the computation."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(scale)
            if getattr(layer.self_attn, "k_norm", None) is not None:
                layer.self_attn.k_norm.weight.mul_(scale)


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_error_no_worse_than_full_run(preset):
    """bf16: YOCO's error vs the fp32 run at most 1.5x the full bf16 run's; greedy tokens agree."""
    lens = (40, 27, 33, 12)
    ids, mask = _batch("right", lens, seed=7)
    rows = _last_rows(mask)
    m32 = build_model(preset, seed=11, lm_head_scale=8.0)  # peaked logits: greedy tokens mean something
    m16 = build_model(preset, seed=11, lm_head_scale=8.0, dtype=torch.bfloat16)
    for m in (m32, m16):
        _temper_attention(m)
    with torch.no_grad():
        ref = gather_rows(m32(ids, attention_mask=mask, logits_to_keep=0).logits, rows).double()
        full = gather_rows(m16(ids, attention_mask=mask, logits_to_keep=0).logits, rows).double()
        fast = yoco.yoco_forward(m16, ids, attention_mask=mask).logits.double()
    e_full = (full - ref).norm() / ref.norm()
    e_fast = (fast - ref).norm() / ref.norm()
    assert e_fast <= 1.5 * e_full + 2**-9, (e_fast.item(), e_full.item())
    # Greedy tokens: YOCO agrees with the full bf16 run wherever rounding cannot flip the top-2 order
    # (margin above twice their largest difference), and with fp32 at least as often as the full run.
    greedy_ref, greedy_full, greedy_fast = (x.argmax(-1) for x in (ref, full, fast))
    top = full.topk(2, dim=-1).values
    decisive = (top[..., 0] - top[..., 1]) > 2 * (fast - full).abs().max()
    assert decisive.any()
    assert torch.equal(greedy_fast[decisive], greedy_full[decisive])
    assert (greedy_fast == greedy_ref).sum() >= (greedy_full == greedy_ref).sum()


def test_wrapper_module_and_default_last_token(model_fp32):
    fast = yoco.wrap(model_fp32)
    assert fast.config is model_fp32.config
    assert set(dict(fast.named_parameters())) == {f"causal_lm.{n}" for n, _ in model_fp32.named_parameters()}
    ids, mask = _batch("right")
    with torch.no_grad():
        out = fast(ids, attention_mask=mask)
        ref = gather_rows(model_fp32(ids, attention_mask=mask, logits_to_keep=0).logits, _last_rows(mask))
    assert _rel(out.logits, ref) <= FP32_REL


# ------------------------------------------------------------------------------------------------
# masks and rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kept_rows_mask_matches_materialised_causal_mask(attn):
    rows = torch.tensor([[6], [3]])
    built = yoco_hf.kept_rows_mask(None, rows, 7, attn, torch.float32)
    full = torch.ones(7, 7).tril().bool().expand(2, 1, 7, 7)
    want = gather_rows(full, rows, dim=2)
    if attn == "eager":
        want = torch.where(want, 0.0, torch.finfo(torch.float32).min)
    assert built.shape == (2, 1, 1, 7) and torch.equal(built, want)
    assert torch.equal(yoco_hf.kept_rows_mask(full, rows, 7, attn, torch.float32), gather_rows(full, rows, dim=2))


def test_needed_rows_forms():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])
    assert needed_rows(LAST, batch=3, seq_len=4, attention_mask=mask).tolist() == [[2], [3], [0]]
    cached = torch.cat([torch.ones(3, 5, dtype=mask.dtype), mask], dim=1)  # a mask over 5 cached tokens too
    assert needed_rows(LAST, batch=3, seq_len=4, attention_mask=cached).tolist() == [[2], [3], [0]]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert needed_rows(LAST, batch=1, seq_len=6, position_ids=pos).tolist() == [[2, 4, 5]]
    assert packed_ends(torch.arange(5).unsqueeze(0)) is None
    assert needed_rows(LAST, batch=2, seq_len=5).tolist() == [[4], [4]]
    assert needed_rows(2, batch=1, seq_len=5).tolist() == [[3, 4]]
    assert needed_rows(torch.tensor([-1, 0]), batch=2, seq_len=5).tolist() == [[4, 0], [4, 0]]
    for bad in (0, True, torch.tensor([5]), torch.tensor([[1]]), "first", 1.5):
        with pytest.raises(RowSelectionError):
            needed_rows(bad, batch=2, seq_len=5)
    with pytest.raises(RowSelectionError):
        needed_rows(LAST, batch=2, seq_len=3, attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(RowSelectionError):
        packed_ends(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))


# ------------------------------------------------------------------------------------------------
# guards: the full run, one log line per reason
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_yoco(monkeypatch):
    """Fail if YOCO's pruned path runs."""

    def boom(*a, **k):
        raise AssertionError("YOCO path taken")

    monkeypatch.setattr(yoco_hf, "forward_kept_rows", boom)


def _guarded_call(model, caplog, ids, mask, reason_word, **kwargs):
    with caplog.at_level(logging.INFO, logger="gemma4_passes.yoco"), torch.no_grad():
        out1 = yoco.yoco_forward(model, ids, attention_mask=mask, **kwargs)
        out2 = yoco.yoco_forward(model, ids, attention_mask=mask, **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "gemma4_passes.yoco"]
    assert len(lines) == 1 and reason_word in lines[0], lines
    return out1, out2


GUARDS = [
    ("env", {}, "GEMMA4_PASSES_YOCO"),
    ("speculative", {"speculative": True}, "speculative"),
    ("pipeline", {"pipeline_parallel": True}, "pipeline"),
    ("hidden", {"output_hidden_states": True}, "output_hidden_states"),
    ("attentions", {"output_attentions": True}, "output_attentions"),
    ("all_logits", {"logits_to_keep": 0}, "every position"),
    ("unknown", {"cache_position": torch.arange(T)}, "cache_position"),
]


@pytest.mark.parametrize("name,kwargs,word", GUARDS, ids=[g[0] for g in GUARDS])
def test_guard_runs_full_forward_and_logs_once(model_fp32, no_yoco, caplog, monkeypatch, name, kwargs, word):
    if name == "env":
        monkeypatch.setenv(yoco.ENV_SWITCH, "0")
    if name in ("attentions", "unknown"):
        model_fp32.config._attn_implementation = "eager"
    try:
        ids, mask = _batch("right")
        out, _ = _guarded_call(model_fp32, caplog, ids, mask, word, **kwargs)
        with torch.no_grad():
            full = model_fp32(ids, attention_mask=mask, logits_to_keep=0).logits
    finally:
        model_fp32.config._attn_implementation = "sdpa"
    want = full if kwargs.get("logits_to_keep") == 0 else gather_rows(full, _last_rows(mask))
    assert _rel(out.logits, want) <= FP32_REL
    if name == "hidden":
        assert out.hidden_states is not None and len(out.hidden_states) == model_fp32.config.num_hidden_layers + 1


def test_guard_labels(model_fp32, no_yoco, caplog):
    ids, mask = _batch("right")
    out, _ = _guarded_call(model_fp32, caplog, ids, mask, "labels", labels=ids, logits_to_keep=0)
    assert out.loss is not None


def test_guard_training_mode(model_fp32, no_yoco, caplog):
    model_fp32.train()
    try:
        _guarded_call(model_fp32, caplog, *_batch("right"), "training")
    finally:
        model_fp32.eval()


def test_guard_pipeline_stage_model(no_yoco, caplog):
    """A model cut into a pipeline stage (layers removed) is detected and runs unmodified."""
    model = build_model("tiny-e4b", seed=3)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 8  # the config still describes the whole model
    assert "pipeline" in yoco_hf.structure_problem(model)
    with caplog.at_level(logging.INFO, logger="gemma4_passes.yoco"):
        reason = yoco.fallback_reason(model, seq_len=T, logits_to_keep=LAST)
    assert reason.startswith("structure") and "pipeline" in reason


def test_guard_transformers_signature_mismatch(monkeypatch):
    """A transformers whose decoder layer signature differs is refused, naming the version."""
    model = build_model("tiny-e2b", seed=3)
    layer_cls = type(model.model.layers[0])

    def other_forward(self, hidden_states, shared_kv_states=None, per_layer_input=None, **kwargs):
        raise AssertionError

    monkeypatch.setattr(layer_cls, "forward", other_forward)
    problem = yoco_hf.structure_problem(model)
    assert "signature" in problem and "transformers" in problem


def test_guard_attention_implementation_and_no_shared_layers(model_fp32):
    model_fp32.config._attn_implementation = "flash_attention_2"
    try:
        assert yoco.fallback_reason(model_fp32, seq_len=T, logits_to_keep=LAST).startswith("attention")
    finally:
        model_fp32.config._attn_implementation = "sdpa"
    dense = build_model("tiny-31b", seed=3)
    assert yoco.fallback_reason(dense, seq_len=T, logits_to_keep=LAST).startswith("no_shared_layers")


def test_decode_step_passes_through_silently(model_fp32, no_yoco, caplog):
    ids = torch.randint(0, 256, (2, 1))
    with caplog.at_level(logging.INFO, logger="gemma4_passes.yoco"), torch.no_grad():
        out = yoco.yoco_forward(model_fp32, ids)
        ref = model_fp32(ids)
    assert torch.equal(out.logits, ref.logits)
    assert not [r for r in caplog.records if r.name == "gemma4_passes.yoco"]


def test_wrap_refuses_other_models():
    with pytest.raises(yoco.UnsupportedModelError, match="not a Gemma4ForCausalLM"):
        yoco.wrap(torch.nn.Linear(2, 2))

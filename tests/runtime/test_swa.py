"""The SWA pool planner (gemma4_passes.runtime.swa) on cases computed by hand, and ``plan-kv``.

Conventions in the arithmetic below (SGLang 0.5.23 defaults, see the module docstring):
page 1, chunked prefill 8192, eviction interval 128, no speculative decoding, overlap
scheduler (2 prefill chunks in flight); SGLang's window W = sliding_window - 1.
Per request of L tokens: full L, SWA min(L, W + 128 + 2); once per pool: 2 * min(8192, L) + 1.
SGLang sizes: cell = full_B + r * swa_B; full = int(budget // cell); swa = int(full * r).
"""

from __future__ import annotations

import json

import pytest

from gemma4_passes.runtime import swa
from gemma4_passes.runtime.swa import SglangSchedule, plan_swa_pools

GiB = 2**30


# ------------------------------------------------------------------------------------------------
# bytes per token
# ------------------------------------------------------------------------------------------------
def test_bytes_per_token_by_hand():
    # 31B: 60 layers, full every 6th -> 10 full (5, 11, ..., 59), 50 sliding; no KV sharing.
    #   full: k_eq_v, 4 KV heads x 512 -> 10 * 2 * 4 * 512 * 2 B = 81,920 B/token
    #   SWA: 16 KV heads x 256           -> 50 * 2 * 16 * 256 * 2 B = 819,200 B/token
    assert swa.kv_layout("31b").bytes_per_token("bf16") == (81_920, 819_200)
    # 26B-A4B: 30 layers -> 5 full, 25 sliding; full 2 KV heads x 512, SWA 8 x 256
    #   full 5 * 2 * 2 * 512 * 2 = 20,480; SWA 25 * 2 * 8 * 256 * 2 = 204,800
    assert swa.kv_layout("26b-a4b").bytes_per_token("bf16") == (20_480, 204_800)
    # E4B: 42 layers, full 5, 11, ..., 41 (7), sliding 35; layers 24..41 KV-shared (own no KV):
    #   owners 0..23: full 5, 11, 17, 23 (4), sliding 20; 2 KV heads everywhere
    #   full 4 * 2 * 2 * 512 * 2 = 16,384; SWA 20 * 2 * 2 * 256 * 2 = 40,960
    e4b = swa.kv_layout("e4b")
    assert e4b.full_layers == (5, 11, 17, 23) and len(e4b.swa_layers) == 20
    assert e4b.kv_shared_layers == tuple(range(24, 42))
    assert e4b.bytes_per_token("bf16") == (16_384, 40_960)
    #   what SGLang 0.5.23 allocates (all 42 layers): full 7 * 4096 = 28,672; SWA 35 * 2048 = 71,680
    assert e4b.bytes_per_token("bf16", include_kv_shared=True) == (28_672, 71_680)
    # E2B: 35 layers, full 4, 9, ..., 34 (7); layers 15..34 KV-shared; owners 0..14: full 4, 9, 14
    #   (3), sliding 12; 1 KV head: full 3 * 2 * 1 * 512 * 2 = 6,144; SWA 12 * 2 * 1 * 256 * 2 = 12,288
    assert swa.kv_layout("e2b").bytes_per_token("bf16") == (6_144, 12_288)
    # fp8 halves, fp32 doubles; TP=2 splits the KV heads (31B: 2 full, 8 SWA per rank)
    assert swa.kv_layout("31b").bytes_per_token("fp8_e4m3") == (40_960, 409_600)
    assert swa.kv_layout("31b").bytes_per_token("fp32") == (163_840, 1_638_400)
    assert swa.kv_layout("31b").bytes_per_token("bf16", tp_size=2) == (40_960, 409_600)
    # E2B's single KV head is replicated, not split, under TP (SGLang: max(1, heads // tp))
    assert swa.kv_layout("e2b").bytes_per_token("bf16", tp_size=2) == (6_144, 12_288)


@pytest.mark.parametrize("name", ["e2b", "e4b", "26b-a4b", "31b", "tiny-e4b", "tiny-26b-a4b"])
def test_layout_from_hf_config_matches_preset(name):
    from gemma4_passes import models

    from_hf = swa.kv_layout(models.to_hf_config(name))
    from_preset = swa.kv_layout(name)
    for field in ("layer_types", "sliding_window", "kv_shared_layers", "full_kv_heads", "full_head_dim",
                  "swa_kv_heads", "swa_head_dim"):
        assert getattr(from_hf, field) == getattr(from_preset, field), field
    # and both agree with models.describe (the per-layer facts the rest of the package uses)
    facts = models.describe(name)["layers"]
    owners = [layer for layer in facts if not layer["kv_shared"]]
    assert from_preset.full_layers == tuple(layer["index"] for layer in owners if layer["sliding_window"] is None)
    assert {(layer["head_dim"], layer["num_key_value_heads"]) for layer in owners if layer["sliding_window"]} == {
        (from_preset.swa_head_dim, from_preset.swa_kv_heads)
    }


# ------------------------------------------------------------------------------------------------
# planner cases
# ------------------------------------------------------------------------------------------------
def test_dense_31b_ample_budget_full_pool_binds():
    # 31B, bf16, 16 requests x 8192 tokens, 120 GiB = 128,849,018,880 B
    #   per request: full 8192, SWA min(8192, 1023 + 128 + 2) = 1153; reserve 2 * 8192 + 1 = 16,385
    #   need(16): full 16 * 8192 = 131,072; SWA 16 * 1153 + 16,385 = 34,833
    #   ratio 34,833 / 131,072 = 0.265754... -> rounded up 0.2658
    #   cell = 81,920 + 0.2658 * 819,200 = 299,663.36; full = 128,849,018,880 // 299,663.36 = 429,979
    #   SWA = int(429,979 * 0.2658) = int(114,288.418) = 114,288
    #   full holds 429,979 // 8192 = 52; SWA holds (114,288 - 16,385) // 1153 = 97,903 // 1153 = 84
    #   -> all 16 admitted, and the full pool is what would run out first: binding "full"
    plan = plan_swa_pools("31b", budget_bytes=120 * GiB, requests=16, tokens_per_request=8192)
    assert plan.swa_full_tokens_ratio == 0.2658
    assert (plan.full_tokens, plan.swa_tokens) == (429_979, 114_288)
    assert (plan.planned.full_holds, plan.planned.swa_holds) == (52, 84)
    assert plan.admitted == 16 and plan.binding == "full"
    # SGLang's 0.8: cell 81,920 + 655,360 = 737,280; full 128,849,018,880 // 737,280 = 174,762;
    #   SWA int(174,762 * 0.8) = 139,809; holds 174,762 // 8192 = 21 (SWA (139,809 - 16,385) // 1153 = 107)
    d = plan.sglang_default
    assert (d.full_tokens, d.swa_tokens, d.full_holds, d.swa_holds) == (174_762, 139_809, 21, 107)
    assert plan.default_admitted == 16 and d.binding == "full"


def test_dense_31b_short_requests_swa_pool_binds():
    # 31B, 4 requests x 256 tokens, 16 GiB = 17,179,869,184 B
    #   per request: full 256, SWA min(256, 1153) = 256; reserve 2 * min(8192, 256) + 1 = 513;
    #   SWA floor W + page + 1 = 1025
    #   need(4): full 1024, SWA max(4 * 256 + 513, 1025) = 1537 -> ratio 1.5 > 1: capped at SGLang's 1.0
    #   cell = 81,920 + 819,200 = 901,120; full = SWA = 17,179,869,184 // 901,120 = 19,065
    #   full holds 19,065 // 256 = 74; SWA holds (19,065 - 513) // 256 = 72 -> binding "swa"
    plan = plan_swa_pools("31b", budget_bytes=16 * GiB, requests=4, tokens_per_request=256)
    assert plan.swa_full_tokens_ratio == 1.0
    assert (plan.full_tokens, plan.swa_tokens) == (19_065, 19_065)
    assert (plan.planned.full_holds, plan.planned.swa_holds) == (74, 72)
    assert plan.binding == "swa" and plan.admitted == 4


def test_dense_31b_tight_budget_pools_balanced():
    # 31B, 64 requests x 8192 tokens, 40 GiB = 42,949,672,960 B: not all fit.
    #   bytes per request 8192 * 81,920 + 1153 * 819,200 = 1,615,626,240; reserve 16,385 * 819,200
    #   = 13,422,592,000 -> at most (42,949,672,960 - 13,422,592,000) // 1,615,626,240 = 18 requests
    #   need(18): full 147,456, SWA 18 * 1153 + 16,385 = 37,139 -> ratio 0.251865 -> 0.2519
    #   cell 81,920 + 0.2519 * 819,200 = 288,276.48; full 148,987; SWA int(148,987 * 0.2519) = 37,529
    #   holds: full 148,987 // 8192 = 18, SWA (37,529 - 16,385) // 1153 = 18 -> "both"
    plan = plan_swa_pools("31b", budget_bytes=40 * GiB, requests=64, tokens_per_request=8192)
    assert plan.swa_full_tokens_ratio == 0.2519
    assert (plan.full_tokens, plan.swa_tokens) == (148_987, 37_529)
    assert plan.admitted == 18 and plan.binding == "both"
    # SGLang's 0.8: full 42,949,672,960 // 737,280 = 58,254 -> 58,254 // 8192 = 7 requests (full binds)
    assert plan.sglang_default.full_tokens == 58_254 and plan.default_admitted == 7
    assert plan.sglang_default.binding == "full"


def test_moe_26b_long_requests_vs_default_ratio():
    # 26B-A4B (MoE), 32 summarisation requests x 16,384 tokens, 40 GiB
    #   per request: full 16,384, SWA 1153; reserve 2 * 8192 + 1 = 16,385
    #   need(32): full 524,288; SWA 32 * 1153 + 16,385 = 53,281 -> ratio 0.101625 -> 0.1017
    #   cell = 20,480 + 0.1017 * 204,800 = 41,308.16; full = 42,949,672,960 // 41,308.16 = 1,039,738
    #   SWA = int(1,039,738 * 0.1017) = int(105,741.35) = 105,741
    #   holds: full 1,039,738 // 16,384 = 63; SWA (105,741 - 16,385) // 1153 = 89,356 // 1153 = 77
    plan = plan_swa_pools("26b-a4b", budget_bytes=40 * GiB, requests=32, tokens_per_request=16_384)
    assert plan.swa_full_tokens_ratio == 0.1017
    assert (plan.full_tokens, plan.swa_tokens) == (1_039_738, 105_741)
    assert (plan.planned.full_holds, plan.planned.swa_holds) == (63, 77)
    assert plan.admitted == 32 and plan.binding == "full"
    # SGLang's 0.8: cell 20,480 + 163,840 = 184,320; full 233,016 -> 233,016 // 16,384 = 14 requests,
    #   SWA int(233,016 * 0.8) = 186,412 holds (186,412 - 16,385) // 1153 = 147: 0.8 wastes the SWA pool
    d = plan.sglang_default
    assert (d.full_tokens, d.swa_tokens, d.full_holds, d.swa_holds) == (233_016, 186_412, 14, 147)
    assert plan.default_admitted == 14


def test_e4b_kv_shared_layers_own_no_kv():
    # E4B, 64 requests x 4096 tokens, 8 GiB = 8,589,934,592 B; owners only: 16,384 / 40,960 B per token
    #   W = 511: SWA per request min(4096, 511 + 130) = 641; reserve 2 * 4096 + 1 = 8193
    #   need(64): full 262,144; SWA 64 * 641 + 8193 = 49,217 -> ratio 0.187748 -> 0.1878
    #   cell = 16,384 + 0.1878 * 40,960 = 24,076.288; full = 8,589,934,592 // 24,076.288 = 356,779
    #   SWA = int(356,779 * 0.1878) = 67,003; holds: full 356,779 // 4096 = 87, SWA 58,810 // 641 = 91
    plan = plan_swa_pools("e4b", budget_bytes=8 * GiB, requests=64, tokens_per_request=4096)
    assert (plan.full_bytes_per_token, plan.swa_bytes_per_token) == (16_384, 40_960)
    assert (plan.full_kv_layers, plan.swa_kv_layers, plan.kv_shared_layers) == (4, 20, 18)
    assert plan.swa_full_tokens_ratio == 0.1878
    assert (plan.full_tokens, plan.swa_tokens) == (356_779, 67_003)
    assert (plan.planned.full_holds, plan.planned.swa_holds) == (87, 91)
    assert plan.admitted == 64 and plan.binding == "full"
    # pricing the KV-shared layers as SGLang 0.5.23 allocates them (28,672 / 71,680 B per token)
    # leaves room for fewer requests of the same shape
    as_allocated = plan_swa_pools("e4b", budget_bytes=8 * GiB, requests=64, tokens_per_request=4096,
                                  include_kv_shared=True)
    assert (as_allocated.full_bytes_per_token, as_allocated.swa_bytes_per_token) == (28_672, 71_680)
    assert as_allocated.planned.holds < plan.planned.holds


def test_schedule_changes_needs():
    # page 16: L = 1000 -> 1008 full tokens; SWA min(1008, 511 + 128 + 32) = 671;
    # reserve: 1 chunk in flight (no overlap) * min(8192, 1008) + 16 = 1024; floor ceil16(511 + 17) = 528
    needs = swa.request_needs(1000, 511, SglangSchedule(page_size=16, chunks_in_flight=1))
    assert (needs.full_per_request, needs.swa_per_request, needs.swa_reserve, needs.swa_floor) == (1008, 671, 1024, 528)
    # speculative decoding: the eviction interval counts draft tokens (128 * 4)
    assert swa.request_needs(8192, 1023, SglangSchedule(draft_tokens=4)).swa_per_request == 1023 + 512 + 2


@pytest.mark.parametrize(
    "name,budget,requests,tokens",
    [("31b", 40 * GiB, 64, 8192), ("26b-a4b", 40 * GiB, 32, 16_384), ("e4b", 6 * GiB, 500, 4096),
     ("e2b", 3 * GiB, 10_000, 2048), ("31b", 70 * GiB, 10_000, 32_768)],
)
def test_no_ratio_admits_more(name, budget, requests, tokens):
    # every ratio SGLang accepts, on a 1e-4 grid, through SGLang's formula: none beats the plan
    plan = plan_swa_pools(name, budget_bytes=budget, requests=requests, tokens_per_request=tokens)
    best = 0
    for i in range(1, 10_001):
        r = i / 10_000
        full, swa_tokens = swa.sglang_pool_sizes(budget, r, plan.full_bytes_per_token, plan.swa_bytes_per_token)
        best = max(best, min(requests, swa.pool_capacity(full, swa_tokens, plan.needs).holds))
    assert plan.admitted == best
    assert plan.admitted >= plan.default_admitted
    # the ratio is one a user can type, and SGLang's formula gives the planned pools from it
    assert round(plan.swa_full_tokens_ratio, 4) == plan.swa_full_tokens_ratio
    assert swa.sglang_pool_sizes(budget, plan.swa_full_tokens_ratio, plan.full_bytes_per_token,
                                 plan.swa_bytes_per_token) == (plan.full_tokens, plan.swa_tokens)


def test_tiny_presets_and_hf_configs_plan():
    from gemma4_passes import models

    for name in ("tiny-e2b", "tiny-31b"):
        by_name = plan_swa_pools(name, budget_bytes="64MiB", requests=8, tokens_per_request=128)
        by_cfg = plan_swa_pools(models.to_hf_config(name), budget_bytes="64MiB", requests=8, tokens_per_request=128)
        assert by_name.planned == by_cfg.planned and by_name.admitted == 8


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_budget_too_small_for_one_request():
    # 31B, one 8192-token request: 8192 * 81,920 + (1153 + 16,385) * 819,200 = 15,038,218,240 B
    with pytest.raises(ValueError, match=r"too small for one request of 8192 tokens.*15038218240 bytes"):
        plan_swa_pools("31b", budget_bytes="1GiB", requests=1, tokens_per_request=8192)


def test_bad_inputs_raise_clear_errors():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="not a Gemma-4 config: model_type 'llama'"):
        plan_swa_pools(LlamaConfig(), budget_bytes="1GiB", requests=1, tokens_per_request=10)
    with pytest.raises(ValueError, match="unknown Gemma-4 preset 'gemma-7b'"):
        swa.kv_layout("gemma-7b")
    with pytest.raises(ValueError, match="not a Gemma-4 preset or config"):
        swa.kv_layout(object())
    with pytest.raises(ValueError, match="requests must be >= 1"):
        plan_swa_pools("e4b", budget_bytes="1GiB", requests=0, tokens_per_request=10)
    with pytest.raises(ValueError, match="tokens per request must be >= 1"):
        plan_swa_pools("e4b", budget_bytes="1GiB", requests=1, tokens_per_request=0)
    with pytest.raises(ValueError, match="cannot read a byte count"):
        swa.parse_bytes("lots")
    with pytest.raises(ValueError, match="positive number of bytes"):
        swa.parse_bytes("0GiB")
    with pytest.raises(ValueError, match="unknown KV cache dtype"):
        swa.dtype_bytes("int3")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        swa.sglang_pool_sizes(10**9, 1.5, 1, 1)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        SglangSchedule(page_size=0)


def test_parse_bytes_units():
    assert swa.parse_bytes("40GiB") == 40 * GiB
    assert swa.parse_bytes("12.5GB") == 12_500_000_000
    assert swa.parse_bytes("1e10") == 10**10
    assert swa.parse_bytes(2048) == 2048


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def test_plan_kv_command_json(capsys):
    from gemma4_passes import cli

    rc = cli.main(["plan-kv", "--preset", "26b-a4b", "--budget", "40GiB", "--requests", "32",
                   "--tokens", "16384", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "26b-a4b" and out["kv_dtype"] == "bf16"
    assert out["swa_full_tokens_ratio"] == 0.1017
    assert (out["full_tokens"], out["swa_tokens"], out["admitted"], out["binding"]) == (1_039_738, 105_741, 32, "full")
    assert (out["full_bytes_per_token"], out["swa_bytes_per_token"]) == (20_480, 204_800)
    assert out["sglang_default"]["ratio"] == 0.8 and out["sglang_default"]["admitted"] == 14


def test_plan_kv_command_table(capsys):
    from gemma4_passes import cli

    rc = cli.main(["plan-kv", "--preset", "e4b", "--budget", "8GiB", "--requests", "64", "--tokens", "4096"])
    assert rc == 0
    out = capsys.readouterr().out
    for needle in ("| preset", "e4b", "8.00 GiB", "64 requests x 4096 tokens", "16384 (4 layers, 18 KV-shared",
                   "40960 (20 layers)", "356779", "67003", "64 of 64", "| binding pool", "full",
                   "0.1878", "SGLang default (0.8)", "admits 42"):
        assert needle in out, needle


def test_plan_kv_command_errors(capsys):
    from gemma4_passes import cli

    assert cli.main(["plan-kv", "--preset", "31b", "--budget", "1GiB"]) == 2
    assert "too small for one request" in capsys.readouterr().err
    assert cli.main(["plan-kv", "--preset", "nope", "--budget", "1GiB"]) == 2
    assert "unknown Gemma-4 preset" in capsys.readouterr().err

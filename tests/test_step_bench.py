"""``gemma4-passes bench`` on a tiny KV-shared preset on CPU: every mode runs the paged cache, the
piecewise modes go through the capture/replay path (emulated capture) with the parity guard on,
and parity holds by the project's fp32 rule."""

import json

import torch

from gemma4_passes import cli
from gemma4_passes.step_bench import BenchConfig, format_table, judge, run_bench


def _cfg(**kw):
    base = dict(preset="tiny-e2b", layers=4, dtype=torch.float32, device="cpu",
                modes=("eager", "piecewise", "passes_piecewise"), decode_batches=(3,), prefill_tokens=(12,),
                prompt_len=5, decode_steps=2, warmup_steps=1, parity_batch=2, parity_steps=6,
                prefill_repeats=1, count_kernels=False, emulate_capture=True)
    base.update(kw)
    return BenchConfig(**base)


def test_bench_modes_agree_and_pieces_are_captured_under_the_guard():
    out = run_bench(_cfg())
    assert out["parity_ok"], out["parity"]
    assert [p["mode"] for p in out["parity"]] == ["piecewise", "passes_piecewise"]
    for mode in ("piecewise", "passes_piecewise"):
        m = out["modes"][mode]
        # decode at 2 and 3 requests (buckets 2 and 4), with the KV-shared layers' pieces among them
        assert m["captures"] > 0 and m["guard_rejections"] == []
        assert set(m["decode_ms"]) == {3} and set(m["prefill_ms"]) == {12}
        # one shared cache and dynamic token/request counts: a general graph plus the size-1
        # specializations (one request; one token), not a graph per shape
        assert 1 <= m["graphs"] <= 3, m["graphs"]
    assert out["modes"]["passes_piecewise"]["matches"]["post_attn_norm"] > 0
    assert out["modes"]["piecewise"]["matches"]["post_attn_norm"] == 0
    table = format_table(out)
    assert "decode B=3" in table and "| passes_piecewise |" in table
    json.dumps(out, default=str)


def test_judge_flags_a_wrong_mode():
    class R:  # a ModeResult stand-in
        def __init__(self, logits, tokens):
            self.first_logits, self.tokens = logits, tokens

    ref = torch.randn(2, 10)
    rows = judge({"eager": R(ref, [[1, 2]]), "piecewise": R(ref + 0.5, [[1, 3]])}, torch.float32)
    assert len(rows) == 1 and not rows[0].ok and rows[0].token_agreement == 0.5


def test_bench_command_needs_a_preset(capsys):
    assert cli.main(["bench"]) == 2
    assert "bench needs --preset" in capsys.readouterr().err

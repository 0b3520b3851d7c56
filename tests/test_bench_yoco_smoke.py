"""CPU smoke test of ``benchmarks/bench_yoco.py``: its ``main`` on tiny presets, tiny sizes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: contending threads only slow a shared CI box down
    yield
    torch.set_num_threads(before)


def test_bench_yoco_main_on_cpu(tmp_path, capsys):
    bench = importlib.import_module("bench_yoco")
    out = tmp_path / "bench_yoco.json"
    rc = bench.main(["--device", "cpu", "--presets", "tiny-e2b,tiny-e4b", "--prompts", "2", "--tokens", "24",
                     "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["all_correct"] is True
    assert [r["preset"] for r in data["results"]] == ["tiny-e2b", "tiny-e4b"]
    for r in data["results"]:
        assert r["full_ms"] > 0 and r["yoco_ms"] > 0 and len(r["yoco_ms_all"]) == 2
        assert r["speedup"] == pytest.approx(r["full_ms"] / r["yoco_ms"])
        assert r["goal"] is None  # goals are for the published dims only
        c = r["logits"]
        assert c["reference"] == "fp32" and c["rows"] == 2
        assert c["yoco_vs_fp32_rel_l2"] <= 1.5 * c["full_vs_fp32_rel_l2"] + 2**-9
        assert c["greedy_differs_on_decisive_rows"] == 0
    text = capsys.readouterr().out
    assert "| preset |" in text and "tiny-e4b" in text


def test_bench_yoco_goals_and_checks():
    bench = importlib.import_module("bench_yoco")
    assert bench.GOALS == {"e2b": 2.0, "e4b": 1.6}
    full = torch.tensor([[4.0, 1.0, 0.0], [0.0, 2.0, 1.9]])
    same = bench.logit_checks(full, full.clone(), full.clone())
    assert same["greedy_yoco_eq_full"] == 2 and same["error_ratio"] == 1.0
    assert bench.checks_pass(same, torch.bfloat16)
    flipped = full.clone()
    flipped[0] = torch.tensor([0.0, 5.0, 0.0])  # a row far from the full run (and another greedy token)
    assert not bench.checks_pass(bench.logit_checks(full, flipped, None), torch.bfloat16)

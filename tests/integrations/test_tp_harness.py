"""transformers' own tensor parallelism (tp_plan="auto", 2 ranks, gloo on CPU): the all-reduce before
every norm-before-residual epilogue (and both branch sums of every MoE combine) is folded by
allreduce_norm, and the compiled sharded model matches the uncompiled one (fp32)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run_harness(tmp_path, preset: str, port: int, fusions: str | None = None) -> dict:
    pytest.importorskip("accelerate")
    # gloo on CPU: the one-shot kernel cannot serve it, "force" folds anyway (the matching is under test)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", OMP_NUM_THREADS="1",
               GEMMA4_PASSES_ONESHOT_AR="force")
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", str(port), str(ROOT / "benchmarks" / "tp_harness.py"),
           "--preset", preset, "--out", str(tmp_path)]
    if fusions:
        cmd += ["--fusions", fusions]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "tp_harness.json").read_text())
    assert res["world_size"] == 2
    assert res["max_abs"] <= 1e-4 * res["scale"] and res["same_argmax"]
    return res


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_tp2_transformers_allreduce_folded(tmp_path):
    res = _run_harness(tmp_path, "tiny-31b", 29517)
    layers = 8  # tiny-31b
    # every layer: the o_proj all-reduce feeds post_attn_norm, the down_proj one the FFN tail
    assert res["matches"]["post_attn_norm"] == layers and res["matches"]["ffn_tail"] == layers
    assert res["matches"]["allreduce_norm"] == 2 * layers


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_tp2_transformers_moe_branch_sums_folded(tmp_path):
    """26B-A4B: transformers all-reduces the experts' [T, H] sum inside the experts module and reshapes it
    to [B, S, H] after the wait; the dense MLP's down_proj sum is all-reduced as [B, S, H].  Both fold
    into one allreduce_moe_branch_combine per layer (the o_proj all-reduce feeds moe_input_norms, which
    has no all-reduce form, and stays)."""
    from gemma4_passes.passes import DEFAULT_FUSIONS

    res = _run_harness(tmp_path, "tiny-26b-a4b", 29518, ",".join(DEFAULT_FUSIONS))
    layers = 8  # tiny-26b-a4b, every layer MoE
    assert res["matches"]["moe_input_norms"] == layers and res["matches"]["moe_branch_combine"] == layers
    assert res["matches"]["allreduce_norm"] == layers

"""transformers' own tensor parallelism (tp_plan="auto", 2 ranks, gloo on CPU): the all-reduce before
every norm-before-residual epilogue is folded by allreduce_norm, and the compiled sharded model
matches the uncompiled one (fp32)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_tp2_transformers_allreduce_folded(tmp_path):
    pytest.importorskip("accelerate")
    # gloo on CPU: the one-shot kernel cannot serve it, "force" folds anyway (the matching is under test)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1", OMP_NUM_THREADS="1",
               GEMMA4_PASSES_ONESHOT_AR="force")
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", "29517", str(ROOT / "benchmarks" / "tp_harness.py"),
           "--preset", "tiny-31b", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "tp_harness.json").read_text())
    layers = 8  # tiny-31b
    assert res["world_size"] == 2
    # every layer: the o_proj all-reduce feeds post_attn_norm, the down_proj one the FFN tail
    assert res["matches"]["post_attn_norm"] == layers and res["matches"]["ffn_tail"] == layers
    assert res["matches"]["allreduce_norm"] == 2 * layers
    assert res["max_abs"] <= 1e-4 * res["scale"] and res["same_argmax"]

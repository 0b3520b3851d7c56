"""CPU smoke test of the GPU checks and benchmarks in ``benchmarks/`` (their ``--smoke`` paths).

Imports each script and runs its ``main`` on tiny sizes with ``--device cpu``: the same code paths as
the GPU run minus CUDA graphs and profiler counts. Also checks that the kernel checker really fails
on wrong, unwritten or non-contiguous outputs. Under 60 s on a 2-core CPU.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def _load(name):
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------------
# common helpers
# ------------------------------------------------------------------------------------------------


def test_common_numerics_and_tables():
    common = _load("common")
    x = torch.tensor([1.0, 1.5, 2.0, -3.0, 0.0])
    assert common.ulp_of(x, torch.bfloat16).tolist()[:4] == [2.0**-7, 2.0**-7, 2.0**-6, 2.0**-6]
    assert common.ulp_of(x, torch.float32).tolist()[0] == 2.0**-23
    a = torch.tensor([1.0, -1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, -1.0, 2.0], dtype=torch.bfloat16)  # 1 + 2^-7: one ulp up
    assert common.ulp_distance(a, b).tolist() == [1, 0, 0]
    assert common.rel_l2(a, a) == 0.0
    md = common.md_table(["a", "b"], [[1, 2]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert common.classify_kernel("nvjet_tst_128x64_64x4_2x1_v_bz_TNT") == "gemm"
    assert common.classify_kernel("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert common.classify_kernel("pytorch_flash::flash_fwd_kernel") == "attention"
    assert common.classify_kernel("triton_per_fused_add_mean_mul_pow_0") == "other"
    assert common.classify_kernel("_rmsnorm_residual_kernel") == "other"
    assert common.classify_kernel("Memcpy DtoD (Device -> Device)") == "memcpy"
    t = common.time_calls(lambda: torch.ones(8).sum(), torch.device("cpu"), repeats=2, target_ms=0.5)
    assert t.method == "cpu" and t.us > 0
    assert common.count_kernels(lambda: None, torch.device("cpu")) is None
    assert common.measure_copy_bandwidth(torch.device("cpu")) is None
    b = common.Budget(None)
    assert b.allows(1e9) and common.Budget(0.0).left() <= 0


# ------------------------------------------------------------------------------------------------
# check_kernels_gpu.py
# ------------------------------------------------------------------------------------------------


def test_check_kernels_smoke(tmp_path):
    ck = _load("check_kernels_gpu")
    rc = ck.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "check_kernels.json").read_text())
    assert data["passed"] is True
    ops = {r["op"] for r in data["results"]}
    assert ops == {"rmsnorm_add", "rmsnorm_add_rmsnorm", "gelu_tanh_mul", "q_norm_rope", "qkv_norm_rope",
                   "moe_dispatch"}
    assert {r["dtype"] for r in data["results"]} == {"bf16", "fp16", "fp32"}


def test_check_kernels_catches_bad_outputs():
    """The comparison must fail on a wrong value, an unwritten (NaN) element and a wrong layout."""
    ck = _load("check_kernels_gpu")
    args = type("A", (), {"max_mismatch": 0.03, "verbose": False})()
    checks = ck.norm_checks([64], [7], [torch.bfloat16], True, (64, 7))
    chk = next(c for c in checks if c.variant == "ffn_tail" and c.dtype == torch.bfloat16)
    good = ck.run_check(chk, 1, torch.device("cpu"), args)
    assert all(r.ok for r in good)

    def wrong_weight(i):  # the Gemma-2/3 norm (1 + w): a real bug the check must see
        return tuple(ck._ref().rmsnorm_add_rmsnorm_ref(i["x"], i["res"], i["w"] + 1, i["sc"], i["nw"], 1e-6, 1e-6))

    def unwritten(i):
        normed, res = chk.reference(i)
        normed = normed.clone()
        normed.view(-1)[3] = float("nan")
        return normed, res

    def one_ulp_everywhere(i):  # systematic 1-ulp bias (e.g. truncating instead of rounding)
        normed, res = chk.reference(i)
        common = _load("common")
        return normed, (res.double() + common.ulp_of(res, torch.bfloat16)).to(res.dtype)

    def transposed(i):
        normed, res = chk.reference(i)
        return normed.transpose(-1, -2).contiguous().transpose(-1, -2), res

    for bad in (wrong_weight, unwritten, one_ulp_everywhere, transposed):
        bad_chk = ck.Check(**{**chk.__dict__, "call_op": bad, "call_launcher": None})
        res = ck.run_check(bad_chk, 1, torch.device("cpu"), args)
        assert not res[0].ok, bad.__name__


def test_check_kernels_launchers_in_triton_interpreter(tmp_path):
    """The Triton launchers' ``out=`` paths, run through the Triton interpreter (a subprocess)."""
    pytest.importorskip("triton")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(BENCH.parent)}
    cmd = [sys.executable, str(BENCH / "check_kernels_gpu.py"), "--smoke", "--device", "cpu", "--tokens", "1",
           "--dtypes", "bf16", "--ops", "norm,qkv", "--json", str(tmp_path / "c.json")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "c.json").read_text())
    paths = {(r["op"], r["path"]) for r in data["results"]}
    assert ("rmsnorm_add_rmsnorm", "launcher-out") in paths and ("qkv_norm_rope", "launcher-out") in paths
    assert ("q_norm_rope", "launcher-out") in paths


# ------------------------------------------------------------------------------------------------
# bench_fusions.py / bench_layers.py
# ------------------------------------------------------------------------------------------------


def test_bench_fusions_smoke(tmp_path):
    bf = _load("bench_fusions")
    rc = bf.main(["--smoke", "--device", "cpu", "--tokens", "3", "--fusions", "ffn_tail,qkv_norm",
                  "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "bench_fusions.json").read_text())
    assert not data["partial"] and data["results"]
    for r in data["results"]:
        assert r["error"] is None, r
        assert set(r["us"]) == {"eager", "inductor", "fused"} and all(v > 0 for v in r["us"].values())
        assert r["max_rel_vs_eager"]["fused"] < 2.0**-5
    assert "| fusion |" in data["markdown"]


def test_bench_fusions_eager_is_hf_math():
    """The benchmark's eager functions compute what the fused ops compute (the CPU op = HF reference)."""
    bf = _load("bench_fusions")
    cases = bf.build_cases([5], list(bf.FUSIONS), True, None)
    g = torch.Generator().manual_seed(0)
    for case in cases:
        inputs = case.make(g, torch.device("cpu"))
        e, f = bf._as_tuple(case.eager(*inputs)), bf._as_tuple(case.fused(*inputs))
        if case.canon is not None:  # moe_dispatch: equal ids may sort in another order
            e, f = case.canon(e), case.canon(f)
        assert len(e) == len(f)
        for a, b in zip(e, f):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b), (case.fusion, case.shape)


def test_bench_layers_smoke(tmp_path):
    bl = _load("bench_layers")
    rc = bl.main(["--smoke", "--device", "cpu", "--presets", "31b", "--layers", "31b=1", "--tokens", "3",
                  "--no-eager-timing", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_layers.json").read_text())
    (pr,) = data["results"]
    assert pr["error"] is None
    (shape,) = pr["shapes"]
    for v in ("inductor", "passes"):
        vr = shape["variants"][v]
        assert vr["error"] is None, vr["error"]
        assert vr["us_per_layer"] > 0 and vr["hidden_err"] is not None and vr["logit_err_fp32"] is not None
    # the passes ran (caches forced off) and matched what the expected table says for this slice
    assert shape["variants"]["passes"]["matches"] == pr["expected_matches"]
    assert rc in (0, 1)  # 1 only if parity says WORSE: a statement about the passes, not the script
    assert "| preset |" in data["markdown"]


def test_run_gpu_sh_is_valid_bash():
    script = BENCH / "run_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for name in ("check_kernels_gpu.py", "bench_fusions.py", "bench_layers.py", "pipefail", "PYTHONUNBUFFERED=1",
                 "nvidia-smi -L"):
        assert name in text

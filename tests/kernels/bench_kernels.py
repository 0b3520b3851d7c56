"""GPU micro-benchmark: fused gemma4_passes ops vs the unfused eager and Inductor-compiled code.

    python tests/kernels/bench_kernels.py [--sweep]

Times each case inside a CUDA graph (``triton.testing.do_bench_cudagraph``: GPU time, no launch
overhead) and prints microseconds and effective bandwidth (bytes each variant must move at least
once / time).  ``--sweep`` also times the launchers at every rows-per-program choice, to check the
launch heuristics.  Not a test: pytest does not collect it.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import gemma4_passes.kernels  # noqa: E402,F401  (registers the ops)
from gemma4_passes.kernels.gelu_mul import gelu_tanh_mul_triton  # noqa: E402
from gemma4_passes.kernels.qkv_norm_rope import qkv_norm_rope_triton  # noqa: E402

OPS = torch.ops.gemma4_passes
DT = torch.bfloat16
EPS = 1e-6


def hf_rms(x, w, eps=EPS):
    h = x.float() * torch.pow(x.float().pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        h = h * w.float()
    return h.type_as(x)


def rot_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rope(x, cos, sin):
    return x * cos.unsqueeze(2) + rot_half(x) * sin.unsqueeze(2)


def unfused_rmsnorm_add(x, r, w, sc):
    return (r + hf_rms(x, w)) * sc


def unfused_rmsnorm_add_rmsnorm(x, r, w, sc, nw):
    s = (r + hf_rms(x, w)) * sc
    return hf_rms(s, nw), s


def unfused_gelu_mul(g, o):
    return F.gelu(g, approximate="tanh") * o


def unfused_qkv(q, k, v, qw, kw, cos, sin):
    return rope(hf_rms(q, qw), cos, sin), rope(hf_rms(k, kw), cos, sin), hf_rms(v, None)


def bench(fn):
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50) * 1e3  # us


def row(name, nbytes, fns):
    times = {k: bench(f) for k, f in fns.items()}
    cells = "  ".join(f"{k} {t:8.2f}us {nbytes / t / 1e3:7.0f}GB/s" for k, t in times.items())
    speed = "  ".join(f"x{times[k] / times['fused']:.2f} vs {k}" for k in times if k != "fused")
    print(f"{name:44s} {cells}   {speed}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    comp = {}

    def compiled(f):
        if f not in comp:
            comp[f] = torch.compile(f, dynamic=False)
        return comp[f]

    # ---- norm / residual ----
    for n in (2560, 5376):
        for m in (1, 64, 4096):
            x = torch.randn(m, n, device=dev, dtype=DT)
            r = torch.randn(m, n, device=dev, dtype=DT)
            w = torch.randn(n, device=dev, dtype=DT)
            nw = torch.randn(n, device=dev, dtype=DT)
            sc = torch.tensor([0.7], device=dev, dtype=DT)
            torch._dynamo.reset()
            comp.clear()
            row(f"rmsnorm_add            M={m:<5d} N={n}", 3 * m * n * 2, {
                "fused": lambda: OPS.rmsnorm_add(x, r, w, sc, EPS),
                "eager": lambda: unfused_rmsnorm_add(x, r, w, sc),
                "inductor": lambda: compiled(unfused_rmsnorm_add)(x, r, w, sc),
            })
            row(f"rmsnorm_add_rmsnorm    M={m:<5d} N={n}", 4 * m * n * 2, {
                "fused": lambda: OPS.rmsnorm_add_rmsnorm(x, r, w, sc, nw, EPS, EPS),
                "eager": lambda: unfused_rmsnorm_add_rmsnorm(x, r, w, sc, nw),
                "inductor": lambda: compiled(unfused_rmsnorm_add_rmsnorm)(x, r, w, sc, nw),
            })

    # ---- gelu_tanh * other ----
    for m in (64, 4096):
        torch._dynamo.reset()
        comp.clear()
        g = torch.randn(m, 256, device=dev, dtype=DT)
        pli = torch.randn(m, 35, 256, device=dev, dtype=DT)
        o = pli[:, 7, :]
        row(f"gelu_mul PLE (strided) M={m:<5d} N=256", 3 * m * 256 * 2, {
            "fused": lambda: OPS.gelu_tanh_mul(g, o),
            "eager": lambda: unfused_gelu_mul(g, o),
            "inductor": lambda: compiled(unfused_gelu_mul)(g, o),
        })
        gu = torch.randn(m, 2 * 10240, device=dev, dtype=DT)
        g2, o2 = gu[:, :10240], gu[:, 10240:]
        row(f"gelu_mul MLP (merged)  M={m:<5d} N=10240", 3 * m * 10240 * 2, {
            "fused": lambda: OPS.gelu_tanh_mul(g2, o2),
            "eager": lambda: unfused_gelu_mul(g2, o2),
            "inductor": lambda: compiled(unfused_gelu_mul)(g2, o2),
        })

    # ---- q/k/v norms + RoPE ----
    for label, hq, hk, d, keqv in (
        ("E4B sliding 8/2x256", 8, 2, 256, False),
        ("31B sliding 32/16x256", 32, 16, 256, False),
        ("31B full 32/4x512 k=v", 32, 4, 512, True),
    ):
        for m in (1, 64, 4096):
            torch._dynamo.reset()
            comp.clear()
            width = (hq + (1 if keqv else 2) * hk) * d
            qkv = torch.randn(1, m, width, device=dev, dtype=DT)
            q = qkv[..., : hq * d].view(1, m, hq, d)
            k = qkv[..., hq * d : (hq + hk) * d].view(1, m, hk, d)
            v = k if keqv else qkv[..., (hq + hk) * d :].view(1, m, hk, d)
            qw = torch.randn(d, device=dev, dtype=DT)
            kw = torch.randn(d, device=dev, dtype=DT)
            cos = torch.randn(1, m, d, device=dev, dtype=DT)
            sin = torch.randn(1, m, d, device=dev, dtype=DT)
            nbytes = (2 * hq + (3 if keqv else 4) * hk) * m * d * 2 + 2 * m * d * 2
            row(f"qkv_norm_rope {label:22s} T={m:<5d}", nbytes, {
                "fused": lambda: OPS.qkv_norm_rope(q, k, v, qw, kw, cos, sin, EPS, EPS, EPS),
                "eager": lambda: unfused_qkv(q, k, v, qw, kw, cos, sin),
                "inductor": lambda: compiled(unfused_qkv)(q, k, v, qw, kw, cos, sin),
            })

    if not args.sweep:
        return
    print("\n-- rows-per-program sweep (launchers; 'auto' = heuristic) --")
    for m in (64, 4096):
        g = torch.randn(m, 256, device=dev, dtype=DT)
        o = torch.randn(m, 35, 256, device=dev, dtype=DT)[:, 7, :]
        t = {rp: bench(lambda rp=rp: gelu_tanh_mul_triton(g, o, rows_per_program=rp)) for rp in (None, 1, 2, 4, 8, 16)}
        print(f"gelu PLE M={m}: " + "  ".join(f"{'auto' if k is None else k}:{v:.2f}us" for k, v in t.items()))
        for hq, hk, d in ((32, 16, 256), (32, 4, 512)):
            qkv = torch.randn(1, m, (hq + 2 * hk) * d, device=dev, dtype=DT)
            q = qkv[..., : hq * d].view(1, m, hq, d)
            k = qkv[..., hq * d : (hq + hk) * d].view(1, m, hk, d)
            v = qkv[..., (hq + hk) * d :].view(1, m, hk, d)
            w = torch.randn(d, device=dev, dtype=DT)
            cs = torch.randn(1, m, d, device=dev, dtype=DT)
            t = {
                rp: bench(lambda rp=rp: qkv_norm_rope_triton(q, k, v, w, w, cs, cs, rows_per_program=rp))
                for rp in (None, 1, 2, 4, 8, 16)
            }
            print(f"qkv {hq}/{hk}x{d} T={m}: " + "  ".join(f"{'auto' if k is None else k}:{v:.2f}us" for k, v in t.items()))


if __name__ == "__main__":
    main()

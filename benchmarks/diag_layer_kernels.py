"""Diagnostics behind the layer and fusion benchmarks (GPU): where extra kernels come from, and
which norm kernel to pick at prefill-ish row counts.

  PYTHONPATH=. python3 benchmarks/diag_layer_kernels.py [--preset 31b --layers 2 --tokens 64]

1. Compiles a published-dims decoder slice with the passes, runs it once (no CUDA graph) under
   torch.profiler and prints, for every copy kernel, the chain of CPU ops that launched it; also
   the strides every ``gemma4_passes`` op receives.
2. Times ``rmsnorm_add_rmsnorm`` whole-row vs chunked at hidden 2560/2816/5376 and 128-4096 rows
   against a same-size device copy (the memory roofline at that size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _chain(evt) -> str:
    names = []
    e = evt
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return " <- ".join(names[:8])


def copy_origins(preset: str, n_layers: int, tokens: int) -> None:
    import gemma4_passes
    import gemma4_passes.kernels.ops as ops
    from gemma4_passes.models import build_model
    from gemma4_passes.presets import layer_slice, resolve

    seen = {}

    def spy(name):
        fn = getattr(ops, name)

        def wrapped(*a, **k):
            key = (name, tuple((tuple(t.shape), t.stride()) for t in a if isinstance(t, torch.Tensor)))
            seen[key] = seen.get(key, 0) + 1
            return fn(*a, **k)

        setattr(ops, name, wrapped)

    for n in ("rmsnorm_add_triton", "rmsnorm_add_rmsnorm_triton", "gelu_tanh_mul_triton",
              "q_norm_rope_triton", "qkv_norm_rope_triton"):
        spy(n)
    p = layer_slice(resolve(preset), n_layers)
    model = build_model(p, dtype=torch.bfloat16, device="cuda", seed=0)
    ids = torch.randint(0, p.vocab_size, (1, tokens), device="cuda")
    torch._dynamo.reset()
    fn = torch.compile(model.model, fullgraph=True, dynamic=False,
                       options={"post_grad_custom_pre_pass": gemma4_passes.build_pass()})
    with torch.inference_mode():
        for _ in range(2):
            fn(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        seen.clear()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            fn(input_ids=ids, use_cache=False)
            torch.cuda.synchronize()
    print(f"== {preset} {n_layers} layers T={tokens}: gemma4_passes launcher inputs (shape, stride)")
    for (name, shapes), c in seen.items():
        print(f"  {c}x {name}: {shapes}")
    print("== copy / memcpy kernels and the CPU ops that launched them")
    found = 0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        for k in getattr(evt, "kernels", []) or []:
            kn = k.name if hasattr(k, "name") else str(k)
            if "copy" in kn.lower() or "memcpy" in kn.lower():
                found += 1
                print(f"  {kn[:90]}  <= {_chain(evt)}")
    print(f"  ({found} found)")


def norm_sweep() -> None:
    import triton.testing as tt

    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton

    print("== rmsnorm_add_rmsnorm bf16 (scalar + next weight), CUDA graph, us: tile / loop / same-size copy")
    for n in (2560, 2816, 5376):
        for m in (128, 256, 512, 1024, 2048, 4096):
            x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            r = torch.randn_like(x)
            w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            sc = torch.rand(1, device="cuda", dtype=torch.bfloat16)
            o1, o2 = torch.empty_like(x), torch.empty_like(x)
            src = torch.empty(2 * m * n, device="cuda", dtype=torch.bfloat16)
            dst = torch.empty_like(src)
            res = {}
            for impl in ("tile", "loop"):
                res[impl] = tt.do_bench_cudagraph(
                    lambda: rmsnorm_add_rmsnorm_triton(x, r, w, sc, w, 1e-6, 1e-6, out=o1, normed_out=o2, impl=impl),
                    rep=30) * 1000
            res["copy"] = tt.do_bench_cudagraph(lambda: dst.copy_(src), rep=30) * 1000
            default = "loop" if (m >= 512 and n >= 4097) else "tile"
            print(f"  N={n} M={m}: tile {res['tile']:.1f}  loop {res['loop']:.1f}  copy {res['copy']:.1f}  "
                  f"(default {default}; best/copy {min(res['tile'], res['loop']) / res['copy']:.2f})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="31b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args(argv)
    copy_origins(args.preset, args.layers, args.tokens)
    if not args.skip_sweep:
        norm_sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())

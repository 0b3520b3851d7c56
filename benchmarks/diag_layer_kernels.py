"""Diagnostics behind the layer and fusion benchmarks (GPU): where extra kernels come from, and
which norm kernel to pick at prefill-ish row counts.

  PYTHONPATH=. python3 benchmarks/diag_layer_kernels.py [--preset 31b --layers 2 --tokens 64]
      [--only copies,sweep,sweep_cold,sweep_wide,q_rope,router_ties]

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


def _bench_rotated(fn_of_set, sets, rep=30) -> float:
    """us per call in a CUDA graph, cycling through ``sets`` (together larger than L2: cold inputs)."""
    import triton.testing as tt

    # one graph replays all sets in turn; divide by their number
    def all_sets():
        for st in sets:
            fn_of_set(st)

    return tt.do_bench_cudagraph(all_sets, rep=rep) * 1000 / len(sets)


def _hf_tail(x, r, w, sc, wn):
    """The FFN tail as transformers writes it (fp32 upcast, pow(-0.5), type_as): Inductor's input."""
    def rms(t, ww):
        tf = t.float()
        return (tf * torch.pow(tf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * ww.float()).type_as(t)
    h = (r + rms(x, w)) * sc
    return rms(h, wn), h


def _cold_sets(m: int, n: int) -> list:
    """Input sets (x, r, w, scalar, next_w, out, normed_out), together larger than L2."""
    sets = []
    for _ in range(max(2, (96 << 20) // (4 * m * n * 2))):
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * 20
        sets.append((x, torch.randn_like(x), torch.randn(n, device="cuda", dtype=torch.bfloat16),
                     torch.rand(1, device="cuda", dtype=torch.bfloat16) + 0.5,
                     torch.randn(n, device="cuda", dtype=torch.bfloat16),
                     torch.empty_like(x), torch.empty_like(x)))
    return sets


def norm_sweep_cold() -> None:
    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton

    ind = torch.compile(_hf_tail, dynamic=False)
    print("== rmsnorm_add_rmsnorm bf16, cold inputs (rotated sets > L2), us: tile / loop / Inductor")
    for n in (5376,):
        for m in (256, 512, 768, 1024, 2048):
            sets = _cold_sets(m, n)
            res = {impl: _bench_rotated(
                lambda st, impl=impl: rmsnorm_add_rmsnorm_triton(*st[:5], 1e-6, 1e-6, out=st[5], normed_out=st[6],
                                                                 impl=impl), sets) for impl in ("tile", "loop")}
            res["inductor"] = _bench_rotated(lambda st: ind(*st[:5]), sets)
            print(f"  N={n} M={m}: tile {res['tile']:.1f}  loop {res['loop']:.1f}  inductor {res['inductor']:.1f}",
                  flush=True)


def q_rope_sweep() -> None:
    from gemma4_passes.kernels.qkv_norm_rope import q_norm_rope_triton

    def q_eager(q, w, cos, sin):
        qf = q.float()
        n = (qf * torch.pow(qf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5) * w.float()).type_as(q)
        c, s_ = cos.unsqueeze(2), sin.unsqueeze(2)
        half = n.shape[-1] // 2
        rot = torch.cat((-n[..., half:], n[..., :half]), dim=-1)
        return n * c + rot * s_

    ind = torch.compile(q_eager, dynamic=False)
    print("== q_norm_rope (KV-shared layer, Hq=8 D=256) bf16, cold, us by rows per program / Inductor")
    for t in (1, 8, 32, 512, 2048):
        sets = []
        for _ in range(8):
            q = torch.randn(1, t, 8, 256, device="cuda", dtype=torch.bfloat16) * 4
            pos = torch.randint(0, 32768, (1, t), device="cuda").float()
            inv = 1.0 / (10000 ** (torch.arange(0, 256, 2, device="cuda").float() / 256))
            emb = torch.cat([pos[..., None] * inv] * 2, -1)
            sets.append((q, torch.randn(256, device="cuda", dtype=torch.bfloat16), emb.cos().bfloat16(),
                         emb.sin().bfloat16(), torch.empty_like(q)))
        line = []
        for rows in (None, 1, 2, 4, 8, 16, 32):
            us = _bench_rotated(lambda st, rows=rows: q_norm_rope_triton(*st[:4], 1e-6, out=st[4],
                                                                        rows_per_program=rows), sets)
            line.append(f"{rows or 'default'}:{us:.2f}")
        line.append(f"inductor:{_bench_rotated(lambda st: ind(*st[:4]), sets):.2f}")
        print(f"  T={t}: " + "  ".join(line), flush=True)


def router_ties() -> None:
    import torch.nn.functional as F

    import gemma4_passes.kernels  # noqa: F401

    print("== moe_router vs eager on CUDA (E=128, k=8): ids identical except where probabilities tie")
    for dt in (torch.bfloat16, torch.float32):
        for t in (1, 64, 8192):
            logits = (torch.randn(t, 128, device="cuda") * 2).to(dt)
            pes = torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5
            probs = F.softmax(logits, -1, dtype=torch.float32)
            w_e, ids_e = torch.topk(probs, 8, -1)
            w_e = w_e / w_e.sum(-1, keepdim=True) * pes[ids_e]
            w_f, ids_f = torch.ops.gemma4_passes.moe_router(logits, pes, 8, False)
            # values the eager top-k selected vs what the kernel selected, per rank
            pv_e = probs.gather(1, ids_e)
            pv_f = probs.gather(1, ids_f)
            same_vals = torch.equal(pv_e, pv_f)
            differ = (ids_e != ids_f).any(1)
            # a differing row is explained by a tie: equal probabilities at the differing ranks
            tied_rows = 0
            for r in differ.nonzero().flatten().tolist():
                tied_rows += int(torch.equal(pv_e[r], pv_f[r]))
            wt = (w_e - w_f).abs() / w_e.abs().clamp_min(1e-30)
            ok_rows = ~differ
            werr = float(wt[ok_rows].max()) if ok_rows.any() else 0.0
            print(f"  {str(dt)[6:]} T={t}: rows with other ids {int(differ.sum())}/{t} "
                  f"(all at exact ties: {tied_rows == int(differ.sum())}), selected probabilities identical per "
                  f"rank: {same_vals}, max rel weight err on other rows {werr:.2e}", flush=True)


def norm_sweep_wide() -> None:
    """Wide rows (31B, N=5376) at the prefill sizes where Inductor's fusion beat both kernels:
    launch configurations of the two kernels vs Inductor and a same-bytes copy, cold inputs; and
    the configuration Inductor picked (from its generated code)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton

    n = 5376
    configs = [("tile", 1, w) for w in (4, 8, 16, 32)] + [("tile", 2, w) for w in (8, 16, 32)]
    configs += [("loop", c, w) for c in (1024, 2048) for w in (4, 8, 16)]
    print("== rmsnorm_add_rmsnorm bf16 N=5376, cold inputs, us (impl/rows-or-chunk/warps)")
    for m in (256, 512, 1024, 2048, 8192):
        ind = torch.compile(_hf_tail, dynamic=False)
        # each set also holds [x; r] and a same-size destination: the copy of the same bytes
        sets = [st + (torch.cat(st[:2]), torch.empty(2 * m, n, device="cuda", dtype=torch.bfloat16))
                for st in _cold_sets(m, n)]
        _, code = run_and_get_code(ind, *sets[0][:5])
        cfg = sorted(set(re.findall(r"(num_warps['\"]?[:=] ?\d+|[XR]0?_?BLOCK['\"]?[:=] ?\d+|persistent_reduction|"
                                    r"@triton_heuristics\.\w+)", "\n".join(code))))
        res = {}
        for impl, k, w in configs:
            kw = dict(impl=impl, num_warps=w, **({"rows_per_program": k} if impl == "tile" else {"chunk": k}))
            res[f"{impl}/{k}/{w}"] = _bench_rotated(
                lambda st, kw=kw: rmsnorm_add_rmsnorm_triton(*st[:5], 1e-6, 1e-6, out=st[5], normed_out=st[6], **kw),
                sets)
        res["default"] = _bench_rotated(
            lambda st: rmsnorm_add_rmsnorm_triton(*st[:5], 1e-6, 1e-6, out=st[5], normed_out=st[6]), sets)
        res["inductor"] = _bench_rotated(lambda st: ind(*st[:5]), sets)
        # the same bytes moved: read x and r, write two outputs ([2M, N] -> [2M, N])
        res["copy"] = _bench_rotated(lambda st: st[8].copy_(st[7]), sets)
        best = min((v, k) for k, v in res.items() if k not in ("inductor", "copy"))
        print(f"  M={m}: " + "  ".join(f"{k} {v:.1f}" for k, v in res.items()), flush=True)
        print(f"  M={m}: best {best[1]} {best[0]:.1f} vs inductor {res['inductor']:.1f}; inductor config {cfg}",
              flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="31b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--only", default="copies,sweep",
                    help="comma list of: copies, sweep, sweep_cold, sweep_wide, q_rope, router_ties")
    args = ap.parse_args(argv)
    todo = args.only.split(",")
    if "copies" in todo:
        copy_origins(args.preset, args.layers, args.tokens)
    if "sweep" in todo:
        norm_sweep()
    if "sweep_cold" in todo:
        norm_sweep_cold()
    if "sweep_wide" in todo:
        norm_sweep_wide()
    if "q_rope" in todo:
        q_rope_sweep()
    if "router_ties" in todo:
        router_ties()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of the tensor-parallel epilogue sites: all-reduce + Gemma-4's norm-before-residual tail.

  torchrun --nproc-per-node 2 benchmarks/bench_allreduce.py --out $OUT

Per site (post-FFN: AR -> rms(w) -> + residual -> * layer_scalar -> next rms; post-attention: the
same without the scalar) and token count, under CUDA-graph replay (K calls captured back to back,
the graph replayed; us per call, median of 3), side by side in one run:

* ``nccl+inductor``:   the graph's own ``_c10d_functional.all_reduce`` (NCCL) + Inductor's compile of
  the epilogue (torch.compile of the whole site, no passes);
* ``symm+inductor``:   torch symmetric-memory one-shot all-reduce (``one_shot_all_reduce_copy``) +
  Inductor's epilogue;
* ``nccl+fused``:      NCCL + the spine's fused epilogue kernel (this package's fallback path);
* ``oneshot_fused``:   this package's one-shot push kernel with the epilogue in the same launch;
* ``flashinfer+...``:  FlashInfer's trtllm AR+RMSNorm (zero residual) + Inductor's remainder, when
  flashinfer is importable.

Rank 0 writes ``bench_allreduce.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = (1, 8, 32, 128, 512, 1024, 2048, 4096)
EPS = 1e-6


def rms(x, w):
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + EPS, -0.5) * w.float()).to(x.dtype)


def epilogue(s, res, w, sc, nw):
    h = res + rms(s, w)
    if sc is not None:
        h = h * sc
    return rms(h, nw), h


def time_graph(fn, k=20, replays=30, repeats=3):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(k):
            fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()  # warm
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * k))
    del g
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--hidden", type=int, default=5376)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sweep-warps", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also time the one-shot kernel at these num_warps, e.g. 4,16")
    args = ap.parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD.group_name
    import torch.distributed._functional_collectives as funcol
    import torch.distributed._symmetric_memory as symm_mem

    from gemma4_passes.kernels import allreduce_workspace
    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton
    from gemma4_passes.kernels.oneshot_allreduce import oneshot_allreduce_norm

    tokens = [int(t) for t in args.tokens.split(",")]
    n, dtype = args.hidden, torch.bfloat16
    ws = allreduce_workspace.prepare(group, dev, capacity_elems=max(tokens) * n)
    symm_buf = symm_mem.empty(max(tokens) * n, dtype=dtype, device=dev)
    symm_mem.rendezvous(symm_buf, group)
    try:
        import flashinfer.comm as ficomm  # noqa: F401
        have_fi = True
    except ImportError:
        have_fi = False

    results = []
    for site in ("post_ffn", "post_attn"):
        for t in tokens:
            g = torch.Generator(device=dev).manual_seed(rank * 7919 + t)
            x = torch.randn(t, n, device=dev, generator=g).to(dtype)
            res = torch.randn(t, n, device=dev).to(dtype)
            w, nw = torch.randn(n, device=dev).to(dtype), torch.randn(n, device=dev).to(dtype)
            sc = (torch.rand(1, device=dev) + 0.5).to(dtype) if site == "post_ffn" else None

            def nccl_site(x, res, w, sc, nw):
                return epilogue(funcol.all_reduce(x, "sum", group), res, w, sc, nw)

            torch._dynamo.reset()
            nccl_inductor = torch.compile(nccl_site, dynamic=False)
            ind_epi = torch.compile(epilogue, dynamic=False)
            sbuf = symm_buf[: t * n].view(t, n)
            out, normed = torch.empty_like(x), torch.empty_like(x)
            modes = {
                "nccl_alone": lambda: funcol.wait_tensor(funcol.all_reduce(x, "sum", group)),
                "symm_alone": lambda: torch.ops.symm_mem.one_shot_all_reduce_copy(sbuf, x, "sum", group),
                "nccl+inductor": lambda: nccl_inductor(x, res, w, sc, nw),
                "symm+inductor": lambda: ind_epi(torch.ops.symm_mem.one_shot_all_reduce_copy(sbuf, x, "sum", group),
                                                 res, w, sc, nw),
                "nccl+fused": lambda: rmsnorm_add_rmsnorm_triton(
                    funcol.wait_tensor(funcol.all_reduce(x, "sum", group)), res, w, sc, nw, EPS, EPS),
                "oneshot_fused": lambda: oneshot_allreduce_norm(x, res, w, sc, nw, EPS, EPS, True, ws, out=out,
                                                                normed_out=normed),
            }
            for warps in args.sweep_warps:  # launch-config sweep of the one-shot kernel
                modes[f"oneshot_w{warps}"] = (lambda wp=warps: oneshot_allreduce_norm(
                    x, res, w, sc, nw, EPS, EPS, True, ws, out=out, normed_out=normed, num_warps=wp))
            row = dict(site=site, t=t)
            for name, fn in modes.items():
                try:
                    row[name] = time_graph(fn)
                except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the others
                    row[name] = None
                    row[name + "_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if rank == 0:
                print(json.dumps(row), flush=True)
            results.append(row)
    if rank == 0:
        info = dict(device=torch.cuda.get_device_name(dev), world=world, torch=torch.__version__, hidden=n,
                    dtype="bf16", flashinfer=have_fi, date=time.strftime("%Y-%m-%d"), rows=results)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_allreduce.json").write_text(json.dumps(info, indent=1))
        hdr = ["site", "t", "nccl_alone", "symm_alone", "nccl+inductor", "symm+inductor", "nccl+fused",
               "oneshot_fused"]
        print(" | ".join(hdr))
        for r in results:
            print(" | ".join(str(r[h]) if not isinstance(r.get(h), float) else f"{r[h]:.2f}" for h in hdr))
    dist.barrier()
    allreduce_workspace.release_all()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

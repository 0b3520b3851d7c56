"""GPU correctness of the one-shot all-reduce epilogue kernel (torchrun, one process per GPU).

  torchrun --nproc-per-node 2 benchmarks/allreduce_check.py --out $OUT            # correctness + replay
  torchrun --nproc-per-node 2 benchmarks/allreduce_check.py --skip-test --out $OUT   # a skipped call

Correctness: fresh random inputs per rank (residual and weights shared, as under TP), outputs
poisoned with NaN, against NCCL's all-reduce followed by the spine's fused epilogue kernel (the
unfused path), for every token count in TOKENS, hidden sizes of all four models, bf16/fp16, the
post-attention (second norm, no scalar) and post-FFN (scalar + next norm) epilogues; outputs
gathered and compared bitwise across ranks.  Replay: CALLS back-to-back calls under CUDA-graph
replay, the output unchanged from the eager one.  ``--skip-test``: rank 1 skips a call; rank 0 must
fail with the kernel's timeout instead of hanging.  Rank 0 writes ``allreduce_check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = (1, 2, 3, 7, 8, 16, 31, 32, 64, 100, 127, 128, 255, 256, 512, 1000, 1024, 2048, 4096, 8192)
HIDDEN = (5376, 2816, 2560, 1536)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _setup():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, world, torch.device("cuda", torch.cuda.current_device())


def _inputs(t, n, dtype, dev, rank, seed):
    g = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)  # x differs per rank
    shared = torch.Generator(device=dev).manual_seed(seed)  # residual, weights, scalar: the same
    x = torch.randn(t, n, device=dev, dtype=torch.float32, generator=g).to(dtype)
    res = torch.randn(t, n, device=dev, dtype=torch.float32, generator=shared).mul_(2).to(dtype)
    w = torch.randn(n, device=dev, generator=shared).to(dtype)
    nw = torch.randn(n, device=dev, generator=shared).to(dtype)
    sc = (torch.rand(1, device=dev, generator=shared) + 0.5).to(dtype)
    return x, res, w, nw, sc


def _unfused(x, res, w, sc, nw, second, unrounded):
    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton, rmsnorm_add_triton

    s = x.clone()
    dist.all_reduce(s)
    if second:
        return rmsnorm_add_rmsnorm_triton(s, res, w, sc, nw, 1e-6, 1e-6, unrounded_sum=unrounded)
    return None, rmsnorm_add_triton(s, res, w, sc, 1e-6)


def _fused(x, res, w, sc, nw, second, unrounded, ws):
    from gemma4_passes.kernels.oneshot_allreduce import oneshot_allreduce_norm

    out = torch.full_like(x, float("nan"))
    normed = torch.full_like(x, float("nan")) if second else None
    return oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, second, ws, unrounded_sum=unrounded, out=out,
                                  normed_out=normed)


def _same_on_all_ranks(t: torch.Tensor, world: int) -> bool:
    got = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(got, t.contiguous())
    return all(torch.equal(got[0].view(torch.int16), g.view(torch.int16)) for g in got[1:])


def check_correctness(rank, world, dev, ws, seed=0):
    # (name, second norm, scalar, next weight, unrounded fp32 sum)
    sites = [("post_attn", True, False, True, False), ("post_ffn", True, True, True, False),
             ("ple_tail", False, True, False, False), ("sglang_unrounded", True, False, False, True)]
    rows, failures, not_bitwise, worst = [], 0, 0, 0.0
    for dname, dtype in DTYPES.items():
        for n in HIDDEN:
            for t in TOKENS:
                if t * n > ws.capacity:
                    continue
                for site, second, has_sc, has_nw, unrounded in sites:
                    seed += 1
                    x, res, w, nw, sc = _inputs(t, n, dtype, dev, rank, seed)
                    sc_ = sc if has_sc else None
                    nw_ = nw if has_nw else None
                    want = _unfused(x, res, w, sc_, nw_, second, unrounded)
                    got = _fused(x, res, w, sc_, nw_, second, unrounded, ws)
                    pairs = [(got[1], want[1])] + ([(got[0], want[0])] if second else [])
                    bitwise = all(torch.equal(a, b) for a, b in pairs)
                    err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
                              for a, b in pairs)
                    nan = any(bool(torch.isnan(a).any()) for a, _ in pairs)
                    ranks_equal = all(_same_on_all_ranks(a, world) for a, _ in pairs)
                    # bf16 sum of two bf16 values in fp32 then one rounding is what NCCL does for two
                    # ranks, so bits should agree; a rare double rounding is allowed, not a NaN
                    ok = ranks_equal and not nan and err < 1e-2
                    failures += not ok
                    not_bitwise += not bitwise
                    worst = max(worst, err)
                    if not ok or t in (1, 128, 8192):
                        rows.append(dict(dtype=dname, n=n, t=t, site=site, bitwise_vs_nccl=bitwise, rel_err=err,
                                         nan=nan, ranks_equal=ranks_equal, ok=ok))
    return dict(failures=failures, not_bitwise_vs_nccl=not_bitwise, worst_rel_err=worst, rows=rows)


def check_replay(rank, world, dev, ws, t, calls=10_000, per_graph=100):
    from gemma4_passes.kernels.oneshot_allreduce import oneshot_allreduce_norm

    x, res, w, nw, sc = _inputs(t, 5376, torch.bfloat16, dev, rank, 99)
    eager = oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws)
    normed, out = torch.empty_like(x), torch.empty_like(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws, out=out, normed_out=normed)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(per_graph):
            oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws, out=out, normed_out=normed)
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(calls // per_graph):
        g.replay()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    same = torch.equal(out, eager[1]) and torch.equal(normed, eager[0])
    # a fresh eager call after the replays still agrees (the slot counter stayed in step)
    again = oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws)
    same = same and torch.equal(again[1], eager[1])
    return dict(t=t, calls=calls, wall_s=wall, us_per_call=wall / calls * 1e6, unchanged=same,
                ranks_equal=_same_on_all_ranks(out, world))


def skip_test(rank, world, dev, ws, out_dir: Path):
    from gemma4_passes.kernels.oneshot_allreduce import oneshot_allreduce_norm

    x, res, w, nw, sc = _inputs(8, 5376, torch.bfloat16, dev, rank, 7)
    oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws)  # one call both ranks make
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 0:
        t0 = time.perf_counter()
        try:
            oneshot_allreduce_norm(x, res, w, sc, nw, 1e-6, 1e-6, True, ws, timeout_s=3.0)
            torch.cuda.synchronize()
            result = dict(failed=False, seconds=time.perf_counter() - t0)
        except RuntimeError as exc:  # the trap surfaces as a CUDA error at the next sync
            result = dict(failed=True, seconds=time.perf_counter() - t0, error=str(exc)[:300])
        (out_dir / "allreduce_skip.json").write_text(json.dumps(result, indent=1))
        print("SKIP-TEST", json.dumps(result), flush=True)
    else:
        time.sleep(8)  # never makes the call rank 0 is waiting in
    os._exit(0)  # the CUDA context of rank 0 is gone after the trap: no orderly teardown


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-test", action="store_true")
    ap.add_argument("--replay-calls", type=int, default=10_000)
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, dev = _setup()
    from gemma4_passes.kernels import allreduce_workspace

    group = dist.group.WORLD.group_name
    ws = allreduce_workspace.prepare(group, dev, capacity_elems=8192 * 5376)
    if args.skip_test:
        skip_test(rank, world, dev, ws, out_dir)
    t0 = time.perf_counter()
    result = dict(world=world, device=torch.cuda.get_device_name(dev), torch=torch.__version__)
    result["correctness"] = check_correctness(rank, world, dev, ws)
    result["replay"] = [check_replay(rank, world, dev, ws, t, args.replay_calls) for t in (1, 8, 128)]
    result["seconds"] = time.perf_counter() - t0
    if rank == 0:
        (out_dir / "allreduce_check.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "correctness"}), flush=True)
        c = result["correctness"]
        print("CORRECTNESS failures", c["failures"], "not bitwise vs NCCL", c["not_bitwise_vs_nccl"],
              "worst rel err", c["worst_rel_err"], flush=True)
        for row in c["rows"]:
            if not row["ok"]:
                print("FAIL", row, flush=True)
    dist.barrier()
    allreduce_workspace.release_all()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gemma-4 decoder layers at published dims under tensor parallelism (torchrun, 2 ranks, NCCL):
Inductor alone vs Inductor + passes vs Inductor + passes + the fused all-reduce epilogues.

  torchrun --nproc-per-node 2 benchmarks/tp_layers.py --preset 31b --layers 2 --out $OUT

A layer slice of the preset (random weights, vocabulary cut to ``--vocab`` so the LM head does not
swamp the layers, LM head scaled by ``--lm-head-scale`` so greedy tokens mean something) is saved
once and loaded with transformers' own ``tp_plan="auto"`` (all-reduces as ``_c10d_functional``
collectives).  Each mode compiles the model and times a forward of T tokens (no KV cache: the
attention over T tokens stands in for decode attention) under CUDA-graph replay; parity: the
logits' max error against the uncompiled sharded model, relative to its largest logit, and the
greedy-token agreement, per mode.  Rank 0 writes ``tp_layers_<preset>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {
    "inductor": None,  # no passes, the all-reduce through NCCL
    "inductor+symm": "symm",  # no passes, Inductor lowers small all-reduces to symm-mem one-shot
    "passes": "default",
    "passes+allreduce": "default+allreduce_norm",
}


def _fusions(spec):
    from gemma4_passes.passes import DEFAULT_FUSIONS

    if spec in (None, "symm"):
        return None
    return list(DEFAULT_FUSIONS) + (["allreduce_norm"] if spec.endswith("+allreduce_norm") else [])


def _inductor_symm_mem(on: bool, group_name: str, max_bytes: int = 2048 * 5376 * 2) -> None:
    """Inductor's own lowering of a sum all-reduce to torch's symm-mem one-shot kernel (small inputs)."""
    import torch._inductor.config as cfg

    cfg._collective.auto_select = on
    cfg._collective.one_shot_all_reduce_threshold_bytes = max_bytes if on else 128 * 1024
    if on:
        import torch.distributed._symmetric_memory as symm_mem

        if not symm_mem.is_symm_mem_enabled_for_group(group_name):
            symm_mem.enable_symm_mem_for_group(group_name)


def _time(fn, replays=20, repeats=3):
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
        out = fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / replays)
    return statistics.median(times), g, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="31b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lm-head-scale", type=float, default=8.0)
    ap.add_argument("--tokens", default="1,8,32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {list(MODES)}")
    args = ap.parse_args(argv)

    import gemma4_passes
    from gemma4_passes.models import build_model
    from gemma4_passes.presets import layer_slice, resolve
    from transformers import AutoModelForCausalLM

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(args.out)
    ckpt = Path(args.ckpt or f"/tmp/tp_layers_{args.preset}_{args.layers}")
    p = layer_slice(resolve(args.preset), args.layers)
    p = dataclasses.replace(p, vocab_size=args.vocab, num_key_value_heads=max(p.num_key_value_heads, world),
                            num_global_key_value_heads=max(p.num_global_key_value_heads or 1, world))
    if rank == 0 and not (ckpt / "config.json").exists():
        build_model(p, dtype=torch.bfloat16, device="cpu", lm_head_scale=args.lm_head_scale).save_pretrained(ckpt)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(ckpt, tp_plan="auto", dtype=torch.bfloat16).eval()
    result = dict(preset=args.preset, layers=args.layers, world=world, device=torch.cuda.get_device_name(dev),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), vocab=args.vocab,
                  lm_head_scale=args.lm_head_scale, rows=[])
    tokens = [int(v) for v in args.tokens.split(",")]
    inputs, refs = {}, {}
    for t in tokens:
        ids = torch.randint(0, args.vocab, (1, t), generator=torch.Generator().manual_seed(t)).to(dev)
        if t > 1:
            torch._dynamo.mark_dynamic(ids, 1)  # one compile for every T > 1 per mode
        with torch.no_grad():
            refs[t] = model(ids, use_cache=False).logits.float()
        inputs[t] = ids
    rows = {t: dict(t=t) for t in tokens}
    for mode in args.modes.split(","):
        spec = MODES[mode]
        torch._dynamo.reset()
        gemma4_passes.disable()
        names = _fusions(spec)
        if names is not None:
            gemma4_passes.enable(names)
        gemma4_passes.reset_match_report()
        _inductor_symm_mem(spec == "symm", dist.group.WORLD.group_name)
        compiled = torch.compile(model)
        for t in tokens:
            ids, ref = inputs[t], refs[t]
            try:
                with torch.no_grad():
                    us, graph, out = _time(lambda: compiled(ids, use_cache=False).logits)
                    logits = out.float()
                rows[t][mode] = dict(us=us, matches=gemma4_passes.match_report(),
                                     rel_err=float((logits - ref).abs().max() / ref.abs().max()),
                                     token_agree=float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))
                del graph
            except Exception as exc:  # noqa: BLE001 - keep the other modes
                rows[t][mode] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if rank == 0:
                print(t, mode, json.dumps(rows[t][mode]), flush=True)
    result["rows"] = [rows[t] for t in tokens]
    gemma4_passes.disable()
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"tp_layers_{args.preset}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    from gemma4_passes.kernels import allreduce_workspace

    allreduce_workspace.release_all()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor-parallel harness: a transformers Gemma-4 model sharded with its own ``tp_plan="auto"``
(all-reduces as ``_c10d_functional`` collectives), compiled with the passes, checked against the
uncompiled sharded model.  Run under torchrun; gloo on CPU, NCCL on CUDA:

  torchrun --nproc-per-node 2 benchmarks/tp_harness.py --preset tiny-31b --out DIR      # CPU
  torchrun --nproc-per-node 2 benchmarks/tp_harness.py --preset 31b --layers 2 --device cuda --dtype bf16

Rank 0 writes ``tp_harness.json``: the match report, the max |compiled - eager| of the logits and
the scale.  Random weights are saved once (rank 0) to ``--ckpt`` and loaded sharded by every rank.
Presets whose KV-head counts do not divide by the world size get them raised to it (tiny presets
have a single global KV head).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sharded_preset(name: str, layers: int | None, world: int):
    from gemma4_passes.presets import layer_slice, resolve

    p = resolve(name)
    if layers:
        p = layer_slice(p, layers)
    kv = max(p.num_key_value_heads, world)
    gkv = max(p.num_global_key_value_heads or 1, world)
    return dataclasses.replace(p, num_key_value_heads=kv, num_global_key_value_heads=gkv, name=f"{p.name}-tp{world}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-31b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--fusions", default="post_attn_norm,ffn_tail,ple_tail,allreduce_norm")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: <out>/ckpt)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)

    import gemma4_passes
    from gemma4_passes.models import build_model
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    ckpt = Path(args.ckpt) if args.ckpt else out / "ckpt"
    dtype = DTYPES[args.dtype]
    if rank == 0 and not (ckpt / "config.json").exists():
        build_model(_sharded_preset(args.preset, args.layers, world), dtype=dtype, device="cpu",
                    seed=0).save_pretrained(ckpt)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if world > 1:
        dist.barrier()  # the checkpoint is written
    model = AutoModelForCausalLM.from_pretrained(ckpt, tp_plan="auto" if world > 1 else None, dtype=dtype)
    model.eval()
    ids = (torch.arange(args.tokens).reshape(1, -1) * 7 % model.config.vocab_size)
    ids = ids.to(next(model.parameters()).device)
    gemma4_passes.enable(args.fusions.split(","))
    gemma4_passes.reset_match_report()
    with torch.no_grad():
        ref = model(ids).logits.float()
        got = torch.compile(model)(ids).logits.float()
    result = dict(world_size=world, preset=args.preset, dtype=args.dtype, device=args.device,
                  matches=gemma4_passes.match_report(), max_abs=float((got - ref).abs().max()),
                  scale=float(ref.abs().max()), same_argmax=bool(torch.equal(got.argmax(-1), ref.argmax(-1))))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tp_harness.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

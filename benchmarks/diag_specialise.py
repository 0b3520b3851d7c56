"""Where does a compile specialise the token count?  (issue 5: the piecewise mode recompiled per
shape on CUDA only.)

Runs a short `gemma4-passes bench` scenario in the chosen modes with ShapeEnv patched so that every
time a size symbol is replaced by a constant (what a guard like ``Eq(s27, 32)`` does), the Python
stack that caused it is printed once per distinct stack.

    PYTHONPATH=. python benchmarks/diag_specialise.py --preset tiny-e2b --layers 4 --modes piecewise

(add ``TORCH_LOGS=recompiles`` for Dynamo's reason for each further graph)
"""

from __future__ import annotations

import argparse
import traceback

import torch
from torch.fx.experimental import symbolic_shapes as ss


def install_probe(frames: int) -> list:
    seen: set = set()
    hits: list = []
    orig = ss.ShapeEnv._set_replacement

    def patched(self, a, tgt, msg):
        if getattr(tgt, "is_number", False) and str(a).startswith("s"):
            stack = traceback.extract_stack()[:-1]
            key = tuple((f.filename, f.lineno) for f in stack[-frames:])
            if key not in seen:
                seen.add(key)
                hits.append((str(a), str(tgt), msg))
                print(f"\n=== {a} := {tgt} ({msg})", flush=True)
                print("".join(traceback.format_list(stack[-frames:])), flush=True)
        return orig(self, a, tgt, msg)

    ss.ShapeEnv._set_replacement = patched
    return hits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-e2b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--modes", default="piecewise")
    ap.add_argument("--frames", type=int, default=45)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--emulate-capture", action="store_true", help="CPU: run the capture path with EmulatedCapture")
    args = ap.parse_args()

    import logging

    from gemma4_passes import step_bench as sb

    # the runtime's one-line reasons (a piece that runs uncaptured, a rejected capture)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("gemma4_passes").setLevel(logging.INFO)

    hits = install_probe(args.frames)
    cfg = sb.BenchConfig(preset=args.preset, layers=args.layers, device=args.device,
                         modes=tuple(args.modes.split(",")), decode_batches=(1, 8), prefill_tokens=(128,),
                         decode_steps=2, warmup_steps=1, parity_batch=2, parity_steps=2, prefill_repeats=1,
                         count_kernels=False, emulate_capture=args.emulate_capture)
    model, p = sb.build_bench_model(cfg)
    for mode in cfg.modes:
        res = sb.run_mode(model, mode, cfg, p.vocab_size)
        print(f"--- mode {mode}: graphs compiled {res.graphs}, captures {res.captures}", flush=True)
    print(f"specialisations seen: {len(hits)}: {hits}")


if __name__ == "__main__":
    main()

"""``gemma4-passes bench``: decode and prefill steps over the paged KV cache in four modes (eager,
Inductor, Inductor + piecewise CUDA graphs, Inductor + passes + piecewise CUDA graphs); per-step
times, kernels per step, greedy-token parity, JSON (see ``gemma4_passes.step_bench``)."""

from __future__ import annotations

from typing import Any


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_parser(sub: Any, common: Any) -> None:
    from ..step_bench import DECODE_BATCHES, MODES, PREFILL_TOKENS

    p = sub.add_parser("bench", help="decode/prefill step times, kernels and parity: eager, Inductor, "
                                     "piecewise CUDA graphs, passes + piecewise CUDA graphs")
    common(p, "a preset name (required; slice big ones with --layers)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list from {','.join(MODES)}")
    p.add_argument("--decode-batches", type=_ints, default=DECODE_BATCHES)
    p.add_argument("--prefill-tokens", type=_ints, default=PREFILL_TOKENS)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per batch size")
    p.add_argument("--parity-steps", type=int, default=64)
    p.add_argument("--parity-batch", type=int, default=8)
    p.add_argument("--lm-head-scale", type=float, default=4.0, help="peaks random logits so argmax means something")
    p.add_argument("--vocab-size", type=int, help="override the preset's vocabulary (smaller LM head)")
    p.add_argument("--no-cache", action="store_true", help="Inductor caches off: every piece compiles, so the "
                   "match counts cover all of them (slower)")
    p.add_argument("--json", dest="json_out", help="write the result to this JSON file")
    p.set_defaults(func=run)


def run(args: Any) -> int:
    import torch

    from ..cli import DTYPES, _device, _say
    from ..step_bench import MODES, BenchConfig, format_table, run_bench, write_json

    if not args.preset:
        raise ValueError("bench needs --preset (e.g. --preset e2b, or --preset 31b --layers 4)")
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {list(MODES)}")
    device = _device(args)
    cfg = BenchConfig(
        preset=args.preset, layers=args.layers, device=device, modes=modes,
        dtype=DTYPES[args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32")],
        decode_batches=args.decode_batches, prefill_tokens=args.prefill_tokens, prompt_len=args.prompt_len,
        decode_steps=args.decode_steps, parity_steps=args.parity_steps, parity_batch=args.parity_batch,
        lm_head_scale=args.lm_head_scale, seed=args.seed, vocab_size=args.vocab_size, fusions=args.fusions,
        disable_caches=args.no_cache,
    )
    out = run_bench(cfg, progress=lambda mode: _say(f"[bench] {args.preset}: {mode}"))
    _say(format_table(out))
    if args.json_out:
        write_json(out, args.json_out)
    return 0 if out["parity_ok"] else 1

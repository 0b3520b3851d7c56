"""The ``gemma4-passes`` command line: demo, report, dump."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
CPU_DEMO_PRESETS = "tiny-e4b,tiny-31b"
CUDA_DEMO_PRESETS = "e4b,31b"
CUDA_DEMO_LAYERS = 6
REPORT_VOCAB = 2048  # the vocabulary does not change what matches; keep models small


def _say(msg: str) -> None:
    print(msg, flush=True)


def _model_for(args, preset_name: str | None, dtype, device, lm_head_scale: float = 1.0):
    """(model, label, expected-match source) for a preset (optionally sliced) or a checkpoint."""
    from . import models, presets

    if getattr(args, "checkpoint", None):
        model = models.load_checkpoint(args.checkpoint, dtype=dtype, device=device)
        return model.eval(), str(args.checkpoint), model.config
    p = presets.resolve(preset_name)
    if args.layers:
        p = presets.layer_slice(p, args.layers)
    if p.vocab_size > REPORT_VOCAB:
        p = dataclasses.replace(p, vocab_size=REPORT_VOCAB, vocab_size_per_layer_input=REPORT_VOCAB)
    model = models.build_model(p, dtype=dtype, device=device, seed=args.seed, lm_head_scale=lm_head_scale,
                               init_device=None if torch.device(device).type == "cuda" else "cpu")
    return model, p.name, p


def _fusion_table(expected: dict, matched: dict) -> tuple[str, bool]:
    rows = ["| fusion | expected | matched | |", "|---|---:|---:|---|"]
    ok = True
    for name, exp in expected.items():
        got = matched.get(name, 0)
        good = got == exp
        ok &= good
        rows.append(f"| {name} | {exp} | {got} | {'ok' if good else 'MISMATCH'} |")
    return "\n".join(rows), ok


def _device(args) -> str:
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_demo(args) -> int:
    from . import expected, parity

    device = _device(args)
    on_cuda = torch.device(device).type == "cuda"
    if args.layers is None and on_cuda and not args.preset:
        args.layers = CUDA_DEMO_LAYERS
    preset_list = args.preset or (CUDA_DEMO_PRESETS if on_cuda else CPU_DEMO_PRESETS)
    dtype = DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    all_ok = True
    targets = [None] if args.checkpoint else preset_list.split(",")
    for name in targets:
        model, label, source = _model_for(args, name, dtype, device, lm_head_scale=args.lm_head_scale)
        _say(f"\n== {label} on {device}, {str(dtype).removeprefix('torch.')}, batch {args.batch} x "
             f"{args.prompt_len} prompt tokens, {args.steps} greedy steps (LM head x{args.lm_head_scale:g} "
             "so random-weight logits are peaked) ==")
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
        t0 = time.perf_counter()

        def progress(mode):
            what = {"eager": "running eager", "inductor": "compiling + running Inductor alone",
                    "passes": "compiling + running Inductor + gemma4_passes"}[mode]
            _say(f"  [{time.perf_counter() - t0:6.1f}s] {what} ...")

        runs = parity.run_all(model, ids, args.steps, fusions=args.fusions, progress=progress)
        cmp = parity.compare(runs)
        exp = expected.expected_matches(source, fusions=args.fusions, rows=ids.numel())
        table, counts_ok = _fusion_table(exp, runs["passes"].matches)
        _say("\n" + table)
        _say("\n| mode | max abs logit err vs eager | rel | greedy tokens = eager |"
             + (" first call s | step ms |" if True else ""))
        _say("|---|---:|---:|---:|---:|---:|")
        for mode in parity.MODES:
            r = runs[mode]
            c = cmp.get(mode)
            step_ms = 1e3 * sum(r.step_s) / max(len(r.step_s), 1)
            err = f"{c.max_abs:.3g} | {c.rel:.2e} | {c.token_agreement:.0%}" if c else "- | - | -"
            _say(f"| {mode} | {err} | {r.first_call_s:.1f} | {step_ms:.2f} |")
        ok, why = parity.verdict(cmp, dtype)
        _say(f"\nparity: {'PASS' if ok else 'FAIL'} ({why}); fusion counts: {'PASS' if counts_ok else 'FAIL'}")
        if not on_cuda:
            _say("(CPU: the fused ops run their plain-torch implementations here; speed is measured on GPU, "
                 "see benchmarks/RESULTS.md)")
        all_ok &= ok and counts_ok
        del model
    return 0 if all_ok else 1


def cmd_report(args) -> int:
    from . import expected, manager, report

    device = _device(args)
    dtype = DTYPES[args.dtype or "bf16"]
    model, label, source = _model_for(args, args.preset or "tiny-e4b", dtype, device)
    ids = torch.randint(0, model.config.vocab_size, (1, 8)).to(device)
    _say(f"compiling {label} ({str(dtype).removeprefix('torch.')}, {device}) with gemma4_passes ...")
    import torch._inductor.config as cfg

    report.reset_match_report()
    prev, prev_cache = cfg.post_grad_custom_pre_pass, cfg.force_disable_caches
    cfg.post_grad_custom_pre_pass, cfg.force_disable_caches = manager.build_pass(args.fusions), True
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(lambda x: model(input_ids=x, use_cache=False).logits)(ids)
    finally:
        cfg.post_grad_custom_pre_pass, cfg.force_disable_caches = prev, prev_cache
    matched = report.match_report()
    table, ok = _fusion_table(expected.expected_matches(source, fusions=args.fusions, rows=ids.numel()), matched)
    _say(table)
    return 0 if ok else 1


def cmd_dump(args) -> int:
    import depyf

    from . import manager

    device = _device(args)
    dtype = DTYPES[args.dtype or "fp32"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, label, _ = _model_for(args, args.preset or "tiny-e4b", dtype, device)
    ids = torch.randint(0, model.config.vocab_size, (1, 8)).to(device)
    import torch._inductor.config as cfg

    prev, prev_cache = cfg.post_grad_custom_pre_pass, cfg.force_disable_caches
    cfg.post_grad_custom_pre_pass, cfg.force_disable_caches = manager.build_pass(args.fusions), True
    try:
        torch._dynamo.reset()
        with torch.no_grad(), depyf.prepare_debug(str(out)):
            torch.compile(lambda x: model(input_ids=x, use_cache=False).logits)(ids)
    finally:
        cfg.post_grad_custom_pre_pass, cfg.force_disable_caches = prev, prev_cache
    files = sorted(p.name for p in out.iterdir() if "gemma4_passes." in p.name)
    _say(f"depyf dump of {label} in {out}: {len(files)} before/after files of gemma4_passes")
    for f in files:
        _say(f"  {f}")
    return 0 if files else 1


#: subcommands kept in their own modules: ``gemma4_passes.commands.<name>.add_parser(sub, common)``
#: adds the subparser (``common(p, preset_help)`` adds the shared options) and sets ``func``.
COMMAND_MODULES: tuple[str, ...] = ("plan_kv", "bench")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gemma4-passes", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, preset_help):
        p.add_argument("--preset", help=preset_help)
        p.add_argument("--checkpoint", help="a local Gemma-4 checkpoint directory (no downloads)")
        p.add_argument("--layers", type=int, help="slice the preset to this many layers (structure kept)")
        p.add_argument("--dtype", choices=sorted(DTYPES))
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--fusions", help="comma list of fusions, or 'all' (default: every fusion that beats "
                       "Inductor where measured, i.e. all but ple_gate)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("-v", "--verbose", action="store_true")

    d = sub.add_parser("demo", help="eager vs Inductor vs Inductor+passes: fusion table, parity, step times")
    common(d, f"comma list of presets (default: {CPU_DEMO_PRESETS} on CPU, {CUDA_DEMO_PRESETS} sliced to "
              f"{CUDA_DEMO_LAYERS} layers on CUDA)")
    d.add_argument("--steps", type=int, default=8, help="greedy decode steps")
    d.add_argument("--batch", type=int, default=2)
    d.add_argument("--prompt-len", type=int, default=6)
    d.add_argument("--lm-head-scale", type=float, default=4.0)
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="the fusion table (expected vs matched) for a preset or checkpoint")
    common(r, "a preset name (default tiny-e4b)")
    r.set_defaults(func=cmd_report)

    du = sub.add_parser("dump", help="depyf dump with a before/after graph file per pass")
    common(du, "a preset name (default tiny-e4b)")
    du.add_argument("--out", required=True)
    du.set_defaults(func=cmd_dump)

    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"gemma4_passes.commands.{name}").add_parser(sub, common)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.fusions:
            from .manager import select_fusions

            args.fusions = list(select_fusions(args.fusions))
        return args.func(args)
    except (ValueError, RuntimeError) as e:
        from .compat import UnsupportedTorchError
        from .models import NotAGemma4CheckpointError

        if isinstance(e, (NotAGemma4CheckpointError, UnsupportedTorchError)) or type(e) is ValueError:
            print(f"gemma4-passes: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

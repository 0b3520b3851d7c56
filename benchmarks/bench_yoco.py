"""YOCO fast prefill on E2B / E4B at published dims (random weights): prefill time with and without it.

    PYTHONPATH=. python benchmarks/bench_yoco.py --out $OUT/bench_yoco.json
    PYTHONPATH=. python benchmarks/bench_yoco.py --presets e2b --prompts 4 --tokens 7000 --iters 5
    PYTHONPATH=. python benchmarks/bench_yoco.py --device cpu --presets tiny-e2b --prompts 2 --tokens 24   # smoke

Per preset (bf16, SDPA, ``build_model(preset, dtype=bf16, device=cuda, init_device=None)``):

* ``full``: ``model(ids, logits_to_keep=tensor([T-1]))``. The index tensor keeps the LM head to the
  last token (as YOCO does, so the comparison is about the layers) and keeps transformers >= 5.2x from
  taking its own KV-shared slicing (it only does that for an int ``logits_to_keep``): every layer
  runs on every token, as in SGLang 0.5.23.
* ``yoco``: ``gemma4_passes.runtime.yoco.yoco_forward(model, ids)`` (each prompt's last token).
* ``hf_builtin`` (only where transformers has it): ``model(ids, logits_to_keep=1)``, transformers'
  own slicing of the KV-shared layers to the last column.

Each is a prefill of ``--prompts`` prompts x ``--tokens`` tokens (random ids, no padding) writing a
fresh ``DynamicCache``; ``--warmup`` untimed calls, then the median of ``--iters`` calls timed with
CUDA events (``time.perf_counter`` on CPU). Correctness, from the last-token logits: the relative L2
error of the bf16 full and YOCO runs against an fp32 reference of the same prefill (the same model
cast to fp32, one prompt at a time; ``--reference none`` or too little free memory skips it), their
ratio, YOCO vs full (relative L2, max abs) and greedy-token agreement. ``--lm-head-scale`` (default 4) scales the untied LM head so that the logits are peaked and greedy
tokens mean something.

Random weights and Gemma-4's attention scaling of 1.0 make |q.k| ~ sqrt(head_dim) = 16: a nearly
one-hot softmax, so the random model is chaotic (bf16 and fp32 last-token logits come out
uncorrelated, whatever the schedule). ``--qk-norm-scale`` (default 0.25) multiplies every
``q_norm`` / ``k_norm`` weight so that the attention logits are O(1) and the errors measure the
computation; the timing does not depend on weight values.

Exit status 1 if a correctness check fails (YOCO's error vs fp32 more than 1.5x the full run's plus
the noise floor, or a greedy token differing from the full run's on a row whose top-2 margin is
more than twice the largest logit difference); speed goals are reported, not
enforced. The JSON (``--out``) is rewritten after every preset.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path)

from gemma4_passes import presets  # noqa: E402
from gemma4_passes.models import build_model  # noqa: E402
from gemma4_passes.runtime import yoco  # noqa: E402

#: speedup goals of the issue (layer counts allow about 3x and 1.75x).
GOALS = {"e2b": 2.0, "e4b": 1.6}
#: YOCO's error against fp32 may be at most this times the full bf16 run's (plus the noise floor).
ERROR_RATIO_LIMIT = 1.5
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="e2b,e4b", help="comma list of preset names (tiny-* for a smoke run)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per prefill")
    p.add_argument("--tokens", type=int, default=7000, help="tokens per prompt")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5, help="timed prefills per mode (median reported)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--lm-head-scale", type=float, default=4.0, help="peaks the logits (greedy agreement)")
    p.add_argument("--qk-norm-scale", type=float, default=0.25,
                   help="scales q_norm/k_norm weights: O(1) attention logits (see the module docstring)")
    p.add_argument("--reference", default="auto", choices=["auto", "fp32", "none"],
                   help="fp32 reference: auto = if the fp32 model fits in free memory")
    p.add_argument("--no-hf-builtin", action="store_true", help="skip transformers' own KV-shared slicing")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON result file")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def time_prefill(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of ``iters`` calls after ``warmup`` untimed ones (CUDA events / perf_counter)."""
    for _ in range(warmup):
        fn()
    common.sync(device)
    times = []
    for _ in range(max(1, iters)):
        if common.is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def temper_attention(model: torch.nn.Module, scale: float) -> None:
    """Multiply every q_norm / k_norm weight by ``scale`` (KV-shared layers have no k_norm)."""
    if scale == 1.0:
        return
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(scale)
            k_norm = getattr(layer.self_attn, "k_norm", None)
            if k_norm is not None:
                k_norm.weight.mul_(scale)


def has_hf_builtin_slicing(model: torch.nn.Module) -> bool:
    return hasattr(type(model.model), "_maybe_slice_kv_shared_inputs")


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def fp32_fits(model: torch.nn.Module, device: torch.device, prompts_tokens: int) -> bool:
    """Free memory for an fp32 copy of the weights (cast in place) plus one prompt's activations."""
    if not common.is_cuda(device):
        return True
    n_params = sum(p.numel() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    need = n_params * 2 + 8 * prompts_tokens * model.config.hidden_size * 64  # +fp32 half, activations
    return free > need


@torch.inference_mode()
def fp32_reference(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last-token logits of the full prefill in fp32, one prompt at a time (casts ``model`` in place)."""
    model.float()
    t = ids.shape[1]
    rows = [model(ids[i : i + 1], logits_to_keep=torch.tensor([t - 1], device=ids.device), use_cache=True).logits
            for i in range(ids.shape[0])]
    return torch.cat(rows)[:, -1].float().cpu()


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def logit_checks(full: torch.Tensor, fast: torch.Tensor, ref: torch.Tensor | None) -> dict:
    """Errors of the last-token logits ([P, V], fp32 on CPU)."""
    max_abs = (fast - full).abs().max().item()
    same = fast.argmax(-1) == full.argmax(-1)
    # A row whose top-2 margin exceeds twice the largest difference cannot flip by rounding alone.
    decisive = top2_margin(full) > 2 * max_abs
    out: dict[str, Any] = {
        "yoco_vs_full_rel_l2": common.rel_l2(fast, full),
        "yoco_vs_full_max_abs": max_abs,
        "greedy_yoco_eq_full": int(same.sum()),
        "greedy_differs_on_decisive_rows": int((~same & decisive).sum()),
        "rows": full.shape[0],
        "reference": "fp32" if ref is not None else "none (YOCO vs full bf16 only)",
    }
    if ref is not None:
        e_full = common.rel_l2(full, ref)
        e_fast = common.rel_l2(fast, ref)
        out.update(
            full_vs_fp32_rel_l2=e_full,
            yoco_vs_fp32_rel_l2=e_fast,
            error_ratio=e_fast / e_full if e_full > 0 else (1.0 if e_fast == 0 else math.inf),
            greedy_full_eq_fp32=int((full.argmax(-1) == ref.argmax(-1)).sum()),
            greedy_yoco_eq_fp32=int((fast.argmax(-1) == ref.argmax(-1)).sum()),
        )
    return out


def checks_pass(c: dict, dtype: torch.dtype) -> bool:
    floor = 0.5 * torch.finfo(dtype).eps  # about one rounding of the logits: below it the ratio means nothing
    if c["greedy_differs_on_decisive_rows"]:
        return False
    if "error_ratio" in c:
        return c["yoco_vs_fp32_rel_l2"] <= ERROR_RATIO_LIMIT * c["full_vs_fp32_rel_l2"] + floor
    return c["yoco_vs_full_rel_l2"] <= 8 * floor


# ------------------------------------------------------------------------------------------------
# one preset
# ------------------------------------------------------------------------------------------------
def run_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    preset = presets.resolve(name)
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    model = build_model(
        preset,
        dtype=dtype,
        device=device,
        seed=args.seed,
        attn_implementation=args.attn,
        lm_head_scale=args.lm_head_scale,
        init_device=None if common.is_cuda(device) else "cpu",
    )
    build_s = time.perf_counter() - t0
    temper_attention(model, args.qk_norm_scale)
    cfg = model.config
    vocab = cfg.vocab_size
    gen = common.generator(device, args.seed + 1)
    ids = torch.randint(0, vocab, (args.prompts, args.tokens), device=device, generator=gen)
    last = torch.tensor([args.tokens - 1], device=device)

    def full():
        return model(ids, logits_to_keep=last, use_cache=True)

    def fast():
        return yoco.yoco_forward(model, ids, use_cache=True)

    def builtin():
        return model(ids, logits_to_keep=1, use_cache=True)

    modes: dict[str, Callable[[], Any]] = {"full": full, "yoco": fast}
    if has_hf_builtin_slicing(model) and not args.no_hf_builtin:
        modes["hf_builtin"] = builtin

    result: dict[str, Any] = dict(
        preset=name,
        layers=cfg.num_hidden_layers,
        kv_shared_layers=cfg.num_kv_shared_layers,
        first_kv_shared_layer=cfg.num_hidden_layers - cfg.num_kv_shared_layers,
        hidden=cfg.hidden_size,
        prompts=args.prompts,
        tokens=args.tokens,
        dtype=args.dtype,
        attn=args.attn,
        build_s=round(build_s, 2),
        hf_builtin_slicing=has_hf_builtin_slicing(model),
    )
    logits: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for mode, fn in modes.items():
            logits[mode] = fn().logits[:, -1].float().cpu()
            if common.is_cuda(device):
                torch.cuda.reset_peak_memory_stats(device)
            times = time_prefill(fn, device, args.warmup, args.iters)
            result[f"{mode}_ms"] = statistics.median(times)
            result[f"{mode}_ms_all"] = [round(t, 3) for t in times]
            if common.is_cuda(device):
                result[f"{mode}_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            gc.collect()
    result["speedup"] = result["full_ms"] / result["yoco_ms"]
    if "hf_builtin_ms" in result:
        result["speedup_hf_builtin"] = result["full_ms"] / result["hf_builtin_ms"]
    goal = GOALS.get(preset.parent or preset.name) if not name.startswith("tiny") else None
    result["goal"] = goal
    result["meets_goal"] = None if goal is None else result["speedup"] >= goal

    ref = None
    want_ref = args.reference == "fp32" or (
        args.reference == "auto" and fp32_fits(model, device, args.tokens)
    )
    if want_ref:
        try:
            ref = fp32_reference(model, ids)
        except torch.OutOfMemoryError:
            result["reference_note"] = "fp32 reference ran out of memory"
            ref = None
    elif args.reference == "auto":
        result["reference_note"] = "fp32 copy does not fit in free memory"
    checks = logit_checks(logits["full"], logits["yoco"], ref)
    result["logits"] = checks
    result["correct"] = checks_pass(checks, dtype)

    return result


def summary_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        c = r.get("logits", {})
        rows.append([
            r["preset"],
            f"{r['prompts']}x{r['tokens']}",
            f"{r['full_ms']:.1f}",
            f"{r['yoco_ms']:.1f}",
            common.fmt_x(r["speedup"]),
            "-" if r.get("goal") is None else f">= {r['goal']}x " + ("met" if r["meets_goal"] else "MISSED"),
            common.fmt_x(r.get("speedup_hf_builtin")),
            common.fmt_e(c.get("full_vs_fp32_rel_l2")),
            common.fmt_e(c.get("yoco_vs_fp32_rel_l2")),
            common.fmt_e(c.get("yoco_vs_full_rel_l2")),
            f"{c.get('greedy_yoco_eq_full')}/{c.get('rows')}",
            "ok" if r["correct"] else "FAIL",
        ])
    return common.md_table(
        ["preset", "prompts", "full ms", "yoco ms", "speedup", "goal", "hf builtin", "full vs fp32",
         "yoco vs fp32", "yoco vs full", "greedy =", "logits"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    common.seed_all(args.seed)
    info = common.env_info(device)
    common.print_env(info)
    out = Path(args.out) if args.out else None
    data: dict[str, Any] = dict(env=info, args=vars(args), goals=GOALS, results=[])
    for name in [s.strip() for s in args.presets.split(",") if s.strip()]:
        print(f"== {name}: {args.prompts} x {args.tokens} tokens, {args.dtype}, {args.attn}", flush=True)
        r = run_preset(name, args, device)
        gc.collect()  # the preset's model goes with run_preset's frame
        if common.is_cuda(device):
            torch.cuda.empty_cache()
        data["results"].append(r)
        print(
            f"   full {r['full_ms']:.1f} ms  yoco {r['yoco_ms']:.1f} ms  speedup {r['speedup']:.2f}x"
            + (f"  (hf builtin {r['speedup_hf_builtin']:.2f}x)" if "speedup_hf_builtin" in r else "")
            + f"  logits {'ok' if r['correct'] else 'FAIL'}",
            flush=True,
        )
        common.write_json(out, data)
    print(summary_table(data["results"]))
    print("reference:", "; ".join(f"{r['preset']}: {r['logits']['reference']}" for r in data["results"]))
    data["all_correct"] = all(r["correct"] for r in data["results"])
    common.write_json(out, data)
    return 0 if data["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())

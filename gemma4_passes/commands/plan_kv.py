"""``gemma4-passes plan-kv``: the full / SWA KV pool split for a preset, a budget and a workload,
and the ``--swa-full-tokens-ratio`` that makes SGLang allocate it (see ``gemma4_passes.runtime.swa``)."""

from __future__ import annotations

import json
from typing import Any

DEFAULT_PRESET = "e4b"
KV_DTYPES = ("bf16", "fp16", "fp32", "fp8_e4m3", "fp8_e5m2")


def add_parser(sub: Any, common: Any) -> None:
    """Add the ``plan-kv`` subcommand to the ``gemma4-passes`` parser."""
    p = sub.add_parser(
        "plan-kv",
        help="full vs SWA KV pool sizes (and SGLang's swa_full_tokens_ratio) that admit the most requests",
    )
    common(p, f"a preset name (default {DEFAULT_PRESET})")
    p.add_argument("--budget", required=True, help="KV memory per GPU, e.g. 40GiB, 12.5GB, 4e10")
    p.add_argument("--requests", type=int, default=64, help="concurrent requests wanted (default 64)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per request, prompt + output (default 8192)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, help="KV cache dtype (default: --dtype, else bf16)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (KV heads split across ranks)")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--disable-overlap-schedule", action="store_true", help="one prefill chunk in flight, not two")
    p.add_argument("--speculative-num-draft-tokens", type=int, default=1)
    p.add_argument("--count-kv-shared", action="store_true",
                   help="price KV-shared layers as SGLang 0.5.23 allocates them (without the plugin's reclaim)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _model(args: Any) -> tuple[Any, str]:
    from .. import presets

    if args.checkpoint:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(args.checkpoint, local_files_only=True), str(args.checkpoint)
    p = presets.resolve(args.preset or DEFAULT_PRESET)
    if args.layers:
        p = presets.layer_slice(p, args.layers)
    return p, p.name


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_table(plan: Any, label: str, kv_dtype: str) -> str:
    """The plan as a small markdown table."""
    d, n = plan.sglang_default, plan.needs
    shared = f", {plan.kv_shared_layers} KV-shared layers own none" if plan.kv_shared_layers else ""
    rows = [
        ("preset", label),
        ("KV dtype / TP", f"{kv_dtype} / {plan.tp_size}"),
        ("KV budget per GPU", f"{plan.budget_bytes} B ({_gib(plan.budget_bytes)})"),
        ("workload", f"{plan.requests} requests x {plan.tokens_per_request} tokens"),
        ("bytes/token, full pool", f"{plan.full_bytes_per_token} ({plan.full_kv_layers} layers{shared})"),
        ("bytes/token, SWA pool", f"{plan.swa_bytes_per_token} ({plan.swa_kv_layers} layers)"),
        ("tokens per request (full, SWA)", f"{n.full_per_request}, {n.swa_per_request} (+{n.swa_reserve} SWA for "
                                      f"prefill chunks in flight)"),
        ("full pool tokens", f"{plan.full_tokens}"),
        ("SWA pool tokens", f"{plan.swa_tokens}"),
        ("requests admitted", f"{plan.admitted} of {plan.requests} (the pools hold {plan.planned.holds})"),
        ("binding pool", plan.binding),
        ("--swa-full-tokens-ratio", f"{plan.swa_full_tokens_ratio}"),
        (f"SGLang default ({d.ratio})", f"full {d.full_tokens} / SWA {d.swa_tokens} tokens: admits "
                                        f"{plan.default_admitted} (holds {d.holds}, binding {d.binding})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| | |", "|---|---|"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def run(args: Any) -> int:
    """Print the plan (table or JSON); errors raise ValueError, which the CLI prints."""
    from ..runtime.swa import SglangSchedule, plan_swa_pools

    model, label = _model(args)
    kv_dtype = args.kv_dtype or (args.dtype if args.dtype in KV_DTYPES else None) or {
        "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(args.dtype or "", "bf16")
    schedule = SglangSchedule(
        page_size=args.page_size,
        chunked_prefill_size=args.chunked_prefill_size,
        draft_tokens=args.speculative_num_draft_tokens,
        chunks_in_flight=1 if args.disable_overlap_schedule else 2,
    )
    plan = plan_swa_pools(
        model,
        budget_bytes=args.budget,
        requests=args.requests,
        tokens_per_request=args.tokens,
        dtype=kv_dtype,
        tp_size=args.tp,
        schedule=schedule,
        include_kv_shared=args.count_kv_shared,
    )
    if args.json:
        print(json.dumps(dict(plan.as_dict(), preset=label, kv_dtype=kv_dtype), indent=2))
    else:
        print(format_table(plan, label, kv_dtype))
    return 0

"""Eager vs Inductor vs Inductor + passes on one model and one input.

Each mode runs the same greedy decode and records the first step's logits, the
greedy token of every step and step times. Every step runs the model without a KV cache
on a window of the latest ``prompt_len`` tokens, so every step has the same
shape: one compile per mode, and every mode decodes by the same recipe. Eager decodes freely; the
compiled modes are fed eager's tokens (teacher forcing) and their own greedy choice is recorded at
each step, so one flipped token does not change every later context: token agreement counts the
steps whose argmax matches eager's on the same context (free-running agreement on a small random
bf16 model is mostly the step of the first flip, and swings 9-81% with the seed for Inductor
alone). Parity is then judged as the project defines it:

* fp32: the passes' logits within 1e-4 relative error of eager, same tokens;
* bf16/fp16: fusion changes rounding and plain Inductor already drifts from
  eager, so the passes are judged against Inductor alone on the same input:
  error vs eager at most 1.5x Inductor's, token agreement no lower.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import manager, report

MODES = ("eager", "inductor", "passes")
FP32_REL_TOL = 1e-4
LOW_PRECISION_RATIO = 1.5


@dataclass
class ModeRun:
    mode: str
    logits: torch.Tensor  # first step, [batch, seq, vocab], fp32 on CPU
    tokens: torch.Tensor  # [batch, steps]
    step_s: list = field(default_factory=list)
    first_call_s: float = 0.0  # compile + run of the first step
    matches: dict = field(default_factory=dict)


@dataclass
class Comparison:
    mode: str
    max_abs: float
    rel: float  # max |a - eager| / max |eager|
    token_agreement: float


@contextlib.contextmanager
def inductor_slot(pass_, disable_caches: bool = True):
    """Put exactly ``pass_`` (or nothing) in the pre slot for the block.  Caches are off by default
    so every pass runs (and counts its matches); Inductor's caches key on the pass's uuid, so
    leaving them on is safe, only the counts then miss cache hits."""
    import torch._inductor.config as cfg

    prev_pass, prev_cache = cfg.post_grad_custom_pre_pass, cfg.force_disable_caches
    cfg.post_grad_custom_pre_pass = pass_
    cfg.force_disable_caches = disable_caches
    try:
        yield
    finally:
        cfg.post_grad_custom_pre_pass = prev_pass
        cfg.force_disable_caches = prev_cache


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def greedy(fn: Callable, input_ids: torch.Tensor, steps: int, forced: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor, list, float]:
    """(first logits, greedy token per step [batch, steps], step times, first call s).  With
    ``forced`` ([batch, steps]) the next input token is ``forced``'s, not the model's own choice."""
    ids = input_ids
    chosen = []
    window = input_ids.shape[1]
    first_logits, times, first_call = None, [], 0.0
    for step in range(steps):
        sync_device(ids.device)
        t0 = time.perf_counter()
        logits = fn(ids[:, -window:].contiguous())
        sync_device(ids.device)
        dt = time.perf_counter() - t0
        if step == 0:
            first_logits, first_call = logits.float().cpu(), dt
        else:
            times.append(dt)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        chosen.append(nxt.cpu())
        if forced is not None:
            nxt = forced[:, step:step + 1].to(ids.device)
        ids = torch.cat([ids, nxt], dim=1)
    return first_logits, torch.cat(chosen, dim=1), times, first_call


def run_mode(model, mode: str, input_ids: torch.Tensor, steps: int, fusions: Iterable[str] | None = None,
             forced: torch.Tensor | None = None) -> ModeRun:
    """One mode's greedy run (``forced``: the tokens to feed, see the module doc)."""

    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits

    with torch.no_grad():
        if mode == "eager":
            logits, tokens, times, first = greedy(forward, input_ids, steps)
            return ModeRun(mode, logits, tokens, times, first)
        torch._dynamo.reset()
        pass_ = manager.build_pass(fusions) if mode == "passes" else None
        report.reset_match_report()
        with inductor_slot(pass_):
            compiled = torch.compile(forward)
            logits, tokens, times, first = greedy(compiled, input_ids, steps, forced)
        matches = report.match_report() if mode == "passes" else {}
        torch._dynamo.reset()
        return ModeRun(mode, logits, tokens, times, first, matches)


def compare(runs: dict[str, ModeRun]) -> dict[str, Comparison]:
    ref = runs["eager"]
    scale = ref.logits.abs().max().item() or 1.0
    out = {}
    for mode, r in runs.items():
        if mode == "eager":
            continue
        err = (r.logits - ref.logits).abs().max().item()
        agree = (r.tokens == ref.tokens).float().mean().item()
        out[mode] = Comparison(mode, err, err / scale, agree)
    return out


def verdict(cmp: dict[str, Comparison], dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, reason) for the passes under the project's parity definition."""
    p = cmp["passes"]
    if dtype == torch.float32:
        ok = p.rel <= FP32_REL_TOL and p.token_agreement == 1.0
        return ok, f"fp32: rel err {p.rel:.2e} (<= {FP32_REL_TOL:g}), tokens agreed {p.token_agreement:.0%}"
    i = cmp["inductor"]
    ok = p.max_abs <= LOW_PRECISION_RATIO * i.max_abs + 1e-6 and p.token_agreement >= i.token_agreement
    return ok, (
        f"{str(dtype).removeprefix('torch.')}: passes err {p.max_abs:.3g} vs Inductor alone {i.max_abs:.3g} "
        f"(<= {LOW_PRECISION_RATIO}x), tokens agreed {p.token_agreement:.0%} vs {i.token_agreement:.0%}"
    )


def run_all(model, input_ids, steps, fusions=None, modes=MODES, progress: Callable[[str], None] | None = None):
    runs = {}
    for mode in modes:
        if progress:
            progress(mode)
        forced = runs["eager"].tokens if mode != "eager" and "eager" in runs else None
        runs[mode] = run_mode(model, mode, input_ids, steps, fusions, forced)
    return runs

"""Whole decode and prefill steps of a Gemma-4 model over the paged KV cache, in four modes.

Modes (each compiled fresh, same weights, same requests):

* ``eager``: the transformers model as is;
* ``inductor``: ``torch.compile`` with Inductor alone (no passes; the paged attention op is an
  extern call inside the one graph);
* ``piecewise``: the graph split at attention, every other piece compiled by Inductor and
  replayed from CUDA graphs per batch bucket (:func:`gemma4_passes.runtime.piecewise_backend` with
  no fusions), attention eager between pieces;
* ``passes_piecewise``: the same with the package's passes in every piece.

Per mode: decode step time at each batch size (requests prefilled first), prefill time at each
token count (one request), kernels per step (CUDA profiler), and greedy tokens over a run of decode
steps from the same prompts, judged as the project defines parity: fp32 within 1e-4 of eager with
the same tokens; bf16/fp16 no worse than Inductor alone (error vs eager at most 1.5x Inductor's,
token agreement with eager no lower).  Random-weight models are flat, so the LM head is scaled
(``lm_head_scale``, default 4) to make greedy tokens mean something.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .parity import inductor_slot, sync_device

log = logging.getLogger("gemma4_passes")

MODES = ("eager", "inductor", "piecewise", "passes_piecewise")
DECODE_BATCHES = (1, 8, 32, 128)
PREFILL_TOKENS = (512, 2048, 8192)
FP32_REL_TOL = 1e-4
LOW_PRECISION_RATIO = 1.5


@dataclass
class BenchConfig:
    preset: str
    layers: int | None = None
    dtype: torch.dtype = torch.bfloat16
    device: str = "cuda"
    modes: Sequence[str] = MODES
    decode_batches: Sequence[int] = DECODE_BATCHES
    prefill_tokens: Sequence[int] = PREFILL_TOKENS
    prompt_len: int = 32  # tokens prefilled per request before the timed decode steps
    decode_steps: int = 16  # timed decode steps per batch size
    warmup_steps: int = 3
    parity_batch: int = 8
    parity_steps: int = 64
    prefill_repeats: int = 3
    lm_head_scale: float = 4.0
    seed: int = 0
    vocab_size: int | None = None  # override the preset's (smaller LM head for CPU runs)
    fusions: Sequence[str] | None = None  # passes for passes_piecewise (None: the defaults)
    count_kernels: bool = True
    disable_caches: bool = False  # True: exact match counts, slower compiles
    emulate_capture: bool = False  # CPU: run the capture/replay/guard path with EmulatedCapture


@dataclass
class ModeResult:
    mode: str
    decode_ms: dict = field(default_factory=dict)  # batch -> median ms per step
    prefill_ms: dict = field(default_factory=dict)  # tokens -> median ms
    kernels_per_decode_step: dict = field(default_factory=dict)  # batch -> CUDA kernels
    tokens: list = field(default_factory=list)  # parity run: [steps][batch]
    first_logits: torch.Tensor | None = None
    matches: dict = field(default_factory=dict)
    captures: int = 0
    guard_rejections: list = field(default_factory=list)
    compile_s: float = 0.0
    graphs: int = 0  # Dynamo graphs compiled for this mode (recompiles included)


def build_bench_model(cfg: BenchConfig):
    from . import models, presets

    p = presets.resolve(cfg.preset)
    if cfg.layers:
        p = presets.layer_slice(p, cfg.layers)
    if cfg.vocab_size:
        import dataclasses

        p = dataclasses.replace(p, vocab_size=cfg.vocab_size, vocab_size_per_layer_input=cfg.vocab_size)
    on_cuda = torch.device(cfg.device).type == "cuda"
    model = models.build_model(p, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed,
                               lm_head_scale=cfg.lm_head_scale, init_device=None if on_cuda else "cpu")
    return model, p


def make_forward(model, mode: str, cfg: BenchConfig):
    """(forward callable, piecewise backend or None) for one mode."""
    from .runtime import EmulatedCapture, piecewise_backend

    if mode == "eager":
        return model, None
    if mode == "inductor":
        return _token_dynamic(torch.compile(model)), None
    if mode in ("piecewise", "passes_piecewise"):
        fusions = [] if mode == "piecewise" else cfg.fusions
        backend = (piecewise_backend(fusions, cudagraphs=True, capturer=EmulatedCapture())
                   if cfg.emulate_capture else piecewise_backend(fusions))
        return _token_dynamic(torch.compile(model, backend=backend)), backend
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def _token_dynamic(compiled):
    """Mark the token and request counts dynamic up front (one graph for every batch).  Not ``dynamic=True``: that would also lift
    the modules' float attributes (eps) into symbolic graph inputs."""

    def forward(**kw):
        torch._dynamo.maybe_mark_dynamic(kw["input_ids"], 1)
        torch._dynamo.maybe_mark_dynamic(kw["position_ids"], 1)
        meta = kw["paged_batch"]
        for slots in meta.slot_mapping.values():
            torch._dynamo.maybe_mark_dynamic(slots, 0)
        # the request count too, so decode batches share one graph (B=1 still specializes)
        for t in (kw["logits_to_keep"], meta.query_start_loc, meta.seq_lens, *meta.page_table.values()):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(**kw)

    return forward


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


def _shared_cache(model, cfg: BenchConfig):
    """One cache for every scenario of a mode (they run one after the other and release their
    requests), so the pools keep their shapes and the compiled graphs are reused, not recompiled.
    Page tables are built at a fixed width for the same reason."""
    from .runtime.paged_cache import PagedKVCache

    page = 16
    decode_len = cfg.prompt_len + max(cfg.parity_steps, cfg.warmup_steps + cfg.decode_steps + 1) + 2
    batches = [cfg.parity_batch, *cfg.decode_batches]
    longest = max([decode_len, *cfg.prefill_tokens])
    pages_per_request = -(-longest // page) + 1
    tokens = max([b * decode_len for b in batches] + [n + 1 for n in cfg.prefill_tokens])
    pages = -(-tokens // page) + 2 * max(batches)  # + page rounding per request
    return PagedKVCache(model, num_full_pages=pages, num_sliding_pages=pages, page_size=page,
                        max_pages_per_request=pages_per_request)


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _count_kernels(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if not n.startswith(("Memcpy", "Memset")))


def run_mode(model, mode: str, cfg: BenchConfig, vocab: int) -> ModeResult:
    from . import report
    from .runtime.paged_runner import PagedGemma4Runner

    res = ModeResult(mode)
    torch._dynamo.reset()
    # every graph compiled for this mode is counted (a recompile per shape shows up here, not as
    # a silent fall back to eager at Dynamo's recompile limit)
    torch._dynamo.config.recompile_limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), 64)
    graphs_before = _graphs_compiled()
    report.reset_match_report()
    forward, backend = make_forward(model, mode, cfg)
    # parity run first: it also compiles (prefill graph, then the decode graph)
    runner = PagedGemma4Runner(model, _shared_cache(model, cfg), forward=forward)
    t0 = time.perf_counter()
    logits = runner.prefill(_prompts(cfg.parity_batch, cfg.prompt_len, vocab, cfg.seed))
    sync_device(cfg.device)
    res.compile_s = time.perf_counter() - t0
    for step in range(cfg.parity_steps):
        tok = logits.argmax(-1)
        res.tokens.append(tok.tolist())
        logits = runner.decode(tok.tolist())
        if step == 0:
            res.first_logits = logits.float().cpu()
    for rid in list(runner.request_ids):
        runner.release(rid)

    for b in cfg.decode_batches:
        logits = runner.prefill(_prompts(b, cfg.prompt_len, vocab, cfg.seed + b))
        times = []
        for step in range(cfg.warmup_steps + cfg.decode_steps):
            toks = logits.argmax(-1).tolist()
            sync_device(cfg.device)
            t = time.perf_counter()
            logits = runner.decode(toks)
            sync_device(cfg.device)
            if step >= cfg.warmup_steps:
                times.append((time.perf_counter() - t) * 1e3)
        res.decode_ms[b] = statistics.median(times)
        if cfg.count_kernels and torch.device(cfg.device).type == "cuda":
            toks = logits.argmax(-1).tolist()
            res.kernels_per_decode_step[b] = _count_kernels(lambda: runner.decode(toks))
        for rid in list(runner.request_ids):
            runner.release(rid)

    for n in cfg.prefill_tokens:
        times = []
        for rep in range(cfg.prefill_repeats + 1):
            prompt = _prompts(1, n, vocab, cfg.seed + n + rep)
            sync_device(cfg.device)
            t = time.perf_counter()
            runner.prefill(prompt)
            sync_device(cfg.device)
            if rep:  # the first one compiles/warms up
                times.append((time.perf_counter() - t) * 1e3)
            runner.release(runner.request_ids[0])
        res.prefill_ms[n] = statistics.median(times)

    res.matches = dict(report.match_report())
    res.graphs = _graphs_compiled() - graphs_before
    if backend is not None and backend.capture is not None:
        res.captures = backend.capture.captures
        res.guard_rejections = list(backend.capture.rejected)
    return res


@dataclass
class ParityRow:
    mode: str
    rel_err_vs_eager: float
    token_agreement: float
    ok: bool
    rule: str


def judge(results: dict[str, ModeResult], dtype: torch.dtype) -> list[ParityRow]:
    """Parity of every mode against eager, by the project's rule (see the module doc)."""
    eager = results.get("eager")
    if eager is None:
        return []
    ref = eager.first_logits
    ref_tokens = torch.tensor(eager.tokens)
    scale = float(ref.abs().max()) or 1.0

    def stats(r: ModeResult) -> tuple[float, float]:
        err = float((r.first_logits - ref).abs().max()) / scale
        agree = float((torch.tensor(r.tokens) == ref_tokens).float().mean())
        return err, agree

    rows = []
    base = stats(results["inductor"]) if "inductor" in results else None
    for mode, r in results.items():
        if mode == "eager":
            continue
        err, agree = stats(r)
        if dtype == torch.float32:
            ok, rule = err <= FP32_REL_TOL and agree == 1.0, f"fp32: err <= {FP32_REL_TOL}, same tokens"
        elif mode == "inductor" or base is None:
            ok, rule = True, "the baseline for low precision"
        else:
            ok = err <= LOW_PRECISION_RATIO * base[0] + 1e-6 and agree >= base[1]
            rule = f"err <= {LOW_PRECISION_RATIO} x inductor's {base[0]:.3g}, agreement >= {base[1]:.3f}"
        rows.append(ParityRow(mode, err, agree, ok, rule))
    return rows


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every mode of ``cfg``; a JSON-ready dict."""
    model, preset = build_bench_model(cfg)
    vocab = preset.vocab_size
    results = {}
    # no globally installed pass: the inductor mode is Inductor alone; each piecewise backend
    # brings its own passes
    with inductor_slot(None, disable_caches=cfg.disable_caches):
        for mode in cfg.modes:
            if progress:
                progress(mode)
            results[mode] = run_mode(model, mode, cfg, vocab)
    parity = judge(results, cfg.dtype)
    out = {
        "preset": preset.name,
        "layers": preset.num_hidden_layers,
        "dtype": str(cfg.dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name() if torch.device(cfg.device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "lm_head_scale": cfg.lm_head_scale,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("dtype",)},
        "modes": {},
        "parity": [asdict(r) for r in parity],
        "parity_ok": all(r.ok for r in parity),
    }
    for mode, r in results.items():
        d = asdict(r)
        d.pop("first_logits")
        d.pop("tokens")
        out["modes"][mode] = d
    return out


def format_table(out: dict) -> str:
    """A markdown summary of :func:`run_bench`'s result."""
    modes = list(out["modes"])
    lines = [f"## {out['preset']} ({out['layers']} layers, {out['dtype']}, {out['device']}, torch {out['torch']})",
             "", "| step | " + " | ".join(modes) + " | passes+pw vs pw |", "|---|" + "---:|" * (len(modes) + 1)]

    def row(label, key, sub):
        vals = [out["modes"][m][key].get(sub) for m in modes]
        pw, ppw = out["modes"].get("piecewise", {}).get(key, {}).get(sub), \
            out["modes"].get("passes_piecewise", {}).get(key, {}).get(sub)
        ratio = f"{pw / ppw:.2f}x" if pw and ppw else ""
        cells = [f"{v:.2f} ms" if isinstance(v, float) else str(v) for v in vals]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")

    for b in out["config"]["decode_batches"]:
        row(f"decode B={b}", "decode_ms", b)
    for n in out["config"]["prefill_tokens"]:
        row(f"prefill {n}", "prefill_ms", n)
    lines.append("| graphs compiled | " + " | ".join(str(out["modes"][m]["graphs"]) for m in modes) + " | |")
    for b in out["config"]["decode_batches"]:
        if any(b in out["modes"][m]["kernels_per_decode_step"] for m in modes):
            vals = [out["modes"][m]["kernels_per_decode_step"].get(b, "") for m in modes]
            lines.append(f"| kernels/step B={b} | " + " | ".join(map(str, vals)) + " | |")
    lines += ["", "| mode | rel err vs eager | token agreement | parity | rule |", "|---|---:|---:|---|---|"]
    for p in out["parity"]:
        lines.append(f"| {p['mode']} | {p['rel_err_vs_eager']:.3g} | {p['token_agreement']:.3f} | "
                     f"{'ok' if p['ok'] else 'FAIL'} | {p['rule']} |")
    for mode in modes:
        m = out["modes"][mode]
        if m["captures"] or m["guard_rejections"]:
            lines.append(f"\n{mode}: {m['captures']} captures, parity guard rejections: "
                         f"{m['guard_rejections'] or 'none'}")
    return "\n".join(lines)


def write_json(out: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)

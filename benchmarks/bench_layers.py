"""Decoder-layer slices of each published Gemma-4 preset: Inductor alone vs Inductor + gemma4_passes.

    PYTHONPATH=. python benchmarks/bench_layers.py                            # all presets (CUDA)
    PYTHONPATH=. python benchmarks/bench_layers.py --presets 31b --tokens 1,512
    PYTHONPATH=. python benchmarks/bench_layers.py --smoke --device cpu

For each preset (e2b, e4b, 26b-a4b, 31b) a few layers at the published dims (``layer_slice``: the
layer-type pattern cut short, keeping sliding + full layers and, for E2B/E4B, KV-shared layers with
their producers), random weights from ``gemma4_passes.models.build_model``, bf16, sdpa attention.
What is compiled and timed is the truncated text model ``model.model`` (embedding, every layer,
final norm; no LM head) called as ``model.model(input_ids=ids, use_cache=False)``: one graph holds
consecutive layers, so the fusions that reach into the next layer's input norm (ffn_tail,
ple_tail) can match, as in a whole model.

Variants, each ``torch.compile(fullgraph=True, dynamic=False)`` (one compile per token count):
  * inductor : Inductor alone (``post_grad_custom_pre_pass=None``)
  * passes   : Inductor + the gemma4_passes pass (``gemma4_passes.build_pass()``)
  * eager    : the model uncompiled (the parity reference; timed with plain calls, no graph)
Inductor's caches are forced off so that the passes run on every compile.

CUDA graphs: the compiled callable is captured by hand (``torch.cuda.graph`` around one call after
two warm-up calls on a side stream) and replayed. With ``fullgraph=True`` and no KV cache the whole
call is one Inductor graph with no host syncs, so manual capture works and times exactly the
kernels; ``mode="reduce-overhead"`` would add cudagraph-tree bookkeeping and a second set of
recompiles. If capture fails, plain calls are timed with CUDA events and the method column says so.

Reported per preset and token count T (tokens = batch 1 x sequence T; T=1/8/32 decode-sized,
T=512 prefill): microseconds per layer (graph replay of the whole slice / number of layers),
kernels per layer (torch.profiler over one plain call / layers; ``non-GEMM`` excludes cuBLAS/
CUTLASS/nvjet GEMMs), the speedup of passes over Inductor alone, and parity: max |hidden - eager|
and max |logits - eager| (logits = soft-capped LM head of each variant's hidden, computed eagerly),
also vs an fp32 eager copy of the model. Parity passes when the passes' error vs eager is at most
1.5x Inductor's own (bf16; ``gemma4_passes.parity``'s rule). Also ``gemma4_passes.match_report()``
per preset next to ``gemma4_passes.expected.expected_matches``.

Writes ``$OUT/bench_layers.json`` (after every preset, so a cut run keeps what finished).
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

DEFAULT_PRESETS = ("e4b", "31b", "e2b", "26b-a4b")  # run order (a budget cut drops the last)
DEFAULT_LAYERS = {"e2b": 4, "e4b": 4, "26b-a4b": 2, "31b": 2}
DEFAULT_TOKENS = (1, 8, 32, 512)
T_PRIORITY = (1, 512, 32, 8)
SMOKE_LAYERS = {"e2b": 4, "e4b": 4, "26b-a4b": 2, "31b": 2}

# known, harmless, and repeated at every compile: keep the log readable
warnings.filterwarnings("ignore", message=".*dynamo_pgo force disabled.*")
warnings.filterwarnings("ignore", message=".*Dynamo detected a call to a `functools.lru_cache`-wrapped function.*")

try:
    from gemma4_passes.parity import LOW_PRECISION_RATIO as RATIO
except Exception:  # noqa: BLE001
    RATIO = 1.5


@dataclass
class VariantResult:
    us_per_layer: float | None = None
    us_total: float | None = None
    spread: float | None = None
    method: str = ""
    compile_s: float | None = None
    fullgraph: bool | None = None
    kernels_per_layer: float | None = None
    non_gemm_per_layer: float | None = None
    kernels_total: dict | None = None
    hidden_err: float | None = None  # max |hidden - eager hidden|
    logit_err: float | None = None
    hidden_rel_l2: float | None = None  # ||hidden - eager|| / ||eager|| (a steadier statistic than the max)
    hidden_err_fp32: float | None = None  # vs the fp32 eager model
    logit_err_fp32: float | None = None
    argmax_agree: float | None = None  # share of positions whose argmax token equals eager's
    matches: dict | None = None
    error: str | None = None


@dataclass
class ShapeResult:
    tokens: int
    variants: dict = field(default_factory=dict)  # name -> VariantResult
    parity_ok: bool | None = None
    parity_note: str = ""
    expected: dict | None = None  # expected matches for this token count (shape-gated fusions)
    hidden_ulp: float = 0.0  # bf16 ulp at max |eager hidden| (the parity floor)
    logit_ulp: float = 0.0
    seconds: float = 0.0


@dataclass
class PresetResult:
    preset: str
    sliced: str
    layers: int
    layer_types: list
    kv_shared: list
    moe: bool
    expected_matches: dict | None = None
    shapes: list = field(default_factory=list)
    skipped_tokens: list = field(default_factory=list)
    error: str | None = None
    build_s: float = 0.0
    seconds: float = 0.0


def parse_layers(spec: str | None, smoke: bool) -> dict:
    out = dict(SMOKE_LAYERS if smoke else DEFAULT_LAYERS)
    if spec:
        for item in spec.split(","):
            k, v = item.split("=")
            out[k.strip()] = int(v)
    return out


def softcap_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """``Gemma4ForCausalLM``'s logits for a hidden state (LM head, then the final soft-cap)."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def compile_text_model(text, pass_obj, fullgraph=True):
    torch._dynamo.reset()
    return torch.compile(text, fullgraph=fullgraph, dynamic=False, options={"post_grad_custom_pre_pass": pass_obj})


def run_variant(name, text, model, ids, refs, device, n_layers, args) -> VariantResult:
    import gemma4_passes

    vr = VariantResult()
    cuda = common.is_cuda(device)
    graph = None
    try:
        if name == "eager":
            fn = text
            vr.compile_s = 0.0
        else:
            pass_obj = gemma4_passes.build_pass() if name == "passes" else None
            gemma4_passes.reset_match_report()
            t0 = time.perf_counter()
            fn = compile_text_model(text, pass_obj, fullgraph=True)
            vr.fullgraph = True
            try:
                fn(input_ids=ids, use_cache=False)
            except Exception as e:  # noqa: BLE001 - graph breaks: compile again without fullgraph
                vr.fullgraph = False
                vr.method = f"fullgraph failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                gemma4_passes.reset_match_report()
                fn = compile_text_model(text, pass_obj, fullgraph=False)
                fn(input_ids=ids, use_cache=False)
            common.sync(device)
            vr.compile_s = time.perf_counter() - t0
            if name == "passes":
                vr.matches = gemma4_passes.match_report()

        def call():
            return fn(input_ids=ids, use_cache=False).last_hidden_state

        # eager: plain calls (what eager is in practice; HF's eager code is not checked for
        # host syncs, and a failed capture is not worth risking the rest of the run)
        timing, hidden = common.bench(call, device, repeats=args.repeats, target_ms=args.target_ms,
                                      use_graph=name != "eager")
        graph = getattr(timing, "_graph", None)
        vr.us_total = timing.us
        vr.us_per_layer = timing.us / n_layers
        vr.spread = timing.spread
        vr.method += timing.method + (f" ({timing.note})" if timing.note else "")
        # parity: the replayed graph's output (graph replay rewrote it for these ids)
        hidden = hidden.clone()
        del timing
        vr.hidden_err = _err(hidden, refs["hidden"])
        vr.hidden_rel_l2 = common.rel_l2(hidden, refs["hidden"])
        logits = softcap_logits(model, hidden)
        vr.logit_err = _err(logits, refs["logits"])
        vr.argmax_agree = float((logits.argmax(-1) == refs["logits"].argmax(-1)).float().mean())
        if "hidden32" in refs:
            vr.hidden_err_fp32 = _err(hidden, refs["hidden32"])
            vr.logit_err_fp32 = _err(logits, refs["logits32"])
        del logits
        if cuda:
            kc = common.count_kernels(call, device)
            if kc and "error" not in kc:
                vr.kernels_total = {k: v for k, v in kc.items() if k != "names"}
                vr.kernels_total["names"] = kc["names"]
                vr.kernels_per_layer = kc["total"] / n_layers
                vr.non_gemm_per_layer = kc["non_gemm"] / n_layers
            elif kc:
                vr.kernels_total = kc
        del fn
    except Exception as e:  # noqa: BLE001
        vr.error = f"{type(e).__name__}: {str(e)[:500]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        del graph
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return vr


def judge(shape: ShapeResult) -> None:
    ind, pas = shape.variants.get("inductor"), shape.variants.get("passes")
    if not ind or not pas or ind.hidden_err is None or pas.hidden_err is None:
        shape.parity_ok = None
        shape.parity_note = "n/a"
        return
    # errors are multiples of bf16 ulps: an error of one ulp at the output's largest magnitude is
    # never "worse" (otherwise 1 ulp vs 0.5 ulp elsewhere flips the verdict)
    ok_h = pas.hidden_err <= max(RATIO * ind.hidden_err, shape.hidden_ulp)
    ok_l = pas.logit_err <= max(RATIO * ind.logit_err, shape.logit_ulp)
    shape.parity_ok = ok_h and ok_l
    shape.parity_note = "ok" if shape.parity_ok else (
        f"WORSE: hidden {pas.hidden_err:.3g} vs {ind.hidden_err:.3g}, logits {pas.logit_err:.3g} vs {ind.logit_err:.3g}"
    )


def bench_preset(name: str, args, device, budget: common.Budget, share_s: float, first_cost_est: float,
                 on_progress=None) -> PresetResult:
    from gemma4_passes.expected import expected_matches
    from gemma4_passes.models import build_model, describe, to_hf_config
    from gemma4_passes.presets import layer_slice, resolve, tiny

    t_preset = time.perf_counter()
    parent = tiny(name) if args.smoke else resolve(name)
    n_layers = args.layers_map.get(name, 2)
    p = layer_slice(parent, n_layers)
    facts = describe(p)
    pr = PresetResult(
        preset=name, sliced=p.name, layers=n_layers, layer_types=list(p.layer_types),
        kv_shared=[layer["kv_shared"] for layer in facts["layers"]], moe=bool(p.enable_moe_block),
    )
    # the config names the experts implementation: moe_dispatch matches only transformers' grouped_mm
    counted = to_hf_config(p, experts_implementation=args.experts_impl) if p.enable_moe_block else p
    try:
        pr.expected_matches = expected_matches(counted)
    except Exception as e:  # noqa: BLE001
        pr.expected_matches = {"error": str(e)[:200]}
    cuda = common.is_cuda(device)
    model = model32 = None
    try:
        tb = time.perf_counter()
        kw = {}
        if p.enable_moe_block:
            kw["experts_implementation"] = args.experts_impl
        model = build_model(p, dtype=torch.bfloat16, device=device, seed=args.seed,
                            init_device=None if cuda else "cpu", **kw)
        if args.fp32_ref:
            model32 = copy.deepcopy(model).float()
        pr.build_s = time.perf_counter() - tb
        vocab = p.vocab_size
        gen = torch.Generator(device="cpu").manual_seed(args.seed + 17)
        last_cost = None
        for T in args.tokens:
            used = time.perf_counter() - t_preset
            est = last_cost if last_cost is not None else first_cost_est
            if (last_cost is not None and used + est > share_s) or not budget.allows(est):
                pr.skipped_tokens.append(T)
                print(f"  [{name}] T={T}: skipped (budget: {used:.0f}s used of {share_s:.0f}s, next ~{est:.0f}s)", flush=True)
                continue
            t_shape = time.perf_counter()
            sr = ShapeResult(tokens=T)
            try:
                sr.expected = expected_matches(counted, rows=T)
            except Exception:  # noqa: BLE001
                sr.expected = None
            ids = torch.randint(0, vocab, (1, T), generator=gen).to(device)
            with torch.inference_mode():
                refs = {}
                refs["hidden"] = model.model(input_ids=ids, use_cache=False).last_hidden_state.clone()
                refs["logits"] = softcap_logits(model, refs["hidden"])
                sr.hidden_ulp = float(common.ulp_of(refs["hidden"].abs().max().reshape(1), torch.bfloat16)[0])
                sr.logit_ulp = float(common.ulp_of(refs["logits"].abs().max().reshape(1), torch.bfloat16)[0])
                if model32 is not None:
                    refs["hidden32"] = model32.model(input_ids=ids, use_cache=False).last_hidden_state
                    refs["logits32"] = softcap_logits(model32, refs["hidden32"])
                for variant in ("inductor", "passes", "eager"):
                    if variant == "eager" and args.no_eager_timing:
                        continue
                    vr = run_variant(variant, model.model, model, ids, refs, device, n_layers, args)
                    sr.variants[variant] = vr
                    msg = vr.error or (
                        f"{common.fmt_us(vr.us_per_layer)} us/layer ({vr.method}), kernels/layer "
                        f"{'-' if vr.kernels_per_layer is None else f'{vr.kernels_per_layer:.1f}'}, hidden err "
                        f"{vr.hidden_err:.3g} (rel L2 {vr.hidden_rel_l2:.2e}), logit err {vr.logit_err:.3g}"
                        + (f", compile {vr.compile_s:.1f}s" if vr.compile_s else "")
                        + (f", matches {vr.matches}" if vr.matches is not None else ""))
                    print(f"  [{name} L={n_layers} T={T}] {variant}: {msg}", flush=True)
                del refs
            judge(sr)
            sr.seconds = time.perf_counter() - t_shape
            last_cost = sr.seconds
            pr.shapes.append(sr)
            if on_progress is not None:
                on_progress(pr)
    except Exception as e:  # noqa: BLE001
        pr.error = f"{type(e).__name__}: {str(e)[:500]}"
        print(f"  [{name}] ERROR {pr.error}", flush=True)
        if args.verbose:
            traceback.print_exc()
    finally:
        del model, model32
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    pr.seconds = time.perf_counter() - t_preset
    return pr


HEADERS = ["preset", "layers", "T", "eager us/layer", "inductor us/layer", "+passes us/layer", "speedup",
           "kernels/layer ind -> +passes", "non-GEMM/layer ind -> +passes", "hidden err ind / +passes",
           "logit err ind / +passes", "vs fp32: logit err ind / +passes", "parity"]


def layer_code(pr: PresetResult) -> str:
    """S/F = sliding/full layer; lower case = KV-shared (reads an earlier layer's K/V)."""
    out = ""
    for t, shared in zip(pr.layer_types, pr.kv_shared):
        c = "F" if t.startswith("full") else "S"
        out += c.lower() if shared else c
    return out


def table_rows(results: list[PresetResult]) -> list[list]:
    rows = []

    def g(vr, attr, fmt):
        if vr is None or vr.error or getattr(vr, attr) is None:
            return "-" if vr is None or not vr.error else "ERR"
        return fmt(getattr(vr, attr))

    f1 = lambda v: f"{v:.1f}"  # noqa: E731
    f3 = lambda v: f"{v:.3g}"  # noqa: E731
    for pr in results:
        if pr.error and not pr.shapes:
            rows.append([pr.preset, pr.layers, "-", "ERROR: " + pr.error[:80]] + [""] * (len(HEADERS) - 4))
            continue
        for sr in sorted(pr.shapes, key=lambda s: s.tokens):
            e, i, p = (sr.variants.get(v) for v in ("eager", "inductor", "passes"))
            speed = (i.us_total / p.us_total) if i and p and i.us_total and p.us_total else None
            eager_us = g(e, "us_per_layer", common.fmt_us)
            if e and not e.error and "cuda-events" in e.method:
                eager_us += " (no graph)"
            rows.append([
                pr.preset, f"{pr.layers} ({layer_code(pr)})",
                sr.tokens, eager_us, g(i, "us_per_layer", common.fmt_us), g(p, "us_per_layer", common.fmt_us),
                common.fmt_x(speed),
                f"{g(i, 'kernels_per_layer', f1)} -> {g(p, 'kernels_per_layer', f1)}",
                f"{g(i, 'non_gemm_per_layer', f1)} -> {g(p, 'non_gemm_per_layer', f1)}",
                f"{g(i, 'hidden_err', f3)} / {g(p, 'hidden_err', f3)}",
                f"{g(i, 'logit_err', f3)} / {g(p, 'logit_err', f3)}",
                f"{g(i, 'logit_err_fp32', f3)} / {g(p, 'logit_err_fp32', f3)}",
                sr.parity_note if sr.parity_ok is not False else "WORSE",
            ])
    return rows


def match_rows(results: list[PresetResult]) -> list[list]:
    rows = []
    for pr in results:
        found, exp = None, None
        for sr in pr.shapes:
            vr = sr.variants.get("passes")
            if vr and vr.matches is not None:
                found, exp = vr.matches, sr.expected
                break
        if exp is None:
            exp = pr.expected_matches if isinstance(pr.expected_matches, dict) else {}
        names = list(found or exp)
        cells = []
        ok = found is not None and all(found.get(k, 0) == exp.get(k, 0) for k in set(found) | set(exp) if k != "error")
        for k in names:
            cells.append(f"{k} {found.get(k, 0) if found else '?'}/{exp.get(k, '?')}")
        rows.append([pr.preset, pr.sliced, ", ".join(cells), "ok" if ok else ("?" if found is None else "MISMATCH")])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--presets", default=None, help=f"comma list, run in this order (default {','.join(DEFAULT_PRESETS)})")
    ap.add_argument("--layers", default=None,
                    help="layers per preset, e.g. 'e2b=4,31b=6' (default " + ",".join(f"{k}={v}" for k, v in DEFAULT_LAYERS.items()) + ")")
    ap.add_argument("--tokens", default=None, help=f"comma list (default {','.join(map(str, DEFAULT_TOKENS))}; smoke 1,5)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget: split evenly over the presets; token counts that would overrun are skipped")
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts_implementation for 26B-A4B")
    ap.add_argument("--no-fp32-ref", dest="fp32_ref", action="store_false", help="skip the fp32 eager reference")
    ap.add_argument("--no-eager-timing", action="store_true", help="do not time the eager model (still the parity reference)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; smoke 2)")
    ap.add_argument("--target-ms", type=float, default=None, help="length of one timed repeat (default 20 ms; smoke 1)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.target_ms = args.target_ms or (1.0 if args.smoke else 20.0)
    args.layers_map = parse_layers(args.layers, args.smoke)
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = [1, 5] if args.smoke else list(DEFAULT_TOKENS)
    args.tokens = sorted(tokens, key=lambda t: (T_PRIORITY.index(t) if t in T_PRIORITY else len(T_PRIORITY), t))
    presets = [p.strip() for p in (args.presets.split(",") if args.presets else DEFAULT_PRESETS)]

    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # a cache hit would skip the passes (and their match counts)

    device = common.resolve_device(args.device)
    info = common.env_info(device)
    common.print_env(info)
    common.seed_all(args.seed)
    budget = common.Budget(args.budget_s)
    out_json = common.json_path(args, "bench_layers.json")
    print(f"# presets {presets}, layers {args.layers_map}, tokens {sorted(args.tokens)}, bf16, sdpa, "
          f"{'CUDA-graph replay' if common.is_cuda(device) else 'CPU perf_counter'}; budget {args.budget_s if args.budget_s is not None else 'none'}s", flush=True)

    results: list[PresetResult] = []
    skipped_presets = []
    first_costs: list[float] = []
    for i, name in enumerate(presets):
        share = budget.left() / (len(presets) - i)
        est_first = max(first_costs) if first_costs else 0.0
        if not budget.allows(est_first) or budget.left() <= 0:
            skipped_presets.append(name)
            print(f"[{name}] skipped (budget: {budget.left():.0f}s left, a first shape took ~{est_first:.0f}s)", flush=True)
            continue
        print(f"[{name}] {args.layers_map.get(name, 2)} layers, share {share:.0f}s", flush=True)
        def progress(cur, done=list(results)):
            common.write_json(out_json, dict(env=info, results=done + [cur], skipped_presets=skipped_presets,
                                             partial=True))

        pr = bench_preset(name, args, device, budget, share, est_first, progress)
        if pr.shapes:
            first_costs.append(pr.shapes[0].seconds + pr.build_s)
        results.append(pr)
        print(f"[{name}] done in {pr.seconds:.0f}s (build {pr.build_s:.0f}s)", flush=True)
        common.write_json(out_json, dict(env=info, results=results, skipped_presets=skipped_presets, partial=True))

    rows = table_rows(results)
    md = common.md_table(HEADERS, rows)
    mrows = match_rows(results)
    mmd = common.md_table(["preset", "slice", "matches found/expected", "status"], mrows)
    print()
    print(f"## Decoder-layer slices, bf16, {info.get('gpu', device)}, torch {info['torch']}, transformers "
          f"{info.get('transformers')} ({info['date_utc']}, git {info.get('git')})")
    print()
    print(md)
    print()
    print(mmd)
    print()
    print("us/layer = median CUDA-graph replay time of the whole slice (embedding + layers + final norm) / layers; "
          "speedup = Inductor time / Inductor+passes time; kernels = torch.profiler kernel launches of one call / "
          "layers (non-GEMM excludes cuBLAS/CUTLASS GEMMs); errors = max |x - eager bf16| of the final hidden "
          "state and of the soft-capped logits; parity ok = +passes error <= "
          f"{RATIO}x Inductor's, or <= 1 bf16 ulp of the largest output (hidden and logits); layers: S/F = "
          "sliding/full, lower case = KV-shared.")
    bad_parity = [(pr.preset, sr.tokens) for pr in results for sr in pr.shapes if sr.parity_ok is False]
    errors = [(pr.preset, sr.tokens, v) for pr in results for sr in pr.shapes for v, vr in sr.variants.items() if vr.error]
    errors += [(pr.preset, None, pr.error) for pr in results if pr.error]
    if skipped_presets:
        print(f"SKIPPED presets (budget): {skipped_presets}")
    for pr in results:
        if pr.skipped_tokens:
            print(f"SKIPPED {pr.preset} T={pr.skipped_tokens} (budget)")
    for e in errors:
        print(f"ERROR {e}")
    if bad_parity:
        print(f"PARITY WORSE than {RATIO}x Inductor: {bad_parity}")
    common.write_json(out_json, dict(env=info, results=results, skipped_presets=skipped_presets, partial=False,
                                     markdown=md, matches_markdown=mmd, elapsed_s=budget.elapsed()))
    print(f"done in {budget.elapsed():.0f}s")
    return 1 if errors or bad_parity else 0


if __name__ == "__main__":
    sys.exit(main())

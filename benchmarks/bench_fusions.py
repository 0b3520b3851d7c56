"""Each fusion at Gemma-4's sizes: eager HF math vs Inductor's own fusion of it vs the fused op.

    PYTHONPATH=. python benchmarks/bench_fusions.py                       # full sweep (CUDA)
    PYTHONPATH=. python benchmarks/bench_fusions.py --fusions qkv_norm --tokens 1,8192
    PYTHONPATH=. python benchmarks/bench_fusions.py --smoke --device cpu
    PYTHONPATH=. python benchmarks/bench_fusions.py --fusions moe_dispatch     # T = 1, 8, 64, 512

For every case (fusion x published shape x token count T), bf16, three variants of the same math
run side by side in one process:

  (a) eager  - the unfused HF-form torch code, written out (``Gemma4RMSNorm.forward``'s op order,
               ``residual + h``, ``h *= layer_scalar``, ``F.gelu(approximate="tanh") * x``,
               ``apply_rotary_pos_emb``), one kernel per op;
  (b) inductor - ``torch.compile`` (default mode, static shapes, no gemma4_passes) of that same
               function: what Inductor fuses on its own;
  (c) fused  - the ``torch.ops.gemma4_passes`` op the passes put in its place.

Timing (CUDA): each variant's calls are captured once in a CUDA graph and the graph is replayed
(median of 7 repeats of >= 5 ms each; microseconds per call). Each graph runs the variant on K
distinct input sets in turn (K chosen so that K sets exceed twice the L2 cache, at most 8), so
small cases do not just re-read L2. Kernel counts come from torch.profiler over one plain call.
Bandwidth of (c): the bytes the ideal fused kernel must move (each input read once, each output
written once) over its time, and as a share of the device-to-device copy bandwidth measured at the
start of the run (``copy_`` of a 1 GiB buffer, bytes read + written).

``moe_dispatch`` (26B-A4B: E = 128, k = 8, H = 2816) runs at its own token counts (1, 8, 64, 512
unless ``--tokens`` is given): (a) is the index work of transformers 5.17's grouped_mm experts (the
GPU image's; 5.2x without expert parallelism is the same minus the sentinel-row mask), the GEMMs
left out.  Its outputs are compared in a tie-independent form (see ``dispatch_canon``): torch.sort
may order equal ids otherwise than the fused op's stable sort.

On CPU (``--smoke``) the same code runs with perf_counter timing, no graphs and no kernel counts.
Prints a markdown table (ready for benchmarks/RESULTS.md) and writes ``$OUT/bench_fusions.json``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-6
DTYPE = torch.bfloat16
DEFAULT_TOKENS = (1, 8, 32, 128, 512, 8192)
#: cases run in this order of T, so a budget cut still leaves every fusion its extreme sizes
T_PRIORITY = (1, 8192, 128, 8, 512, 32)
FUSIONS = ("post_attn_norm", "ffn_tail", "ple_tail", "ple_gate", "qkv_norm", "moe_router", "moe_input_norms",
           "moe_branch_combine", "moe_dispatch")
#: decode-sized token counts for the MoE dispatch (the issue's target: T <= 64), and one prefill size
DISPATCH_TOKENS = (1, 8, 64, 512)


# ------------------------------------------------------------------------------------------------
# the HF-form (unfused) math
# ------------------------------------------------------------------------------------------------


def hf_rms(x, w, eps=EPS):
    """``Gemma4RMSNorm.forward`` (transformers 5.x): fp32, pow(-0.5), ``* w`` (not 1 + w), one cast."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        y = y * w.float()
    return y.type_as(x)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)


def post_attn_eager(attn, residual, w_post, w_pre_ff):
    """``h = residual + post_attention_layernorm(attn)``; ``pre_feedforward_layernorm(h)``."""
    h = residual + hf_rms(attn, w_post)
    return hf_rms(h, w_pre_ff), h


def tail_eager(x, residual, w_post, layer_scalar, w_next):
    """``h = residual + norm(x); h *= layer_scalar``; the next layer's ``input_layernorm(h)``."""
    h = residual + hf_rms(x, w_post)
    h = h * layer_scalar
    return hf_rms(h, w_next), h


def ple_gate_eager(gate, per_layer_input):
    """``act_fn(per_layer_input_gate(x)) * per_layer_input`` (the input is a strided slice)."""
    return F.gelu(gate, approximate="tanh") * per_layer_input


def make_qkv_eager(d: int, k_eq_v: bool, q_only: bool):
    def heads(t):
        return t.view(*t.shape[:-1], -1, d)

    if q_only:
        def q_eager(q_lin, qw, cos, sin):
            return apply_rope(hf_rms(heads(q_lin), qw), cos, sin)
        return q_eager

    if k_eq_v:
        def qkv_keqv_eager(q_lin, k_lin, qw, kw, cos, sin):
            q = apply_rope(hf_rms(heads(q_lin), qw), cos, sin)
            k = apply_rope(hf_rms(heads(k_lin), kw), cos, sin)
            v = hf_rms(heads(k_lin), None)  # attention_k_eq_v: v is the raw k projection
            return q, k, v
        return qkv_keqv_eager

    def qkv_eager(q_lin, k_lin, v_lin, qw, kw, cos, sin):
        q = apply_rope(hf_rms(heads(q_lin), qw), cos, sin)
        k = apply_rope(hf_rms(heads(k_lin), kw), cos, sin)
        v = hf_rms(heads(v_lin), None)
        return q, k, v
    return qkv_eager


def router_eager(logits, per_expert_scale, k: int):
    """transformers' Gemma4TextRouter after its projection GEMM."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w * per_expert_scale[ids], ids


def moe_input_eager(attn, residual, w_post, w_pre, w_pre2, router_scale):
    """An MoE layer's post-attention epilogue: the new residual feeds three norms."""
    h = residual + hf_rms(attn, w_post)
    flat = h.reshape(-1, h.shape[-1])
    router_in = hf_rms(flat, None) * router_scale * (h.shape[-1] ** -0.5)
    return h, hf_rms(h, w_pre), hf_rms(flat, w_pre2), router_in


def moe_input_fused(attn, residual, w_post, w_pre, w_pre2, router_scale):
    """The fused op; the experts' and router's outputs viewed [T, H] as transformers reads them."""
    h = attn.shape[-1]
    s, pre, pre2, router_in = _ops().moe_input_norms(attn, residual, w_post, w_pre, w_pre2, router_scale,
                                                     h ** -0.5, EPS, EPS, EPS, EPS)
    return s, pre, pre2.view(-1, h), router_in.view(-1, h)


def moe_combine_eager(h1, h2, residual, w1, w2, w3, layer_scalar, w_next):
    """An MoE layer's end: both branches normed, summed, normed, residual, layer_scalar, next norm."""
    h = hf_rms(h1, w1) + hf_rms(h2, w2)
    x = (residual + hf_rms(h, w3)) * layer_scalar
    return hf_rms(x, w_next), x


def dispatch_eager(hidden, top_k_index, top_k_weights, e: int):
    """transformers 5.17 ``grouped_mm_experts_forward`` up to its first GEMM, plus the inverse
    permutation it builds after the second: sort, gathers, histc (int ids on CUDA, float on CPU),
    cumsum, the sentinel-row mask, ``inv_perm[perm] = arange(S)``."""
    k = top_k_index.shape[-1]
    ids_g, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden[perm // k]
    w_g = top_k_weights.reshape(-1)[perm]
    counts = torch.histc(ids_g.float() if hidden.device.type in ("cpu", "mps") else ids_g.int(),
                         bins=e, min=0, max=e - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    rows = rows.masked_fill((ids_g >= e).unsqueeze(-1), 0.0)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=hidden.device)
    return ids_g, perm, offsets, inv, rows, w_g


def dispatch_fused(hidden, top_k_index, top_k_weights, e: int):
    return tuple(_ops().moe_dispatch(top_k_index.reshape(-1), hidden, top_k_weights.reshape(-1), e,
                                     top_k_index.shape[-1], True))


def dispatch_canon(outs):
    """What no consumer can tell apart: sorted ids, offsets, and the gathered rows / weights / perm
    brought back to source order through inv_perm (``rows[inv][j] = hidden[j // k]``)."""
    ids_g, perm, offsets, inv, rows, w_g = outs
    return ids_g, offsets, rows[inv], w_g[inv], perm[inv]


def make_qkv_fused(d: int, k_eq_v: bool, q_only: bool):
    ops = _ops()

    def heads(t):
        return t.view(*t.shape[:-1], -1, d)

    if q_only:
        return lambda q_lin, qw, cos, sin: ops.q_norm_rope(heads(q_lin), qw, cos, sin, EPS)
    if k_eq_v:
        def f(q_lin, k_lin, qw, kw, cos, sin):
            k = heads(k_lin)
            return ops.qkv_norm_rope(heads(q_lin), k, k, qw, kw, cos, sin, EPS, EPS, EPS)
        return f
    return lambda q_lin, k_lin, v_lin, qw, kw, cos, sin: ops.qkv_norm_rope(
        heads(q_lin), heads(k_lin), heads(v_lin), qw, kw, cos, sin, EPS, EPS, EPS)


def _ops():
    import gemma4_passes.kernels  # noqa: F401  (registers the ops)

    return torch.ops.gemma4_passes


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    fusion: str
    preset: str  # where this shape occurs
    shape: str
    tokens: int
    make: Callable[[torch.Generator, torch.device], tuple]  # one input set
    eager: Callable
    fused: Callable
    ideal_bytes: int  # what the ideal fused kernel reads + writes
    canon: Callable | None = None  # outputs -> the form compared with eager (default: as they are)


def _rand(g, device, shape, scale=1.0, mean=0.0, dtype=DTYPE):
    return (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale + mean).to(dtype)


def _weight(g, device, n):
    return _rand(g, device, (n,), 0.3, 1.0)


def _scalar(g, device):
    return (0.5 + torch.rand((1,), generator=g, device=device, dtype=torch.float32)).to(DTYPE)


def _rope(g, device, t, d, theta=10000.0):
    pos = torch.randint(0, 32768, (1, t), generator=g, device=device).to(torch.float32)
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(DTYPE), emb.sin().to(DTYPE)


def _presets():
    from gemma4_passes.presets import PRESETS

    return PRESETS


def build_cases(tokens: list[int], fusions: list[str], smoke: bool, presets_filter: set | None,
                dispatch_tokens: list[int] | None = None) -> list[Case]:
    ops = _ops()
    B = 2  # bytes per bf16 element
    P = _presets()
    if smoke:
        norm_sites = {"post_attn_norm": [("tiny", 64)], "ffn_tail": [("tiny", 96)], "ple_tail": [("tiny", 64)]}
        ple_sites = [("tiny", 16, 4)]
        qkv_sites = [("tiny-sliding", 4, 2, 16, False, False), ("tiny-full-keqv", 4, 1, 32, True, False),
                     ("tiny-shared-q", 4, 0, 16, False, True)]
    else:
        norm_sites = {
            # post-attention epilogue: every dense layer (E4B, 31B)
            "post_attn_norm": [("e4b", P["e4b"].hidden_size), ("31b", P["31b"].hidden_size)],
            # FFN tail with layer_scalar: layers without PLE (26B-A4B, 31B)
            "ffn_tail": [("26b-a4b", P["26b-a4b"].hidden_size), ("31b", P["31b"].hidden_size)],
            # PLE tail: E2B/E4B
            "ple_tail": [("e4b", P["e4b"].hidden_size)],
        }
        e4b = P["e4b"]
        ple_sites = [("e2b/e4b", e4b.hidden_size_per_layer_input, e4b.num_hidden_layers)]
        d31 = P["31b"]
        qkv_sites = [
            ("e4b-sliding", e4b.num_attention_heads, e4b.num_key_value_heads, e4b.head_dim, False, False),
            ("e4b-shared-q", e4b.num_attention_heads, 0, e4b.head_dim, False, True),
            ("31b-sliding", d31.num_attention_heads, d31.num_key_value_heads, d31.head_dim, False, False),
            ("31b-full-keqv", d31.num_attention_heads, d31.full_kv_heads, d31.global_head_dim, True, False),
        ]

    moe_h = 64 if smoke else P["26b-a4b"].hidden_size
    moe_e, moe_k = (8, 2) if smoke else (P["26b-a4b"].num_experts, P["26b-a4b"].top_k_experts)

    def keep(preset: str) -> bool:
        return presets_filter is None or any(p in preset for p in presets_filter)

    cases: list[Case] = []
    for t in tokens:
        for fusion in fusions:
            if fusion in ("post_attn_norm", "ffn_tail", "ple_tail"):
                for preset, h in norm_sites[fusion]:
                    if not keep(preset):
                        continue
                    if fusion == "post_attn_norm":
                        def make(g, dev, h=h, t=t):
                            return (_rand(g, dev, (1, t, h), 20.0), _rand(g, dev, (1, t, h), 3.0),
                                    _weight(g, dev, h), _weight(g, dev, h))
                        eager = post_attn_eager
                        fused = lambda a, r, w1, w2: ops.rmsnorm_add_rmsnorm(a, r, w1, None, w2, EPS, EPS)  # noqa: E731
                    else:
                        def make(g, dev, h=h, t=t):
                            return (_rand(g, dev, (1, t, h), 20.0), _rand(g, dev, (1, t, h), 3.0),
                                    _weight(g, dev, h), _scalar(g, dev), _weight(g, dev, h))
                        eager = tail_eager
                        fused = lambda x, r, w, s, wn: ops.rmsnorm_add_rmsnorm(x, r, w, s, wn, EPS, EPS)  # noqa: E731
                    cases.append(Case(fusion, preset, f"H={h}", t, make, eager, fused, 4 * t * h * B + 2 * h * B))
            elif fusion == "ple_gate":
                for preset, w, n_layers in ple_sites:
                    if not keep(preset):
                        continue

                    def make(g, dev, w=w, t=t, n_layers=n_layers):
                        pli = _rand(g, dev, (1, t, n_layers, w))  # per_layer_inputs [B, S, L, W]
                        return (_rand(g, dev, (1, t, w), 3.0), pli[:, :, 1, :])
                    cases.append(Case(fusion, preset, f"W={w} (slice of L={n_layers})", t, make, ple_gate_eager,
                                      lambda gt, o: ops.gelu_tanh_mul(gt, o), 3 * t * w * B))
            elif fusion == "qkv_norm":
                for preset, hq, hk, d, keqv, q_only in qkv_sites:
                    if not keep(preset):
                        continue

                    def make(g, dev, hq=hq, hk=hk, d=d, keqv=keqv, q_only=q_only, t=t):
                        cos, sin = _rope(g, dev, t, d)
                        q = _rand(g, dev, (1, t, hq * d), 4.0)
                        qw = _weight(g, dev, d)
                        if q_only:
                            return (q, qw, cos, sin)
                        k = _rand(g, dev, (1, t, hk * d), 4.0)
                        kw = _weight(g, dev, d)
                        if keqv:
                            return (q, k, qw, kw, cos, sin)
                        return (q, k, _rand(g, dev, (1, t, hk * d), 4.0), qw, kw, cos, sin)
                    moved = 2 * hq * d + (0 if q_only else (2 * hk * d + (1 if keqv else 2) * hk * d))
                    ideal = t * (moved + 2 * d) * B + (1 if q_only else 2) * d * B
                    shape = f"Hq={hq} " + ("q only" if q_only else f"Hk={hk}") + f" D={d}" + (" k=v" if keqv else "")
                    cases.append(Case(fusion, preset, shape, t, make, make_qkv_eager(d, keqv, q_only),
                                      make_qkv_fused(d, keqv, q_only), ideal))
            elif fusion == "moe_router" and keep("26b-a4b"):
                def make(g, dev, t=t):
                    return (_rand(g, dev, (t, moe_e), 2.0), _weight(g, dev, moe_e))
                cases.append(Case(fusion, "26b-a4b", f"E={moe_e} k={moe_k}", t, make,
                                  lambda lg, pes: router_eager(lg, pes, moe_k),
                                  lambda lg, pes: ops.moe_router(lg, pes, moe_k, False),
                                  t * (moe_e * B + moe_k * 12) + moe_e * B))
            elif fusion == "moe_input_norms" and keep("26b-a4b"):
                h = moe_h

                def make(g, dev, h=h, t=t):
                    return (_rand(g, dev, (1, t, h), 20.0), _rand(g, dev, (1, t, h), 3.0),
                            *(_weight(g, dev, h) for _ in range(4)))
                cases.append(Case(
                    fusion, "26b-a4b", f"H={h}", t, make, moe_input_eager,
                    moe_input_fused,
                    6 * t * h * B + 4 * h * B))
            elif fusion == "moe_branch_combine" and keep("26b-a4b"):
                h = moe_h

                def make(g, dev, h=h, t=t):
                    return (_rand(g, dev, (1, t, h), 20.0), _rand(g, dev, (1, t, h), 20.0),
                            _rand(g, dev, (1, t, h), 3.0), *(_weight(g, dev, h) for _ in range(3)),
                            _scalar(g, dev), _weight(g, dev, h))
                cases.append(Case(
                    fusion, "26b-a4b", f"H={h}", t, make, moe_combine_eager,
                    lambda h1, h2, r, w1, w2, w3, sc, wn: ops.moe_branch_combine(h1, h2, r, w1, w2, w3, sc, wn,
                                                                                 EPS, EPS, EPS, EPS),
                    5 * t * h * B + 4 * h * B))
    if "moe_dispatch" in fusions and keep("26b-a4b"):
        h = moe_h
        for t in (tokens if dispatch_tokens is None else dispatch_tokens):
            def make(g, dev, h=h, t=t):
                ids = torch.rand((t, moe_e), generator=g, device=dev).argsort(dim=-1)[:, :moe_k]  # distinct per token
                return (_rand(g, dev, (t, h)), ids.contiguous(),
                        torch.rand((t, moe_k), generator=g, device=dev, dtype=torch.float32))
            s = t * moe_k
            cases.append(Case(
                "moe_dispatch", "26b-a4b", f"E={moe_e} k={moe_k} H={h}", t, make,
                lambda x, i, w: dispatch_eager(x, i, w, moe_e), lambda x, i, w: dispatch_fused(x, i, w, moe_e),
                s * 8 + 2 * s * h * B + 2 * s * 4 + 3 * s * 8 + moe_e * 4, canon=dispatch_canon))
    return cases


# ------------------------------------------------------------------------------------------------
# running one case
# ------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    fusion: str
    preset: str
    shape: str
    tokens: int
    sets: int = 1
    us: dict = field(default_factory=dict)  # variant -> median us per call
    spread: dict = field(default_factory=dict)
    method: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # variant -> kernel count per call
    kernel_names: dict = field(default_factory=dict)
    compile_s: float = 0.0
    max_abs_vs_eager: dict = field(default_factory=dict)  # inductor / fused outputs vs eager
    max_rel_vs_eager: dict = field(default_factory=dict)  # the same over max |eager output|
    ideal_bytes: int = 0
    fused_gbps: float | None = None
    pct_copy_bw: float | None = None
    error: str | None = None
    seconds: float = 0.0


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _max_abs(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
               for x, y in zip(_as_tuple(a), _as_tuple(b)))


def _max_rel(a, b) -> float:
    """max |a - b| over max |b|, output by output (the worst)."""
    worst = 0.0
    for x, y in zip(_as_tuple(a), _as_tuple(b)):
        if x.numel():
            den = float(y.float().abs().max()) or 1.0
            worst = max(worst, float((x.float() - y.float()).abs().max()) / den)
    return worst


def run_case(case: Case, idx: int, device, args, copy_bw: float | None, l2_bytes: int) -> CaseResult:
    t0 = time.perf_counter()
    res = CaseResult(case.fusion, case.preset, case.shape, case.tokens, ideal_bytes=case.ideal_bytes)
    cuda = common.is_cuda(device)
    try:
        k = 1 if not cuda else int(max(1, min(8, math.ceil(2 * l2_bytes / max(1, case.ideal_bytes)))))
        res.sets = k
        g = common.generator(device, args.seed * 1_000_003 + idx)
        sets = [case.make(g, device) for _ in range(k)]

        torch._dynamo.reset()
        compiled = torch.compile(case.eager, dynamic=False, options={"post_grad_custom_pre_pass": None})
        tc = time.perf_counter()
        ref = case.eager(*sets[0])
        out_c = compiled(*sets[0])
        common.sync(device)
        res.compile_s = time.perf_counter() - tc
        out_f = case.fused(*sets[0])
        common.sync(device)
        if case.canon is not None:
            ref, out_c, out_f = case.canon(ref), case.canon(out_c), case.canon(out_f)
        res.max_abs_vs_eager = {"inductor": _max_abs(out_c, ref), "fused": _max_abs(out_f, ref)}
        res.max_rel_vs_eager = {"inductor": _max_rel(out_c, ref), "fused": _max_rel(out_f, ref)}
        del ref, out_c, out_f

        variants = {"eager": case.eager, "inductor": compiled, "fused": case.fused}
        for name, fn in variants.items():
            def run_all(fn=fn):
                return [fn(*s) for s in sets]

            timing, _outs = common.bench(run_all, device, calls_per_fn=k, repeats=args.repeats,
                                         target_ms=args.target_ms)
            res.us[name] = timing.us
            res.spread[name] = timing.spread
            res.method[name] = timing.method + (f" ({timing.note})" if timing.note else "")
            del _outs, timing
        # kernel counts: one profiler session for the three variants (falls back to one each)
        one_call = {name: (lambda fn=fn: fn(*sets[0])) for name, fn in variants.items()}
        kcs = common.count_kernels_multi(one_call, device)
        if kcs is None or any("error" in c or not c.get("total") for c in kcs.values()):
            kcs = {name: common.count_kernels(f, device) for name, f in one_call.items()}
        for name, kc in kcs.items():
            if kc is not None and "error" not in kc:
                res.kernels[name] = kc["total"]
                res.kernel_names[name] = kc["names"]
        if res.us.get("fused"):
            res.fused_gbps = case.ideal_bytes / (res.us["fused"] * 1e-6) / 1e9
            if copy_bw:
                res.pct_copy_bw = 100.0 * case.ideal_bytes / (res.us["fused"] * 1e-6) / copy_bw
        del sets, compiled, variants
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {str(e)[:400]}"
        if args.verbose:
            traceback.print_exc()
    finally:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    res.seconds = time.perf_counter() - t0
    return res


HEADERS = ["fusion", "preset", "shape", "T", "eager us", "inductor us", "fused us", "fused vs eager",
           "fused vs inductor", "kernels e/i/f", "fused GB/s", "% copy BW"]


def table_rows(results: list[CaseResult]) -> list[list]:
    order = {f: i for i, f in enumerate(FUSIONS)}
    rows = []
    for r in sorted(results, key=lambda r: (order.get(r.fusion, 99), r.preset, r.shape, r.tokens)):
        if r.error:
            rows.append([r.fusion, r.preset, r.shape, r.tokens, "ERROR", r.error[:80], "", "", "", "", "", ""])
            continue
        e, i, f = (r.us.get(v) for v in ("eager", "inductor", "fused"))
        kern = "/".join(common.fmt_count({"total": r.kernels[v]}) if v in r.kernels else "-"
                        for v in ("eager", "inductor", "fused"))
        rows.append([
            r.fusion, r.preset, r.shape, r.tokens, common.fmt_us(e), common.fmt_us(i), common.fmt_us(f),
            common.fmt_x(e / f if e and f else None), common.fmt_x(i / f if i and f else None), kern,
            "-" if r.fused_gbps is None else f"{r.fused_gbps:.0f}",
            "-" if r.pct_copy_bw is None else f"{r.pct_copy_bw:.0f}%",
        ])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--tokens", default=None, help=f"comma list of token counts (default {','.join(map(str, DEFAULT_TOKENS))})")
    ap.add_argument("--fusions", default=None, help=f"comma list (default all: {','.join(FUSIONS)})")
    ap.add_argument("--presets", default=None, help="only shapes whose preset label contains one of these (comma list)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases after this many seconds (the rest are listed as skipped)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 7; smoke 2)")
    ap.add_argument("--target-ms", type=float, default=None, help="length of one timed repeat (default 5 ms; smoke 1)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 7)
    args.target_ms = args.target_ms or (1.0 if args.smoke else 5.0)

    device = common.resolve_device(args.device)
    info = common.env_info(device)
    common.print_env(info)
    common.seed_all(args.seed)
    budget = common.Budget(args.budget_s)

    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    else:
        tokens = [1, 7] if args.smoke else list(DEFAULT_TOKENS)
    tokens = sorted(tokens, key=lambda t: (T_PRIORITY.index(t) if t in T_PRIORITY else len(T_PRIORITY), t))
    fusions = args.fusions.split(",") if args.fusions else list(FUSIONS)
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown:
        raise SystemExit(f"unknown fusions {unknown}; choose from {FUSIONS}")
    presets_filter = set(args.presets.split(",")) if args.presets else None

    copy_bw = common.measure_copy_bandwidth(device) if common.is_cuda(device) else None
    if copy_bw:
        print(f"# device-to-device copy: {copy_bw / 1e12:.2f} TB/s (bytes read + written, 1 GiB buffer)", flush=True)
    l2 = int(info.get("l2_mib", 0) * 2**20) or (50 << 20)

    dispatch_tokens = tokens if args.tokens else ([1, 7] if args.smoke else list(DISPATCH_TOKENS))
    cases = build_cases(tokens, fusions, args.smoke, presets_filter, dispatch_tokens)
    print(f"# {len(cases)} cases, bf16, CUDA-graph replay timing" if common.is_cuda(device)
          else f"# {len(cases)} cases, bf16, CPU perf_counter timing (no graphs, no kernel counts)", flush=True)
    out_json = common.json_path(args, "bench_fusions.json")
    results: list[CaseResult] = []
    skipped: list[str] = []
    costs: list[float] = []
    with torch.inference_mode():
        for idx, case in enumerate(cases):
            est = 1.5 * (sum(costs) / len(costs)) if costs else 0.0
            if not budget.allows(est):
                skipped.append(f"{case.fusion} {case.preset} {case.shape} T={case.tokens}")
                continue
            r = run_case(case, idx, device, args, copy_bw, l2)
            costs.append(r.seconds)
            results.append(r)
            status = r.error or (
                f"eager {common.fmt_us(r.us.get('eager'))} | inductor {common.fmt_us(r.us.get('inductor'))} | "
                f"fused {common.fmt_us(r.us.get('fused'))} us; kernels {r.kernels or '-'}; "
                f"max|x-eager| inductor {r.max_abs_vs_eager.get('inductor', 0):.3g} fused "
                f"{r.max_abs_vs_eager.get('fused', 0):.3g}; compile {r.compile_s:.1f}s")
            print(f"[{idx + 1}/{len(cases)} {budget.elapsed():.0f}s] {case.fusion} {case.preset} {case.shape} "
                  f"T={case.tokens} x{r.sets}: {status}", flush=True)
            common.write_json(out_json, dict(env=info, copy_bw_Bps=copy_bw, results=results, skipped=skipped,
                                             partial=True))

    rows = table_rows(results)
    md = common.md_table(HEADERS, rows)
    print()
    print(f"## Fusions, bf16, {info.get('gpu', device)}, torch {info['torch']}, triton {info.get('triton')} "
          f"({info['date_utc']}, git {info.get('git')})")
    if copy_bw:
        print(f"device-to-device copy bandwidth: {copy_bw / 1e12:.2f} TB/s")
    print()
    print(md)
    print()
    print("us = median microseconds per call (CUDA-graph replay, K input sets rotated per replay); "
          "fused vs eager/inductor = speedup of the fused op; kernels e/i/f = kernels per call "
          "(eager/inductor/fused, torch.profiler); GB/s and % copy BW = ideal fused-kernel bytes "
          "(inputs read once + outputs written once) over the fused time.")
    if skipped:
        print(f"SKIPPED (budget {args.budget_s}s): {len(skipped)} cases: " + "; ".join(skipped))
    errors = [r for r in results if r.error]
    # bf16 rounding differences stay within a few ulps of the largest output (2^-8 relative each)
    suspicious = [r for r in results if not r.error and r.max_rel_vs_eager.get("fused", 0) > 2.0**-5]
    for r in suspicious:
        print(f"WARNING: {r.fusion} {r.shape} T={r.tokens}: fused output differs from eager by "
              f"{r.max_abs_vs_eager['fused']:.3g} ({r.max_rel_vs_eager['fused']:.2g} of max |eager|): "
              "run check_kernels_gpu.py")
    common.write_json(out_json, dict(env=info, copy_bw_Bps=copy_bw, results=results, skipped=skipped,
                                     partial=False, markdown=md, elapsed_s=budget.elapsed()))
    print(f"done in {budget.elapsed():.0f}s: {len(results)} cases, {len(errors)} errors, {len(skipped)} skipped")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every fused ``gemma4_passes`` op against its torch reference, on the GPU, at Gemma-4's real sizes.

    PYTHONPATH=. python benchmarks/check_kernels_gpu.py                  # the full sweep (CUDA)
    PYTHONPATH=. python benchmarks/check_kernels_gpu.py --quick          # fewer token counts
    PYTHONPATH=. python benchmarks/check_kernels_gpu.py --smoke --device cpu

Each check draws fresh random inputs (a new seed per check: activations, norm weights, the layer
scalar, RoPE positions) and compares, output by output:

* the custom op (``torch.ops.gemma4_passes.*``) called after the CUDA caching allocator was
  "poisoned" (blocks of the output sizes filled with NaN and freed, so the op's own ``torch.empty``
  most likely reuses NaN memory: an element the kernel forgets to write stays NaN);
* the Triton launcher called with NaN-filled preallocated outputs (``out=`` / ``q_out=`` ...), when
  the launcher accepts them;

against the plain-torch reference ``gemma4_passes.kernels.reference`` (HF's op order and roundings)
run on the same device, and against an independent float64 "truth" (same formulas, no roundings).
One CUDA-graph check per op also replays a captured call on fresh inputs.

A check FAILS when an output is not finite, has the wrong shape/dtype/layout, or
  * more than ``--max-mismatch`` (3%) of its elements are not bit-equal to the reference, or
  * an element is further from the reference than ``1 ulp(|ref|) + 2 ulp(max |ref| of its row)``
    (bf16/fp16; fp32: 8 + 8 ulp). A GPU's fp32 rsqrt/exp/sum order moves a few intermediate
    roundings by 1 ulp; where a sum then cancels (residual ~ -normed) that 1 ulp of the operands is
    many ulps of the small result, hence the row-scale term. Real bugs (wrong weight, index, head,
    missing rounding...) are orders of magnitude above it.
  * its relative L2 error against the float64 truth exceeds 1.5x the reference's own + 1e-6.

``moe_dispatch`` (family ``moe``: index work of the MoE experts at 26B-A4B's E = 128, k = 8,
H = 2816) has only exact outputs (ints, rows and weights copied): every output must EQUAL the
reference's (``torch.sort(stable=True)`` etc. on the same device), int outputs are poisoned with -7.

Prints one summary line per (op, variant, dtype, path), the failures in detail, and writes every
check to ``$OUT/check_kernels.json``. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import torch  # noqa: E402

EPS = 1e-6
NAN = float("nan")

# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------


def _presets():
    from gemma4_passes.presets import PRESETS

    return PRESETS


def hidden_sizes(smoke: bool) -> list[int]:
    if smoke:
        return [64, 96]
    return sorted({p.hidden_size for p in _presets().values()})  # 1536, 2560, 2816, 5376


@dataclass(frozen=True)
class HeadLayout:
    name: str
    hq: int
    hk: int  # 0: q alone (KV-shared layer)
    d: int
    k_eq_v: bool = False


def head_layouts(smoke: bool) -> list[HeadLayout]:
    if smoke:
        return [HeadLayout("tiny-sliding", 4, 2, 16), HeadLayout("tiny-full-keqv", 4, 1, 32, True),
                HeadLayout("tiny-shared-q", 4, 0, 16)]
    out: dict[tuple, HeadLayout] = {}
    for p in _presets().values():
        sl = HeadLayout(f"{p.name}-sliding", p.num_attention_heads, p.num_key_value_heads, p.head_dim)
        fu = HeadLayout(f"{p.name}-full" + ("-keqv" if p.attention_k_eq_v else ""), p.num_attention_heads,
                        p.full_kv_heads, p.global_head_dim, p.attention_k_eq_v)
        for lay in (sl, fu):
            out.setdefault((lay.hq, lay.hk, lay.d, lay.k_eq_v), lay)
        if p.num_kv_shared_layers:
            for d, kind in ((p.head_dim, "sliding"), (p.global_head_dim, "full")):
                lay = HeadLayout(f"{p.name}-shared-{kind}-q", p.num_attention_heads, 0, d)
                out.setdefault((lay.hq, 0, d, False), lay)
    return list(out.values())


def gelu_widths(smoke: bool) -> list[tuple[str, int]]:
    if smoke:
        return [("ple", 12), ("mlp", 40)]
    p = _presets()
    ple = {pr.hidden_size_per_layer_input for pr in p.values() if pr.hidden_size_per_layer_input}
    return [("ple", w) for w in sorted(ple)] + [("mlp", p["e4b"].intermediate_size)]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


class Rand:
    """Random tensors from one seeded generator (drawn in fp32 on the device, then cast)."""

    def __init__(self, device, seed):
        self.device = device
        self.g = common.generator(device, seed)

    def normal(self, shape, dtype, scale=1.0, mean=0.0):
        t = torch.randn(shape, generator=self.g, device=self.device, dtype=torch.float32)
        return (t * scale + mean).to(dtype)

    def weight(self, n, dtype):  # signed, varied: exercises `* w` for real (Gemma-4: w, not 1 + w)
        return self.normal((n,), dtype, 0.5, 1.0)

    def scalar(self, dtype):  # layer_scalar: a 1-element tensor, read in the kernel
        u = torch.rand((1,), generator=self.g, device=self.device, dtype=torch.float32)
        return (0.5 + u).to(dtype)

    def rope(self, b, s, d, dtype, theta=10000.0):
        """HF cos/sin [B, S, D] (cat(freqs, freqs)) at random positions < 131072."""
        pos = torch.randint(0, 131072, (b, s), generator=self.g, device=self.device).to(torch.float64)
        inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=self.device, dtype=torch.float64) / d))
        emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


# ------------------------------------------------------------------------------------------------
# float64 truth (independent of gemma4_passes.kernels.reference)
# ------------------------------------------------------------------------------------------------


def t_rms(x, w, eps=EPS):
    x = x.double()
    y = x * (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return y * w.double() if w is not None else y


def t_rmsnorm_add(x, res, w, scalar, eps=EPS):
    s = res.double() + t_rms(x, w, eps)
    return s * scalar.double().reshape(()) if scalar is not None else s


def t_gelu_mul(g, o):
    g = g.double()
    return 0.5 * g * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g.pow(3)))) * o.double()


def t_rope(n, cos, sin):
    c, s = cos.double().unsqueeze(2), sin.double().unsqueeze(2)
    h = n.shape[-1] // 2
    rot = torch.cat((-n[..., h:], n[..., :h]), dim=-1)
    return n * c + rot * s


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------


@dataclass
class Check:
    op: str  # custom op name
    variant: str  # e.g. "ffn_tail" / "ple" / "e4b-sliding"
    dtype: torch.dtype
    shape: str  # human description
    make: Callable[[Rand], dict]  # -> inputs
    call_op: Callable[[dict], tuple]
    call_launcher: Callable[[dict, tuple], tuple] | None  # (inputs, preallocated outs) -> outs
    reference: Callable[[dict], tuple]
    truth: Callable[[dict], tuple]
    out_names: tuple[str, ...]
    tags: tuple[str, ...] = ()
    exact: bool = False  # every output must equal the reference (integer / copied outputs)


def _ops():
    import gemma4_passes.kernels  # noqa: F401  (registers the ops)

    return torch.ops.gemma4_passes


def _ref():
    from gemma4_passes.kernels import reference

    return reference


def _launcher(module: str, name: str, out_kwargs: tuple[str, ...]):
    """The Triton launcher, if importable and it accepts every ``out_kwargs`` keyword."""
    try:
        mod = __import__(f"gemma4_passes.kernels.{module}", fromlist=[name])
        fn = getattr(mod, name)
        params = inspect.signature(fn).parameters
    except Exception:  # noqa: BLE001
        return None
    if not all(k in params for k in out_kwargs):
        return None
    return fn


def norm_checks(hidden: list[int], tokens: list[int], dtypes, smoke: bool, fp32_at) -> list[Check]:
    ops, R = _ops(), _ref()
    add_l = _launcher("norm_residual", "rmsnorm_add_triton", ("out",))
    add2_l = _launcher("norm_residual", "rmsnorm_add_rmsnorm_triton", ("out", "normed_out"))

    # (variant, two outputs?, scalar?, next weight?) -- the first three are what the passes emit
    variants = [("post_attn", True, False, True), ("ffn_tail", True, True, True), ("tail_last", False, True, False)]
    rare = [("add_noscalar", False, False, False), ("next_unweighted", True, True, False)]
    # SGLang's fp32 residual add: the second norm reads the unrounded fp32 sum
    sgl = ("sglang_post_attn", True, False, True, True)

    def build(h, t, dt, variant, two, has_scalar, has_nw, unrounded=False, layout="contig", wdt=None):
        wdt = wdt or dt

        def make(r: Rand):
            if layout == "strided":  # rows of a wider buffer: row stride h + 64
                x = r.normal((t, h + 64), dt, 20.0)[:, :h]
                res = r.normal((t, h + 64), dt, 3.0)[:, 32:32 + h]
            else:  # [1, T, H], as the model's graph has it
                x, res = r.normal((1, t, h), dt, 20.0), r.normal((1, t, h), dt, 3.0)
            return dict(x=x, res=res, w=r.weight(h, wdt), nw=r.weight(h, wdt) if has_nw else None,
                        sc=r.scalar(dt) if has_scalar else None)

        if two:
            def call_op(i):
                return tuple(ops.rmsnorm_add_rmsnorm(i["x"], i["res"], i["w"], i["sc"], i["nw"], EPS, EPS,
                                                     unrounded))

            def reference(i):
                return tuple(R.rmsnorm_add_rmsnorm_ref(i["x"], i["res"], i["w"], i["sc"], i["nw"], EPS, EPS,
                                                       unrounded))

            def truth(i):
                s = t_rmsnorm_add(i["x"], i["res"], i["w"], i["sc"])
                return t_rms(s, i["nw"]), s

            launch = None
            if add2_l is not None:
                def launch(i, outs):
                    return tuple(add2_l(i["x"], i["res"], i["w"], i["sc"], i["nw"], EPS, EPS,
                                        normed_out=outs[0], out=outs[1], unrounded_sum=unrounded))
            names = ("normed", "residual_out")
        else:
            def call_op(i):
                return (ops.rmsnorm_add(i["x"], i["res"], i["w"], i["sc"], EPS),)

            def reference(i):
                return (R.rmsnorm_add_ref(i["x"], i["res"], i["w"], i["sc"], EPS),)

            def truth(i):
                return (t_rmsnorm_add(i["x"], i["res"], i["w"], i["sc"]),)

            launch = None
            if add_l is not None:
                def launch(i, outs):
                    return (add_l(i["x"], i["res"], i["w"], i["sc"], EPS, out=outs[0]),)
            names = ("residual_out",)
        op = "rmsnorm_add_rmsnorm" if two else "rmsnorm_add"
        shape = f"T={t} H={h}" + (" strided" if layout == "strided" else "") + (f" w={_dt(wdt)}" if wdt != dt else "")
        return Check(op, variant, dt, shape, make, call_op, launch, reference, truth, names)

    checks = []
    for dt in dtypes:
        for h in hidden:
            for t in tokens:
                for v in variants:
                    checks.append(build(h, t, dt, *v))
    # strided rows, the rarer flag combinations, fp32 weights: bf16 at a few sizes
    few_t = [t for t in tokens if t in (7, 1000)] or tokens[:2]
    for h in hidden:
        for t in few_t:
            for v in variants + [sgl]:
                checks.append(build(h, t, torch.bfloat16, *v, layout="strided"))
        for v in rare + [sgl]:
            checks.append(build(h, few_t[0], torch.bfloat16, *v))
        checks.append(build(h, max(tokens), torch.bfloat16, *sgl))  # prefill size: the chunked kernel
    h32, t32 = fp32_at
    for v in variants + rare + [sgl]:
        checks.append(build(h32, t32, torch.float32, *v))
    checks.append(build(h32, t32, torch.bfloat16, *variants[1], wdt=torch.float32))
    return checks


def gelu_checks(widths, tokens, dtypes, smoke: bool, fp32_t) -> list[Check]:
    ops, R = _ops(), _ref()
    launch_fn = _launcher("gelu_mul", "gelu_tanh_mul_triton", ("out",))
    n_layers = 4 if smoke else _presets()["e4b"].num_hidden_layers

    def build(kind, w, t, dt):
        def make(r: Rand):
            if kind == "ple":  # gate [1, T, W]; other = per_layer_inputs[:, :, i, :] (a strided slice)
                return dict(g=r.normal((1, t, w), dt, 3.0), o=r.normal((1, t, n_layers, w), dt)[:, :, 1, :])
            gu = r.normal((t, 2 * w), dt, 3.0)  # merged gate/up GEMM output, two strided halves
            return dict(g=gu[:, :w], o=gu[:, w:])

        launch = None
        if launch_fn is not None:
            def launch(i, outs):
                return (launch_fn(i["g"], i["o"], out=outs[0]),)
        return Check("gelu_tanh_mul", kind, dt, f"T={t} W={w}", make,
                     lambda i: (ops.gelu_tanh_mul(i["g"], i["o"]),), launch,
                     lambda i: (R.gelu_tanh_mul_ref(i["g"], i["o"]),),
                     lambda i: (t_gelu_mul(i["g"], i["o"]),), ("out",))

    checks = [build(k, w, t, dt) for dt in dtypes for k, w in widths for t in tokens]
    checks += [build(k, w, fp32_t, torch.float32) for k, w in widths]
    return checks


def qkv_checks(layouts: list[HeadLayout], tokens, dtypes, smoke: bool, fp32_t) -> list[Check]:
    ops, R = _ops(), _ref()
    qkv_l = _launcher("qkv_norm_rope", "qkv_norm_rope_triton", ("q_out", "k_out", "v_out"))
    q_l = _launcher("qkv_norm_rope", "q_norm_rope_triton", ("out",))

    def build(lay: HeadLayout, b, s, dt, merged):
        hq, hk, d = lay.hq, lay.hk, lay.d

        def make(r: Rand):
            cos, sin = r.rope(b, s, d, dt)
            i = dict(qw=r.weight(d, dt), kw=r.weight(d, dt) if hk else None, cos=cos, sin=sin)
            if hk == 0:
                if merged:  # q columns of a merged projection (row stride wider than Hq*D)
                    i["q"] = r.normal((b, s, (hq + 2) * d), dt, 4.0)[..., : hq * d].view(b, s, hq, d)
                else:
                    i["q"] = r.normal((b, s, hq * d), dt, 4.0).view(b, s, hq, d)
                return i
            nv = 0 if lay.k_eq_v else hk
            if merged:
                qkv = r.normal((b, s, (hq + hk + nv) * d), dt, 4.0)
                q, k, v = qkv.split([hq * d, hk * d, nv * d], dim=-1)
                i["q"], i["k"] = q.view(b, s, hq, d), k.view(b, s, hk, d)
                i["v"] = i["k"] if lay.k_eq_v else v.view(b, s, hk, d)
            else:
                i["q"] = r.normal((b, s, hq * d), dt, 4.0).view(b, s, hq, d)
                i["k"] = r.normal((b, s, hk * d), dt, 4.0).view(b, s, hk, d)
                i["v"] = i["k"] if lay.k_eq_v else r.normal((b, s, hk * d), dt, 4.0).view(b, s, hk, d)
            return i

        shape = f"B={b} S={s} Hq={hq} Hk={hk} D={d}" + (" k=v" if lay.k_eq_v else "") + (" merged" if merged else "")
        if hk == 0:
            launch = None
            if q_l is not None:
                def launch(i, outs):
                    return (q_l(i["q"], i["qw"], i["cos"], i["sin"], EPS, out=outs[0]),)
            return Check(
                "q_norm_rope", lay.name, dt, shape, make,
                lambda i: (ops.q_norm_rope(i["q"], i["qw"], i["cos"], i["sin"], EPS),), launch,
                lambda i: (R.q_norm_rope_ref(i["q"], i["qw"], i["cos"], i["sin"], EPS),),
                lambda i: (t_rope(t_rms(i["q"], i["qw"]), i["cos"], i["sin"]),), ("q",),
            )

        def args(i):
            return (i["q"], i["k"], i["v"], i["qw"], i["kw"], i["cos"], i["sin"], EPS, EPS, EPS)

        launch = None
        if qkv_l is not None:
            def launch(i, outs):
                return tuple(qkv_l(*args(i), q_out=outs[0], k_out=outs[1], v_out=outs[2]))

        def truth(i):
            return (t_rope(t_rms(i["q"], i["qw"]), i["cos"], i["sin"]),
                    t_rope(t_rms(i["k"], i["kw"]), i["cos"], i["sin"]), t_rms(i["v"], None))

        return Check("qkv_norm_rope", lay.name, dt, shape, make, lambda i: tuple(ops.qkv_norm_rope(*args(i))),
                     launch, lambda i: tuple(R.qkv_norm_rope_ref(*args(i))), truth, ("q", "k", "v"))

    checks = []
    for dt in dtypes:
        for lay in layouts:
            for t in tokens:
                checks.append(build(lay, 1, t, dt, False))
    few_t = [t for t in tokens if t in (7, 1000)] or tokens[:2]
    for lay in layouts:
        for t in few_t:
            checks.append(build(lay, 1, t, torch.bfloat16, True))
        checks.append(build(lay, 2, few_t[0], torch.bfloat16, True))  # batch 2: per-sequence positions
    for lay in layouts[:3] if not smoke else layouts:
        checks.append(build(lay, 1, fp32_t, torch.float32, False))
    return checks


def dispatch_checks(tokens, dtypes, smoke: bool) -> list[Check]:
    """moe_dispatch at 26B-A4B's sizes: router-like ids (k distinct experts per token), ids
    crowded on a few experts, and transformers' expert-parallel sentinels (ids == E, rows zeroed)."""
    ops, R = _ops(), _ref()
    launch_fn = _launcher("moe_dispatch", "moe_dispatch_triton", ("out",))
    p = _presets()["26b-a4b"]
    e, k, h = (8, 2, 64) if smoke else (p.num_experts, p.top_k_experts, p.hidden_size)
    names = ("sorted_ids", "perm", "offsets", "inv_perm", "hidden_sorted", "weights_sorted")

    def build(t, dt, variant):
        def make(r: Rand):
            ids = torch.rand((t, e), generator=r.g, device=r.device).argsort(dim=-1)[:, :k].contiguous()
            if variant == "crowded":  # every id among 3 experts: long runs, empty experts
                ids = ids % 3 + e // 2
            elif variant == "sentinel":
                ids[::3, -1] = e
            return dict(ids=ids.reshape(-1), x=r.normal((t, h), dt),
                        w=torch.rand((t * k,), generator=r.g, device=r.device))

        zero = variant == "sentinel"

        def args(i):
            return (i["ids"], i["x"], i["w"], e, k, zero)

        launch = None
        if launch_fn is not None:
            def launch(i, outs):
                return tuple(launch_fn(*args(i), out=outs))

        ref = lambda i: tuple(R.moe_dispatch_ref(*args(i)))  # noqa: E731
        return Check("moe_dispatch", variant, dt, f"T={t} E={e} k={k} H={h}", make,
                     lambda i: tuple(ops.moe_dispatch(*args(i))), launch, ref, ref, names, exact=True)

    checks = [build(t, dt, "router") for dt in dtypes for t in tokens]
    checks += [build(t, torch.bfloat16, v) for v in ("crowded", "sentinel") for t in tokens]
    checks.append(build(tokens[min(1, len(tokens) - 1)], torch.float32, "router"))
    return checks


def _dt(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dt]


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------

ROW_ULPS = {torch.bfloat16: (1, 2), torch.float16: (1, 2), torch.float32: (8, 8)}


@dataclass
class Result:
    op: str
    variant: str
    dtype: str
    shape: str
    path: str  # "op", "launcher-out", "graph-replay"
    ok: bool
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatch: int = 0  # elements not bit-equal to the reference
    over_1ulp: int = 0
    max_ulp: int = 0
    numel: int = 0
    worst_bound_ratio: float = 0.0  # max |out - ref| / allowed bound
    rel_l2: float = 0.0  # vs float64 truth
    rel_l2_ref: float = 0.0  # the torch reference's own, vs the truth
    problems: list = field(default_factory=list)
    seconds: float = 0.0


def compare(outs, refs, truths, names, dtype, max_mismatch: float, res: Result) -> None:
    if not isinstance(outs, (tuple, list)) or len(outs) != len(refs):
        res.problems.append(f"expected {len(refs)} outputs, got {type(outs).__name__} of {len(outs) if isinstance(outs, (tuple, list)) else '?'}")
        return
    k1, k2 = ROW_ULPS[dtype]
    for name, out, ref, tr in zip(names, outs, refs, truths):
        if tuple(out.shape) != tuple(ref.shape) or out.dtype != ref.dtype:
            res.problems.append(f"{name}: {out.dtype}{tuple(out.shape)} != reference {ref.dtype}{tuple(ref.shape)}")
            continue
        if not out.is_contiguous():
            res.problems.append(f"{name}: output not contiguous (strides {out.stride()})")
        finite_ref = torch.isfinite(ref)
        bad_nan = (~torch.isfinite(out)) & finite_ref
        if bool(bad_nan.any()):
            res.problems.append(f"{name}: {int(bad_nan.sum())}/{out.numel()} non-finite elements (unwritten?)")
            continue
        o64, r64 = out.double(), ref.double()
        d = (o64 - r64).abs()
        rowmax = r64.abs().amax(dim=-1, keepdim=True)
        bound = k1 * common.ulp_of(r64, dtype) + k2 * common.ulp_of(rowmax, dtype)
        ratio = float((d / bound).max()) if d.numel() else 0.0
        mism = int((out != ref).sum())
        # ulp counts over the significant elements (|ref| >= 1e-3 row max): near 0, a sign flip of a
        # tiny value is a huge "ulp distance" but no error worth counting (the bound covers it)
        sig = r64.abs() >= 1e-3 * rowmax
        ulps = common.ulp_distance(out.contiguous(), ref.contiguous())[sig]
        res.numel += out.numel()
        res.mismatch += mism
        res.over_1ulp += int((ulps > 1).sum())
        res.max_ulp = max(res.max_ulp, int(ulps.max()) if ulps.numel() else 0)
        res.max_abs = max(res.max_abs, float(d.max()) if d.numel() else 0.0)
        rel = d / (r64.abs() + 1e-3 * rowmax + 1e-30)
        res.max_rel = max(res.max_rel, float(rel.max()) if rel.numel() else 0.0)
        res.worst_bound_ratio = max(res.worst_bound_ratio, ratio)
        e_out, e_ref = common.rel_l2(out, tr), common.rel_l2(ref, tr)
        res.rel_l2, res.rel_l2_ref = max(res.rel_l2, e_out), max(res.rel_l2_ref, e_ref)
        if ratio > 1.0:
            idx = int((d / bound).flatten().argmax())
            res.problems.append(
                f"{name}: |out-ref| up to {float(d.max()):.3g} ({ratio:.1f}x the bound; e.g. got "
                f"{float(o64.flatten()[idx]):.6g} ref {float(r64.flatten()[idx]):.6g})"
            )
        if dtype != torch.float32 and mism > max(1, int(max_mismatch * out.numel())):
            res.problems.append(f"{name}: {mism}/{out.numel()} elements not bit-equal (> {max_mismatch:.1%})")
        if e_out > 1.5 * e_ref + 1e-6:
            res.problems.append(f"{name}: rel L2 vs float64 {e_out:.3g} > 1.5x the reference's {e_ref:.3g}")
    res.ok = not res.problems


def compare_exact(outs, refs, names, res: Result) -> None:
    """Every output equal to the reference, element for element (shape, dtype, contiguity too)."""
    if not isinstance(outs, (tuple, list)) or len(outs) != len(refs):
        got = len(outs) if isinstance(outs, (tuple, list)) else "?"
        res.problems.append(f"expected {len(refs)} outputs, got {got}")
        return
    for name, out, ref in zip(names, outs, refs):
        if tuple(out.shape) != tuple(ref.shape) or out.dtype != ref.dtype:
            res.problems.append(f"{name}: {out.dtype}{tuple(out.shape)} != reference {ref.dtype}{tuple(ref.shape)}")
            continue
        if not out.is_contiguous():
            res.problems.append(f"{name}: output not contiguous (strides {out.stride()})")
        bad = out != ref
        if ref.is_floating_point():
            bad &= ~(torch.isnan(out) & torch.isnan(ref))
        n_bad = int(bad.sum())
        res.numel += out.numel()
        res.mismatch += n_bad
        if n_bad:
            first = int(bad.flatten().nonzero()[0]) if bad.dim() else 0
            res.problems.append(f"{name}: {n_bad}/{out.numel()} elements differ (first at flat index {first}: "
                                f"got {out.flatten()[first].item()} ref {ref.flatten()[first].item()})")
    res.ok = not res.problems


def poison(shape, dtype, device) -> torch.Tensor:
    """NaN for float outputs, -7 (no valid id, position or count) for integer ones."""
    return torch.full(shape, NAN if dtype.is_floating_point else -7, dtype=dtype, device=device)


def poison_allocator(like: tuple, device) -> None:
    """Fill cached-allocator blocks of the outputs' sizes with NaN (ints: -7), then free them."""
    if not common.is_cuda(device):
        return
    bufs = [poison(t.shape, t.dtype, device) for t in like]
    del bufs


def run_check(chk: Check, seed: int, device, args) -> list[Result]:
    t0 = time.perf_counter()
    base = dict(op=chk.op, variant=chk.variant, dtype=_dt(chk.dtype), shape=chk.shape)
    results = []
    try:
        inputs = chk.make(Rand(device, seed))
        refs = tuple(chk.reference(inputs))
        truths = tuple(chk.truth(inputs))
    except Exception as e:  # noqa: BLE001
        return [Result(**base, path="setup", ok=False, problems=[f"{type(e).__name__}: {e}"])]
    paths = [("op", lambda: chk.call_op(inputs))]
    if chk.call_launcher is not None and (common.is_cuda(device) or os.environ.get("TRITON_INTERPRET") == "1"):
        def via_launcher():
            outs = tuple(poison(r.shape, r.dtype, device) for r in refs)
            got = chk.call_launcher(inputs, outs)
            for g, o in zip(got, outs):
                if g.data_ptr() != o.data_ptr():
                    raise AssertionError("launcher did not write into the given out= buffer")
            return got
        paths.append(("launcher-out", via_launcher))
    for path, fn in paths:
        r = Result(**base, path=path, ok=False)
        try:
            poison_allocator(refs, device)
            outs = fn()
            common.sync(device)
            if chk.exact:
                compare_exact(tuple(outs), refs, chk.out_names, r)
            else:
                compare(tuple(outs), refs, truths, chk.out_names, chk.dtype, args.max_mismatch, r)
        except Exception as e:  # noqa: BLE001
            r.problems.append(f"{type(e).__name__}: {str(e)[:300]}")
            if args.verbose:
                traceback.print_exc()
        r.ok = not r.problems
        r.seconds = time.perf_counter() - t0
        results.append(r)
    return results


def graph_replay_check(chk: Check, seed: int, device, args) -> Result:
    """Capture the op once on static inputs, copy fresh inputs in, replay, compare."""
    r = Result(op=chk.op, variant=chk.variant, dtype=_dt(chk.dtype), shape=chk.shape, path="graph-replay", ok=False)
    try:
        static = chk.make(Rand(device, seed))
        g, outs = common.capture_graph(lambda: chk.call_op(static))
        fresh = chk.make(Rand(device, seed + 1))
        with torch.no_grad():
            for k, v in static.items():
                if isinstance(v, torch.Tensor) and fresh[k] is not None:
                    v.copy_(fresh[k])  # k = v aliases copy twice: same values
        for o in outs:
            o.fill_(NAN if o.dtype.is_floating_point else -7)
        g.replay()
        torch.cuda.synchronize()
        refs, truths = tuple(chk.reference(static)), tuple(chk.truth(static))
        if chk.exact:
            compare_exact(tuple(outs), refs, chk.out_names, r)
        else:
            compare(tuple(outs), refs, truths, chk.out_names, chk.dtype, args.max_mismatch, r)
        del g
    except Exception as e:  # noqa: BLE001
        r.problems.append(f"{type(e).__name__}: {str(e)[:300]}")
    r.ok = not r.problems
    return r


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def build_checks(args) -> list[Check]:
    smoke = args.smoke
    if args.tokens:
        tokens = [int(t) for t in args.tokens.split(",")]
    elif smoke:
        tokens = [1, 7]
    elif args.quick:
        tokens = [1, 7, 1000, 8192]
    else:
        tokens = [1, 7, 128, 1000, 8192]
    dtypes = [torch.bfloat16, torch.float16]
    hid = hidden_sizes(smoke)
    fp32_t = 7 if smoke else 128
    fp32_h = hid[0] if smoke else 2560
    checks = []
    families = set(args.ops.split(",")) if args.ops else {"norm", "gelu", "qkv", "moe"}
    if "norm" in families:
        checks += norm_checks(hid, tokens, dtypes, smoke, (fp32_h, fp32_t))
    if "gelu" in families:
        checks += gelu_checks(gelu_widths(smoke), tokens, dtypes, smoke, fp32_t)
    if "qkv" in families:
        checks += qkv_checks(head_layouts(smoke), tokens, dtypes, smoke, fp32_t)
    if "moe" in families:  # decode sizes (the fusion's target) and the sweep's
        moe_t = tokens if smoke or args.tokens else sorted(set(tokens) | {8, 64, 512})
        checks += dispatch_checks(moe_t, dtypes, smoke)
    return checks


def summarize(results: list[Result]) -> list[list]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.variant, r.dtype, r.path), []).append(r)
    rows = []
    for (op, variant, dt, path), rs in groups.items():
        numel = sum(r.numel for r in rs) or 1
        rows.append([
            op, variant, dt, path, len(rs),
            common.fmt_e(max(r.max_abs for r in rs)),
            common.fmt_e(max(r.max_rel for r in rs)),
            f"{sum(r.mismatch for r in rs) / numel:.2e}",
            sum(r.over_1ulp for r in rs),
            max(r.max_ulp for r in rs),
            f"{max(r.worst_bound_ratio for r in rs):.2f}",
            f"{max((r.rel_l2 / r.rel_l2_ref) if r.rel_l2_ref else (0.0 if r.rel_l2 == 0 else math.inf) for r in rs):.2f}",
            "ok" if all(r.ok for r in rs) else f"FAIL({sum(not r.ok for r in rs)})",
        ])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap)
    ap.add_argument("--quick", action="store_true", help="token counts 1, 7, 1000, 8192 only")
    ap.add_argument("--tokens", default=None, help="comma list of token counts (overrides the default sweep)")
    ap.add_argument("--ops", default=None, help="comma list of op families: norm,gelu,qkv,moe (default all)")
    ap.add_argument("--dtypes", default=None, help="comma list among bf16,fp16,fp32 (default all)")
    ap.add_argument("--max-mismatch", type=float, default=0.03,
                    help="largest share of elements allowed to differ from the reference (bf16/fp16)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new checks after this many seconds (the rest count as failures)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    device = common.resolve_device(args.device)
    info = common.env_info(device)
    common.print_env(info)
    common.seed_all(args.seed)
    if not common.is_cuda(device):
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        print(f"# {device}: the ops run their torch reference here; Triton launchers "
              f"{'run in the Triton interpreter' if interp else 'skipped (set TRITON_INTERPRET=1 to run them)'}")

    t_start = time.perf_counter()
    checks = build_checks(args)
    if args.dtypes:
        keep = set(args.dtypes.split(","))
        checks = [c for c in checks if _dt(c.dtype) in keep]
    # bf16 of every family first, then fp16, then fp32: a budget cut keeps the dtype that matters most
    rank = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
    checks.sort(key=lambda c: rank[c.dtype])
    budget = common.Budget(args.budget_s)
    not_run: list[str] = []
    print(f"# {len(checks)} checks", flush=True)
    results: list[Result] = []
    with torch.inference_mode():
        for n, chk in enumerate(checks):
            if budget.left() <= 0:
                not_run.append(f"{chk.op}[{chk.variant}] {_dt(chk.dtype)} {chk.shape}")
                continue
            results += run_check(chk, args.seed * 100_003 + n, device, args)
            if n % 50 == 49:
                print(f"#   {n + 1}/{len(checks)} checks, {time.perf_counter() - t_start:.0f}s", flush=True)
    if common.is_cuda(device) and budget.left() > 0:  # one CUDA-graph replay per op and dtype
        picked: dict[tuple, int] = {}
        for n, chk in enumerate(checks):  # prefer a 7-token case of each (op, dtype)
            key = (chk.op, chk.dtype)
            if key not in picked or (("T=7 " in chk.shape or "S=7 " in chk.shape) and "T=7 " not in checks[picked[key]].shape
                                     and "S=7 " not in checks[picked[key]].shape):
                picked[key] = n
        for n in picked.values():
            results.append(graph_replay_check(checks[n], args.seed * 100_003 + 50_000 + n, device, args))
    elapsed = time.perf_counter() - t_start

    headers = ["op", "variant", "dtype", "path", "checks", "max abs", "max rel", "not-equal frac", ">1ulp",
               "max ulp", "err/bound", "L2 vs ref", "status"]
    rows = summarize(results)
    print()
    print(common.md_table(headers, rows))
    failures = [r for r in results if not r.ok]
    print()
    if failures:
        print(f"FAILURES ({len(failures)}):")
        for r in failures[:60]:
            print(f"  {r.op}[{r.variant}] {r.dtype} {r.shape} via {r.path}: " + "; ".join(r.problems))
        if len(failures) > 60:
            print(f"  ... {len(failures) - 60} more in the JSON")
    if not_run:
        print(f"INCOMPLETE: {len(not_run)} checks not run (budget {args.budget_s}s), e.g. {not_run[:3]}")
    n_checks = len(results)
    print(f"{'FAIL' if failures or not_run else 'PASS'}: {n_checks - len(failures)}/{n_checks} comparisons passed "
          f"({len(checks) - len(not_run)} random input sets) in {elapsed:.0f}s on {info.get('gpu', device)}")
    print("columns: max abs / max rel = worst |out - ref| (rel: over |ref| + 1e-3 row max); not-equal frac = "
          "share of elements not bit-equal to the torch reference; >1ulp / max ulp over elements with |ref| >= "
          "1e-3 row max; err/bound = worst |out - ref| over the "
          "allowed 1 ulp(ref) + 2 ulp(row max) (fp32: 8 + 8); L2 vs ref = worst ratio of rel-L2 errors vs the "
          "float64 truth, fused over torch reference (<= 1.5 passes)")
    common.write_json(common.json_path(args, "check_kernels.json"),
                      dict(env=info, elapsed_s=elapsed, passed=not failures and not not_run, not_run=not_run,
                           summary=dict(headers=headers, rows=rows), results=results))
    return 1 if failures or not_run else 0


if __name__ == "__main__":
    sys.exit(main())

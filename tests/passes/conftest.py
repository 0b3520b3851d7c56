"""Shared helpers for the fusion-pass tests (CPU).

Every compile here runs with exactly one gemma4_passes pass in Inductor's
``post_grad_custom_pre_pass`` slot, caches forced off and Dynamo reset first, under
``torch.no_grad()``:

* the graph AFTER a fusion is captured by a callable chained after ours
  (``build_pass([name], chained=capture)``);
* the graph BEFORE it comes from the same function compiled with a capture pass and no
  fusions (``build_pass([], chained=capture)``), which is also "Inductor alone", the
  baseline of the low-precision parity checks. Where that baseline is not needed (fp32
  outputs, cases that must not match) the capture pass with no fusions runs in front of
  the fusion in the same compile instead (compiles are what these tests spend their time on);
* graph-only tests use :func:`capture_graph`, which stops the compile right after capturing.

The test modules import these helpers with ``from .conftest import ...``
(``tests/passes`` is a package).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytest
import torch

import gemma4_passes
from gemma4_passes import build_pass, match_report, reset_match_report
from gemma4_passes.kernels import ensure_registered



@pytest.fixture(autouse=True)
def _strict_passes(monkeypatch):
    """A fusion that raises fails the test instead of being logged and skipped (this directory only)."""
    monkeypatch.setenv("GEMMA4_PASSES_STRICT", "1")
ensure_registered()

aten = torch.ops.aten
g4 = torch.ops.gemma4_passes

DT_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LOW_PRECISION_RATIO = 1.5  # passes' error vs eager at most 1.5x Inductor-alone's ...
FP32_REL_TOL = 1e-5


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# --------------------------------------------------------------------------------------------
# the math, spelled the way real code spells it
# --------------------------------------------------------------------------------------------


def rms_hf(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF ``Gemma4RMSNorm.forward``: fp32 math, ``pow(., -0.5)``, ``w.float()``, ``type_as``."""
    h = x.float()
    y = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        y = y * w.float()
    return y.type_as(x)


def rms_sgl(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """SGLang ``RMSNorm.forward_native`` (no residual): rsqrt, uncast weight (the mul promotes)."""
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    x = (x * w).to(orig_dtype)
    return x


def sgl_fused_add_rms(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float):
    """SGLang ``forward_native`` WITH residual: the add is done in fp32 and the norm reads the
    unrounded fp32 sum. Returns (normed, new_residual)."""
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    x = x + residual.to(torch.float32)
    residual = x.to(orig_dtype)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    x = (x * w).to(orig_dtype)
    return x, residual


def rms_gemma3(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma-2/3 norm: ``x * (1 + w)`` (NOT Gemma-4's)."""
    h = x.float()
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = y * (1.0 + w.float())
    return y.type_as(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_half_wrong(x: torch.Tensor) -> torch.Tensor:
    """Not HF's rotate_half: ``cat((x2, -x1))`` (the opposite rotation)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((x2, -x1), dim=-1)


def apply_rope(x, cos, sin, unsqueeze_dim=2, rotate=rotate_half):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (x * cos) + (rotate(x) * sin)


def weight(n: int, dtype=torch.float32) -> torch.Tensor:
    """A norm weight around 1 (Gemma-4 weights are used as ``w``, not ``1 + w``)."""
    return (1 + 0.3 * torch.randn(n)).to(dtype)


def act(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


def rope_tables(b: int, s: int, d: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, D] as HF's rotary embedding produces them (already in the io dtype)."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.arange(s).float()[None, :].expand(b, s) + torch.arange(b).float()[:, None]
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class ToyDecoder(torch.nn.Module):
    """Toy dense decoder layers: input norm -> 'attention' GEMM -> post-attn norm + residual ->
    pre-FF norm -> 'MLP' GEMM -> post-FF norm + residual -> * layer_scalar. Per layer: one
    post_attn_norm site and one ffn_tail site (whose next norm is the next layer's input norm)."""

    def __init__(self, hidden, dtype, eps, layers=2):
        super().__init__()
        self.eps, self.layers = eps, layers
        mk = lambda: torch.nn.Parameter(weight(hidden, dtype), requires_grad=False)  # noqa: E731
        self.w = torch.nn.ParameterList([mk() for _ in range(4 * layers)])
        self.attn = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype) for _ in range(layers)])
        self.mlp = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype) for _ in range(layers)])
        self.register_buffer("layer_scalar", torch.tensor([0.75], dtype=dtype))

    def forward(self, x):
        for l in range(self.layers):
            w_in, w_post, w_pre, w_ff = self.w[4 * l : 4 * l + 4]
            residual = x
            h = self.attn[l](rms_hf(x, w_in, self.eps))
            x = residual + rms_hf(h, w_post, self.eps)
            residual = x
            h = self.mlp[l](rms_hf(x, w_pre, self.eps))
            x = (residual + rms_hf(h, w_ff, self.eps)) * self.layer_scalar
        return x


# --------------------------------------------------------------------------------------------
# compiling with one pass, capturing graphs
# --------------------------------------------------------------------------------------------


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A detached copy of a post-grad graph (node meta, fake values included, is kept)."""
    g = torch.fx.Graph()
    out = g.graph_copy(graph, {})
    g.output(out)
    return g


@dataclass
class Run:
    out: Any
    graphs: list  # post-grad graphs, copied right after the slot's pass ran
    matches: dict  # gemma4_passes.match_report() for this compile
    graphs_seen: int

    @property
    def graph(self) -> torch.fx.Graph:
        assert len(self.graphs) == 1, f"expected one graph, got {len(self.graphs)}"
        return self.graphs[0]

    def count(self, target) -> int:
        return count_ops(self.graphs, target)


@contextlib.contextmanager
def _slot(p):
    """``p`` alone in the pre slot, caches forced off. ``force_disable_caches`` makes Inductor
    write every compile into a new directory under its cache dir and keep it; the enclosing
    ``fresh_cache`` puts those under a temporary directory removed afterwards (the compiled
    code has been loaded and run by then; precompiled headers stay in the default dir)."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache(), torch._inductor.config.patch(post_grad_custom_pre_pass=p, force_disable_caches=True):
        yield


class _CaptureThen:
    """Copy the graph as it is, then run ``then`` (the pass under test) on it."""

    def __init__(self, sink: list, then: Callable):
        self.sink, self.then = sink, then

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.sink.append(copy_graph(graph))
        self.then(graph)


def compile_run(
    fn: Callable, args: Sequence, fusions: Sequence[str], *, dynamic=None, before: list | None = None
) -> Run:
    """Compile ``fn`` with ONLY ``build_pass(fusions)`` in the pre slot and run it once.

    The graph after the fusions is captured by a callable chained after them. With ``before``
    (a list), the graph is also copied into it right before the fusions run, by a capture pass
    with no fusions in front of them (saves a second compile where Inductor-alone's output is
    not needed).
    """
    graphs: list = []

    def capture(graph: torch.fx.Graph) -> None:
        graphs.append(copy_graph(graph))

    p = build_pass(list(fusions), chained=capture)
    if before is not None:
        p = build_pass([], chained=_CaptureThen(before, p))
    torch._dynamo.reset()
    reset_match_report()
    try:
        with _slot(p), torch.no_grad():
            compiled = torch.compile(fn, dynamic=dynamic, fullgraph=True)
            out = compiled(*args)
        return Run(out, graphs, match_report(), gemma4_passes.report.graphs_seen())
    finally:
        torch._dynamo.reset()


class _GraphCaptured(Exception):
    """Raised by :func:`capture_graph`'s pass: the graph is all it needs, skip code generation."""


def capture_graph(fn: Callable, args: Sequence, *, dynamic=None) -> torch.fx.Graph:
    """The post-grad graph of ``fn`` as the passes see it: a capture pass with no fusions in the
    slot (``build_pass([], chained=capture)``). Compilation is cut short right after it."""
    graphs: list = []

    def capture(graph: torch.fx.Graph) -> None:
        graphs.append(copy_graph(graph))
        raise _GraphCaptured

    p = build_pass([], chained=capture)
    torch._dynamo.reset()
    try:
        with _slot(p), torch.no_grad():
            try:
                torch.compile(fn, dynamic=dynamic, fullgraph=True)(*args)
            except Exception as e:  # Dynamo wraps it (BackendCompilerFailed)
                if not graphs or not _caused_by(e, _GraphCaptured):
                    raise
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0]


def _caused_by(e: BaseException, cls) -> bool:
    while e is not None:
        if isinstance(e, cls):
            return True
        e = e.__cause__ or e.__context__
    return False


def eager(fn: Callable, args: Sequence):
    with torch.no_grad():
        return fn(*args)


def count_ops(graphs, target) -> int:
    """How many ``call_function`` nodes call ``target`` (an OpOverload, or a packet: any overload)."""
    n = 0
    for g in graphs if isinstance(graphs, (list, tuple)) else [graphs]:
        for node in g.nodes:
            if node.op != "call_function":
                continue
            t = node.target
            if t is target or getattr(t, "overloadpacket", None) is target:
                n += 1
    return n


def op_histogram(graphs) -> Counter:
    c = Counter()
    for g in graphs if isinstance(graphs, (list, tuple)) else [graphs]:
        for node in g.nodes:
            if node.op == "call_function":
                c[str(node.target)] += 1
    return c


# --------------------------------------------------------------------------------------------
# one test case: eager, Inductor alone (graph before), Inductor + one fusion (graph after)
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    fusion: str
    eager: Any
    before: Run  # graph BEFORE the fusion (and, when compiled on its own, Inductor alone)
    after: Run  # Inductor + the fusion: graph AFTER it
    inductor_out: Any  # Inductor alone's output (the baseline of the low-precision checks)

    @property
    def n(self) -> int:
        """This fusion's match count."""
        return self.after.matches[self.fusion]

    def assert_only(self, n: int) -> None:
        """``n`` matches of this fusion and none of any other (only it was enabled)."""
        expected = {name: 0 for name in self.after.matches}
        expected[self.fusion] = n
        assert self.after.matches == expected, (self.after.matches, op_histogram(self.after.graphs))

    def removed(self, target) -> tuple[int, int]:
        return self.before.count(target), self.after.count(target)

    def assert_replaced(self, targets: dict, fused: dict) -> None:
        """``targets``: op -> how many of them the matches remove (None: all of them, the op must
        then be absent after). ``fused``: custom op -> how many must be present after."""
        for t, k in targets.items():
            b, a = self.removed(t)
            if k is None:
                assert b > 0 and a == 0, f"{t}: {b} before, {a} after (expected all gone)"
            else:
                assert b - a == k, f"{t}: {b} before, {a} after (expected {k} removed)"
        for op, k in fused.items():
            assert self.before.count(op) == 0
            assert self.after.count(op) == k, f"{op}: {self.after.count(op)} after, expected {k}"

    def assert_unchanged(self) -> None:
        """No match: the graph after is the graph before, op for op, and no fused op in it."""
        assert op_histogram(self.after.graphs) == op_histogram(self.before.graphs)
        for op in FUSED_OPS:
            assert self.after.count(op) == 0

    def assert_parity(self, dtype: torch.dtype | None = None) -> None:
        assert_parity(self.after.out, self.eager, self.inductor_out, dtype)


FUSED_OPS = (g4.rmsnorm_add, g4.rmsnorm_add_rmsnorm, g4.gelu_tanh_mul, g4.q_norm_rope, g4.qkv_norm_rope,
             g4.moe_input_norms, g4.moe_branch_combine, g4.moe_router, g4.moe_dispatch)


def run_case(fn: Callable, args: Sequence, fusion: str, *, dynamic=None, baseline: bool | None = None) -> Case:
    """Eager, then the compile with ``fusion``; Inductor alone is compiled separately only when
    needed (``baseline``; default: when an output is bf16/fp16). Without it, the graph before
    is captured in the same compile, right before the fusion runs, and the compiled output
    serves as Inductor-alone's (exact for a case that must not match)."""
    ref = eager(fn, args)
    if baseline is None:
        baseline = any(t.dtype != torch.float32 for t in _flat(ref))
    if baseline:
        before = compile_run(fn, args, [], dynamic=dynamic)
        after = compile_run(fn, args, [fusion], dynamic=dynamic)
        return Case(fusion, ref, before, after, before.out)
    graphs: list = []
    after = compile_run(fn, args, [fusion], dynamic=dynamic, before=graphs)
    before = Run(None, graphs, {}, len(graphs))
    return Case(fusion, ref, before, after, after.out)


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    res = []
    for o in out:
        res.extend(_flat(o))
    return res


def assert_parity(got, ref, inductor, dtype: torch.dtype | None = None) -> None:
    """Compiled-with-pass output vs eager.

    fp32: max |got - ref| / max |ref| <= 1e-5.
    bf16/fp16: error vs eager no worse than 1.5x Inductor-alone's (+ a one-ulp floor at the
    output's scale); bf16 additionally within bf16 tolerance of eager.
    """
    got, ref, inductor = _flat(got), _flat(ref), _flat(inductor)
    assert len(got) == len(ref) == len(inductor)
    for i, (g, r, ind) in enumerate(zip(got, ref, inductor)):
        assert g.shape == r.shape and g.dtype == r.dtype, (i, g.shape, r.shape, g.dtype, r.dtype)
        assert torch.isfinite(g).all(), f"output {i}: non-finite values"
        dt = dtype or r.dtype
        gf, rf, indf = g.float(), r.float(), ind.float()
        scale = rf.abs().max().item()
        err = (gf - rf).abs().max().item()
        if r.dtype == torch.float32:
            assert err <= FP32_REL_TOL * scale, f"output {i}: fp32 rel err {err / scale:.3g} > {FP32_REL_TOL}"
            continue
        ind_err = (indf - rf).abs().max().item()
        floor = torch.finfo(dt).eps * scale
        assert err <= LOW_PRECISION_RATIO * ind_err + floor, (
            f"output {i}: passes err {err:.3g} vs Inductor-alone err {ind_err:.3g} (floor {floor:.3g})"
        )
        if r.dtype == torch.bfloat16:
            # bf16 tolerance, absolute part at the output's scale (values that cancel in a
            # residual add carry the rounding of their larger operands)
            torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1.6e-2 * scale, msg=lambda m: f"output {i}: {m}")

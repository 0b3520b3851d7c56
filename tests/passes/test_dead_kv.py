"""kv_shared_dead_kv: a KV-shared layer's merged QKV GEMM shrinks to its q columns.

The toy is SGLang 0.5.23's ``Gemma4Attention.forward`` on its torch.compile path
(``gemma4_causal.py`` 448-544, norms and RoPE in their ``forward_native`` form): one merged
``F.linear`` over a [(q_heads + 2 kv_heads) * D, hidden] weight, ``split([q, kv, kv], -1)``,
``Gemma4RMSNorm.forward_native`` on q (and k, v in non-shared layers), ``RotaryEmbedding.forward_native``
on q and on k (a dummy ``zeros_like(q[:, :kv])`` in shared layers, its result dropped), an
attention op called with ``k = v = None`` in shared layers (which read the K/V of the last
non-shared layer, as SGLang's attention reads that layer's cache), then ``o_proj``.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

import gemma4_passes
from gemma4_passes import manager
from gemma4_passes.passes.dead_kv import KvSharedDeadKv, find_dead_kv_gemms, live_nodes
from gemma4_passes.runtime import piecewise_backend, register_split_op, unregister_split_op

from .conftest import DT_IDS, _slot, act, aten, capture_graph, copy_graph, count_ops, eager, run_case, weight

FUSION = "kv_shared_dead_kv"
T, HIDDEN, NQ, NK, D = 5, 72, 4, 2, 16
Q_SIZE, KV_SIZE = NQ * D, NK * D
N_QKV = Q_SIZE + 2 * KV_SIZE
EPS = 1e-6
MAX_POS = 64


# ---------------------------------------------------------------------------------------------
# the attention stand-in (a split op in the piecewise test) and a KV-cache write
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("g4test_dead_kv::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
    shared_k: Optional[torch.Tensor], shared_v: Optional[torch.Tensor],
) -> torch.Tensor:
    """Softmax attention (scaling 1.0, GQA). k/v None: a KV-shared layer, reads shared_k/v."""
    if k is None:
        k, v = shared_k, shared_v
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float())
    return torch.einsum("hts,shd->thd", scores.softmax(-1), v.float()).to(q.dtype).contiguous()


@attention.register_fake
def _(q, k, v, shared_k, shared_v):
    return torch.empty_like(q)


@torch.library.custom_op("g4test_dead_kv::save_kv", mutates_args=("cache",))
def save_kv(cache: torch.Tensor, k: torch.Tensor) -> None:
    """A KV-cache write: mutates a buffer, returns nothing."""
    cache.copy_(k)


@save_kv.register_fake
def _(cache, k):
    return None


ATTENTION = torch.ops.g4test_dead_kv.attention


# ---------------------------------------------------------------------------------------------
# SGLang's forward_native math
# ---------------------------------------------------------------------------------------------


def sgl_gemma4_rmsnorm(x, w, eps=EPS, scale_shift=0.0):
    """``Gemma4RMSNorm.forward_native`` (w None: ``with_scale=False``)."""
    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if w is not None:
        normed = normed * (w.float() + scale_shift)
    return normed.type_as(x)


def sgl_apply_rotary_emb(x, cos, sin):
    """``rotary_embedding/utils.py::apply_rotary_emb``, neox style."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sgl_rope_native(cos_sin_cache, positions, query, key, head_size=D, rotary_dim=D):
    """``RotaryEmbedding.forward_native``: rotates query AND key, returns both."""
    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    out = []
    for x in (query, key):
        shape = x.shape
        x = x.view(num_tokens, -1, head_size)
        rot = sgl_apply_rotary_emb(x[..., :rotary_dim], cos, sin)
        out.append(torch.cat((rot, x[..., rotary_dim:]), dim=-1).reshape(shape))
    return out[0], out[1]


def cos_sin_cache(dtype, theta=10000.0):
    inv = 1.0 / (theta ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.einsum("i,j->ij", torch.arange(MAX_POS).float(), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


class SglAttention(torch.nn.Module):
    """``Gemma4Attention.forward`` (torch.compile path). ``kv_use`` makes a shared layer's own
    K live anyway (near misses): "cache_write" writes its normed K into a cache buffer with a
    mutating op, "output" returns it; ``gemm_use`` reads the whole QKV output elsewhere."""

    def __init__(self, dtype, *, shared, bias=False, slices=False, kv_use=None, gemm_use=False):
        super().__init__()
        self.shared, self.slices, self.kv_use, self.gemm_use = shared, slices, kv_use, gemm_use
        p = lambda t: torch.nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.qkv_weight = p(act(N_QKV, HIDDEN, dtype=dtype, scale=HIDDEN ** -0.5))
        self.qkv_bias = p(act(N_QKV, dtype=dtype, scale=0.1)) if bias else None
        self.o_weight = p(act(HIDDEN, Q_SIZE, dtype=dtype, scale=Q_SIZE ** -0.5))
        self.q_norm, self.k_norm = p(weight(D, dtype)), p(weight(D, dtype))
        if kv_use == "cache_write":
            self.register_buffer("k_cache", torch.zeros(T, NK, D, dtype=dtype))

    def _split(self, qkv):
        if self.slices:  # the same split spelled as slices
            return qkv[..., :Q_SIZE], qkv[..., Q_SIZE:Q_SIZE + KV_SIZE], qkv[..., Q_SIZE + KV_SIZE:]
        return qkv.split([Q_SIZE, KV_SIZE, KV_SIZE], dim=-1)

    def forward(self, positions, hidden_states, cache, shared_kv):
        qkv = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)  # QKVParallelLinear
        q, k, v = self._split(qkv)
        q = sgl_gemma4_rmsnorm(q.unflatten(-1, (NQ, D)), self.q_norm).flatten(-2, -1)
        extra = []
        if self.shared:
            if self.kv_use is not None:
                k_own = sgl_gemma4_rmsnorm(k.unflatten(-1, (NK, D)), self.k_norm)
                if self.kv_use == "cache_write":
                    save_kv(self.k_cache, k_own.reshape(-1, NK, D))
                else:
                    extra.append(k_own)
            k = v = None
            dummy_k = torch.zeros_like(q[..., :KV_SIZE])
            q, _ = sgl_rope_native(cache, positions, q, dummy_k)
        else:
            k = sgl_gemma4_rmsnorm(k.unflatten(-1, (NK, D)), self.k_norm)
            v = sgl_gemma4_rmsnorm(v.unflatten(-1, (NK, D)), None)
            q, k = sgl_rope_native(cache, positions, q, k.flatten(-2, -1))
            k = k.unflatten(-1, (NK, D))
        q = q.unflatten(-1, (NQ, D))
        lead = q.shape[:-2]
        q2, k2, v2 = (x.reshape(-1, *x.shape[-2:]) if x is not None else None for x in (q, k, v))
        attn = ATTENTION(q2, k2, v2, *(shared_kv if self.shared else (None, None)))
        out = F.linear(attn.reshape(*lead, Q_SIZE), self.o_weight)
        if self.gemm_use:
            out = out + qkv.float().pow(2).mean(-1, keepdim=True).to(out.dtype)
        return out, (k2, v2), extra


class SglDecoder(torch.nn.Module):
    """A non-shared layer (its K/V feed its attention and the later layers'), then KV-shared ones."""

    def __init__(self, dtype, *, n_shared=2, **shared_kw):
        super().__init__()
        shared = [SglAttention(dtype, shared=True, **shared_kw) for _ in range(n_shared)]
        self.layers = torch.nn.ModuleList([SglAttention(dtype, shared=False), *shared])
        self.register_buffer("cache", cos_sin_cache(dtype))

    def forward(self, positions, h):
        shared_kv, extras = None, []
        for layer in self.layers:
            out, kv, extra = layer(positions, h, self.cache, shared_kv)
            shared_kv = shared_kv or kv  # the last non-shared layer's K/V
            h = h + out
            extras += extra
        return (h, *extras) if extras else h


def _inputs(dtype, shape=(T,)):
    """(positions [tokens], hidden states [*shape, hidden])."""
    return torch.arange(3, 3 + math.prod(shape)), act(*shape, HIDDEN, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# graph helpers
# ---------------------------------------------------------------------------------------------


def gemm_weights(graph) -> list[tuple]:
    """Shape of each GEMM's weight: W for ``mm(x, permute(W, [1, 0]))``, else the operand."""
    shapes = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target in (aten.mm.default, aten.addmm.default):
            b = n.args[-1]
            if b.target is aten.permute.default and list(b.args[1]) == [1, 0]:
                b = b.args[0]
            shapes.append(tuple(b.meta["val"].shape))
    return sorted(shapes)


QKV_FULL, QKV_Q, O_PROJ = (N_QKV, HIDDEN), (Q_SIZE, HIDDEN), (HIDDEN, Q_SIZE)


# ---------------------------------------------------------------------------------------------
# matches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
def test_sglang_shared_layers_gemm_shrinks(dtype):
    model = SglDecoder(dtype, n_shared=2)
    case = run_case(model, _inputs(dtype), FUSION)
    case.assert_only(2)  # one per KV-shared layer; the non-shared layer is left alone
    assert gemm_weights(case.before.graph) == sorted([QKV_FULL] * 3 + [O_PROJ] * 3)
    assert gemm_weights(case.after.graph) == sorted([QKV_FULL] + [QKV_Q] * 2 + [O_PROJ] * 3)
    assert case.removed(aten.split_with_sizes.default) == (3, 1)  # the non-shared layer's split stays
    # only the GEMM changed: q's norm/RoPE, the non-shared layer's k/v work untouched
    for op in (aten.mean.dim, aten.pow.Tensor_Scalar, aten.cat.default, aten.index.Tensor):
        b, a = case.removed(op)
        assert b == a > 0, (op, b, a)
    w_rows = [n for n in case.after.graph.nodes
              if n.target is aten.slice.Tensor and n.args[0].op == "placeholder"]
    assert len(w_rows) == 2
    for w_q in w_rows:  # rows [0, q) of W, a contiguous view, feed the GEMM through its transpose
        assert w_q.args[1:] == (0, 0, Q_SIZE) and w_q.meta["val"].is_contiguous()
        (t,) = w_q.users
        assert t.target is aten.permute.default and [u.target for u in t.users] == [aten.mm.default]
    case.assert_parity()


def test_dummy_rope_and_kv_ops_gone():
    """Dynamo's graph holds the dummy K (``zeros_like``) and its rotation in every shared layer;
    after AOTAutograd's dead-code elimination and the pass, none of it and no K/V column is left:
    one norm per live q/k/v, one RoPE ``cat`` per live q/k."""
    dtype = torch.float32
    model, args = SglDecoder(dtype, n_shared=2), _inputs(dtype)
    dynamo_ops = _dynamo_ops(model, args)
    assert dynamo_ops[torch.zeros_like] == 2
    assert dynamo_ops[torch.cat] == 3 * 2 * 2  # q and k (dummy or real) per layer, 2 cats each
    case = run_case(model, args, FUSION)
    after = case.after.graph
    assert count_ops(after, aten.full.default) == count_ops(after, aten.zeros_like.default) == 0
    assert count_ops(after, aten.cat.default) == 3 + 1  # q of 3 layers, k of the non-shared one
    assert count_ops(after, aten.mean.dim) == 3 + 2  # q norms, k and v norms of the non-shared one
    assert gemm_weights(after).count(QKV_FULL) == 1
    case.assert_parity()


def _dynamo_ops(fn, args):
    from collections import Counter

    ops = Counter()

    def backend(gm, example_inputs):
        ops.update(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(fn, backend=backend, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    return ops


@pytest.mark.parametrize("variant", ["bias", "slices", "tokens_3d"])
def test_other_spellings(variant):
    # addmm with a sliced bias; q/k/v as slices instead of split; [B, S, H] input (reshape
    # between the GEMM and the split)
    dtype = torch.float32
    model = SglDecoder(dtype, n_shared=1, bias=variant == "bias", slices=variant == "slices")
    args = _inputs(dtype, (2, 3) if variant == "tokens_3d" else (T,))
    case = run_case(model, args, FUSION)
    case.assert_only(1)
    assert gemm_weights(case.after.graph).count(QKV_Q) == 1
    if variant == "bias":
        (addmm,) = [n for n in case.after.graph.nodes if n.target is aten.addmm.default
                    and tuple(n.meta["val"].shape[-1:]) == (Q_SIZE,)]
        assert tuple(addmm.args[0].meta["val"].shape) == (Q_SIZE,)
    case.assert_parity()


def test_graph_still_holding_dead_kv_work_is_cleaned():
    """A graph that still computes the shared layer's K norm (no DCE ran before the pass):
    the norm goes with the K/V columns."""
    dtype = torch.float32
    model = SglDecoder(dtype, n_shared=1, kv_use="output")
    graph = capture_graph(model, _inputs(dtype))
    out = next(n for n in graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0][:1]),)  # drop the shared layer's K: its norm is dead, still there
    means_before = count_ops(graph, aten.mean.dim)
    calls = lambda: {n for n in graph.nodes if n.op == "call_function"}  # noqa: E731
    assert not calls() <= live_nodes(graph)
    assert KvSharedDeadKv().apply(graph) == 1
    graph.lint()
    assert count_ops(graph, aten.mean.dim) == means_before - 1
    assert gemm_weights(graph).count(QKV_Q) == 1
    assert calls() <= live_nodes(graph)  # nothing dead left, the K norm's weight cast included


# ---------------------------------------------------------------------------------------------
# the pass inside a piecewise graph
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def attention_split_op():
    register_split_op(ATTENTION)
    yield
    unregister_split_op(ATTENTION)


def test_inside_piecewise_pieces(attention_split_op, monkeypatch):
    dtype = torch.float32
    model, args = SglDecoder(dtype, n_shared=2), _inputs(dtype)
    graphs = []
    build = manager.build_pass
    capture = lambda g: graphs.append(copy_graph(g))  # noqa: E731
    monkeypatch.setattr(manager, "build_pass", lambda fusions=None, chained=None: build(fusions, capture))
    backend = piecewise_backend([FUSION])
    torch._dynamo.reset()
    gemma4_passes.reset_match_report()
    try:
        with _slot(None), torch.no_grad():
            out = torch.compile(model, backend=backend, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    assert sum(p.is_split for p in backend.last_split.pieces) == 3  # one attention per layer
    assert gemma4_passes.match_report()[FUSION] == 2
    weights = [w for g in graphs for w in gemm_weights(g)]
    assert weights.count(QKV_FULL) == 1 and weights.count(QKV_Q) == 2
    ref = eager(model, args)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------------------------------------
# near misses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_use", ["cache_write", "output"])
def test_live_kv_no_match(kv_use):
    # the shared layer's own K is written to a cache (a mutating op) or returned: not dead
    dtype = torch.float32
    case = run_case(SglDecoder(dtype, n_shared=1, kv_use=kv_use), _inputs(dtype), FUSION)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


def test_gemm_output_used_elsewhere_no_match():
    dtype = torch.float32
    case = run_case(SglDecoder(dtype, n_shared=1, gemm_use=True), _inputs(dtype), FUSION)
    case.assert_only(0)
    case.assert_unchanged()
    case.assert_parity()


@pytest.fixture(scope="module")
def shared_graph():
    """The post-grad graph of one non-shared and one shared layer (one match), for graph edits."""
    torch.manual_seed(0)
    dtype = torch.float32
    return capture_graph(SglDecoder(dtype, n_shared=1), _inputs(dtype))


def _shared_split(graph):
    splits = [n for n in graph.nodes if n.target is aten.split_with_sizes.default and len(n.users) == 1]
    assert len(splits) == 1
    return splits[0]


def test_graph_edit_baseline_matches(shared_graph):
    assert len(find_dead_kv_gemms(copy_graph(shared_graph))) == 1


def test_split_sizes_not_adding_up_no_match(shared_graph):
    g = copy_graph(shared_graph)
    split = _shared_split(g)
    split.args = (split.args[0], [Q_SIZE, KV_SIZE, KV_SIZE // 2], *split.args[2:])
    assert find_dead_kv_gemms(g) == []


@pytest.mark.parametrize("reader", ["as_strided", "triton_kernel"])
def test_q_layout_reader_no_match(shared_graph, reader):
    # an op that reads q's strides (SGLang's CUDA gemma_qkv_rmsnorm bakes q.stride(0) into its
    # Triton launch) would see other strides after the GEMM shrinks
    from torch._higher_order_ops.triton_kernel_wrap import triton_kernel_wrapper_functional

    g = copy_graph(shared_graph)
    (q,) = [u for u in _shared_split(g).users if u.target is operator.getitem]
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        if reader == "as_strided":
            node = g.call_function(aten.as_strided.default, (q, [T, Q_SIZE], [N_QKV, 1], 0))
        else:
            node = g.call_function(triton_kernel_wrapper_functional, (), dict(
                kernel_idx=0, constant_args_idx=0, grid=[(T, 1, 1)], tma_descriptor_metadata={},
                kwargs={"q_ptr": q}, tensors_to_clone=["q_ptr"]))
    out.args = ((*out.args[0], node),)
    assert find_dead_kv_gemms(g) == []


def test_transformers_kv_shared_layer_no_match():
    # transformers' KV-shared layers have a q_proj only: no dead K/V to remove
    from .test_qkv_norm import Attention, _inputs as hf_inputs

    dtype = torch.float32
    case = run_case(Attention(dtype, variant="kv_shared"), hf_inputs(dtype), FUSION)
    case.assert_only(0)
    case.assert_unchanged()

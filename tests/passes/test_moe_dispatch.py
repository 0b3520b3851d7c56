"""moe_dispatch: transformers' grouped_mm expert dispatch (26B-A4B experts) -> gemma4_passes::moe_dispatch.

The experts module is transformers' own ``Gemma4TextExperts`` with ``experts_implementation=
"grouped_mm"``, in three forms:

* ``cpu``: the installed transformers as it runs on CPU (histc of float ids);
* ``cpu-ep``: with ``_is_expert_parallel`` set, transformers >= 5.2x masks sentinel rows; 5.17 (the
  GPU image) always does, so this is 5.17's graph (sentinel ids == E are fed in);
* ``cuda-histc``: the CUDA branch (histc of int32 ids), which a CPU run never takes: the installed
  ``grouped_mm_experts_forward`` is re-compiled from its own source with its device test
  ``device.type in ("cpu", "mps")`` replaced by ``False`` (checked to occur exactly once), so the
  graph is the one CUDA gets.  CPU histc has no int kernel and its fake (meta) kernel refuses int
  input on a CPU tensor, so for that test ``torch._meta_registrations.device_hint`` answers "cuda" for
  integer tensors (only histc, FFT, linalg, padding, embedding_bag, median, nonzero_static and the
  attention / scaled-mm metas consult it; none of those is in the graph); the form runs only with
  the pass (which removes histc), against the CPU form in eager.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from gemma4_passes import models, presets
from gemma4_passes.passes.moe_dispatch import MoeDispatch

from .conftest import FP32_REL_TOL, aten, capture_graph, compile_run, count_ops, eager, g4, op_histogram, run_case

FUSION = "moe_dispatch"
T = 7
DISPATCH_OPS = (aten.sort.default, aten.histc.default, aten.cumsum.default, aten.index_put.default)


def _config():
    return models.to_hf_config("tiny-26b-a4b", experts_implementation="grouped_mm")  # E=8, k=2, H=72


def _experts(ep: bool = False):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    m = Gemma4TextExperts(_config()).eval()
    with torch.no_grad():
        m.gate_up_proj.normal_(0, 0.15)
        m.down_proj.normal_(0, 0.2)
    m._is_expert_parallel = ep  # 5.2x: the sentinel masks; 5.17 has them always (attribute unused)
    return m


def _cuda_histc_forward():
    """transformers' grouped_mm_experts_forward taking its non-CPU branch: ``histc(ids.int())``."""
    from transformers.integrations import moe as hf_moe

    src = inspect.getsource(hf_moe.grouped_mm_experts_forward)
    test = 'device.type in ("cpu", "mps")'
    assert src.count(test) == 1, "transformers changed its histc device test; update this test"
    ns = dict(vars(hf_moe))
    exec(compile(src.replace(test, "False"), hf_moe.__file__, "exec"), ns)  # noqa: S102
    return ns["grouped_mm_experts_forward"]


def _route(t: int, e: int, k: int, sentinels: bool = False):
    """ids [T, k] (distinct per token, as top-k gives) and fp32 weights [T, k]."""
    ids = torch.rand(t, e).argsort(dim=1)[:, :k].contiguous()
    if sentinels:
        ids[::3, -1] = e  # experts living on another rank (expert parallelism)
    return ids, torch.rand(t, k)


def _inputs(t=T, sentinels=False):
    cfg = _config()
    ids, w = _route(t, cfg.num_experts, cfg.top_k_experts, sentinels)
    return torch.randn(t, cfg.hidden_size), ids, w


def _fused_node(graph):
    (node,) = [n for n in graph.nodes if n.target is g4.moe_dispatch.default]
    return node


def _assert_close(got, ref, tol=FP32_REL_TOL):
    err = (got - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"rel err {err / ref.abs().max().item():.3g} > {tol}"


# ---- the transformers experts ------------------------------------------------------------------


def test_experts_cpu_form_fp32():
    experts = _experts()
    args = _inputs()
    case = run_case(experts, args, FUSION)
    case.assert_only(1)
    case.assert_replaced({op: None for op in DISPATCH_OPS}, {g4.moe_dispatch.default: 1})
    # the hidden gather, the weights gather and the inverse permutation's index_put: gone
    assert case.removed(aten.index.Tensor) == (3, 1)  # left: the un-permute gather
    assert case.after.count(torch.ops.transformers.grouped_mm_fallback.default) == 2  # the GEMMs stay
    assert _fused_node(case.after.graph).args[3:] == (8, 2, False)
    case.assert_parity()


def test_experts_ep_form_folds_sentinel_mask():
    """5.17's graph: ``where(sorted >= E, 0, rows)`` after the gather folds into the op; sentinel
    ids (== E) sort last, count in no expert, and their rows are zero."""
    experts = _experts(ep=True)
    args = _inputs(sentinels=True)
    case = run_case(experts, args, FUSION)
    case.assert_only(1)
    case.assert_replaced({op: None for op in DISPATCH_OPS}, {g4.moe_dispatch.default: 1})
    assert case.removed(aten.where.self) == (3, 2)  # the proj_out masks stay
    assert _fused_node(case.after.graph).args[3:] == (8, 2, True)
    case.assert_parity()


def test_experts_cuda_histc_form(monkeypatch):
    """The int32 histc the CUDA branch traces: matched, and the fused graph runs (histc gone)."""
    import torch._meta_registrations as metas

    cpu_hint = metas.device_hint
    monkeypatch.setattr(metas, "device_hint", lambda t: "cuda" if not t.is_floating_point() else cpu_hint(t))
    experts, fwd = _experts(), _cuda_histc_forward()

    def cuda_form(x, ids, w):
        return fwd(experts, x, ids, w)

    args = _inputs()
    before = capture_graph(cuda_form, args)
    (h,) = [n for n in before.nodes if n.target is aten.histc.default]
    assert h.args[0].meta["val"].dtype == torch.int32  # the branch CUDA takes
    after = compile_run(cuda_form, args, [FUSION])
    assert after.matches[FUSION] == 1
    for op in DISPATCH_OPS:
        assert count_ops(before, op) == 1 and after.count(op) == 0, op
    _assert_close(after.out, eager(experts, args))


def test_dynamic_tokens_no_recompile():
    """Symbolic T (router + experts in one graph): one match, no guard on T (no recompiles)."""
    experts = _experts()
    cfg = _config()

    def route_and_dispatch(x, logits):
        w, ids = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float32), cfg.top_k_experts, dim=-1)
        return experts(x, ids, w / w.sum(-1, keepdim=True))

    def inputs(t):
        return torch.randn(t, cfg.hidden_size), torch.randn(t, cfg.num_experts)

    args = inputs(T)
    for a in args:
        torch._dynamo.mark_dynamic(a, 0)
    from gemma4_passes import build_pass, reset_match_report
    from .conftest import _slot

    torch._dynamo.reset()
    reset_match_report()
    try:
        with _slot(build_pass([FUSION])), torch.no_grad():
            compiled = torch.compile(route_and_dispatch, fullgraph=True)
            _assert_close(compiled(*args), route_and_dispatch(*args))
            from gemma4_passes import match_report

            assert match_report()[FUSION] == 1
            with torch.compiler.set_stance("fail_on_recompile"):
                for t in (3, 12, 33):
                    a = inputs(t)
                    _assert_close(compiled(*a), route_and_dispatch(*a))
    finally:
        torch._dynamo.reset()


def test_tiny_moe_model_matches_unfused_compile():
    """A 1-layer slice of tiny-26b-a4b (grouped_mm experts, fp32; the whole tiny preset runs in
    tests/test_end_to_end.py): one match per MoE layer, logits equal to eager (1e-4) and to the
    compile without the fusion."""
    model = models.build_model(presets.layer_slice(presets.tiny("26b-a4b"), 1), seed=3,
                               experts_implementation="grouped_mm")
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))

    def logits(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits

    graphs: list = []
    after = compile_run(logits, (ids,), [FUSION], before=graphs)
    assert after.matches[FUSION] == 1
    plain = compile_run(logits, (ids,), [])
    ref = eager(logits, (ids,))
    _assert_close(after.out, ref, 1e-4)
    assert torch.equal(after.out, plain.out)  # CPU sorts stably: the same rows, the same GEMMs
    for op in DISPATCH_OPS:  # (the model has other cumsums: positions)
        assert count_ops(graphs, op) - after.count(op) == 1, op
    assert count_ops(graphs, aten.sort.default) == 1 and after.count(aten.sort.default) == 0


# ---- near misses (graph only) ------------------------------------------------------------------
# The dispatch spelled out by hand (same ops as transformers), then one thing changed at a time.

E, K, H, I = 8, 2, 32, 16


def hand_dispatch(x, idx, wts, w_up, w_down, *, bins=E, hi=E - 1, descending=False, sort_dim0=False, div=K,
                  inv="index_put"):
    """transformers' dispatch in its ops; ``bins`` > E: the extra bins are cut before the GEMMs."""
    gemm = torch.ops.transformers.grouped_mm_fallback
    t, k = idx.shape
    if sort_dim0:
        ids_g, perm = torch.sort(idx, dim=0)
        ids_g, perm = ids_g.reshape(-1), perm.reshape(-1) * k
    else:
        ids_g, perm = torch.sort(idx.reshape(-1), descending=descending)
    rows = x.repeat_interleave(k, 0)[perm] if div is None else x[perm // div]
    offs = torch.cumsum(torch.histc(ids_g.float(), bins=bins, min=0, max=hi), dim=0, dtype=torch.int32)[:E]
    y = gemm(F.gelu(gemm(rows, w_up, offs)), w_down, offs) * wts.reshape(-1)[perm].unsqueeze(-1)
    if inv == "argsort":
        back = torch.argsort(perm)
    else:
        back = torch.empty_like(perm)
        back[perm] = torch.arange(perm.numel()).flip(0) if inv == "flipped" else torch.arange(perm.numel())
    return y[back].view(t, k, -1).sum(1)


def _hand_args():
    ids, w = _route(T, E, K)
    return torch.randn(T, H), ids, w, torch.randn(E, H, I) * 0.2, torch.randn(E, I, H) * 0.2


def _matches(**variant) -> int:
    graph = capture_graph(lambda *a: hand_dispatch(*a, **variant), _hand_args())
    return len(MoeDispatch().find(graph))


def test_hand_written_dispatch_matches_and_runs():
    assert _matches() == 1
    case = run_case(hand_dispatch, _hand_args(), FUSION)
    case.assert_only(1)
    case.assert_parity()


@pytest.mark.parametrize("variant", [
    dict(bins=E + 1, hi=E),  # a histogram of E + 1 bins (cut to E): not the GEMMs' expert count
    dict(hi=E),  # other bin edges
    dict(descending=True),
    dict(sort_dim0=True),  # the [T, k] ids sorted along tokens
    dict(div=K + 1),  # perm // 3 with k = 2
    dict(div=None),  # rows gathered by perm itself (from a repeated hidden)
    dict(inv="argsort"),  # the inverse built another way
    dict(inv="flipped"),  # index_put of something else than arange(S)
], ids=["bins", "max", "descending", "sort-dim0", "k-mismatch", "no-div", "inv-argsort", "inv-flipped"])
def test_near_misses_not_matched(variant):
    assert _matches(**variant) == 0


def test_near_miss_compiles_unchanged():
    case = run_case(lambda *a: hand_dispatch(*a, div=K + 1), _hand_args(), FUSION)
    case.assert_only(0)
    case.assert_unchanged()
    assert op_histogram(case.after.graphs)["aten.histc.default"] == 1
    case.assert_parity()

"""Triton MoE-router launcher vs the torch reference (CUDA, or CPU through the interpreter).

The kernel breaks ties by the lowest index; torch.topk has no index tie rule (see the
:mod:`gemma4_passes.kernels.moe_router` docstring).  So every result is checked three ways:

* ids exactly equal to a stable-sort variant of the reference (``torch.topk`` replaced by
  ``torch.sort(..., descending=True, stable=True)[:k]``, same fp32 ops otherwise), and weights
  within fp32 tolerance of it;
* against the literal reference (``moe_router_ref``, i.e. torch.topk): the same value selected
  at every rank, identical ids and close weights on every row whose top k has no tie, and equal
  normalised weights (weights / per_expert_scale[ids]) on all rows;
* an fp64 sanity check: each weight row sums to ``sum(per_expert_scale[ids] * normalised w)``.
"""

import pytest
import torch

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.moe_router import MAX_EXPERTS, moe_router_triton
from kernels_testutil import DT_IDS, FP32_ATOL, FP32_RTOL, IO_DTYPES, poisoned

FORMS = ("softmax_topk", "topk_softmax")
IDS_POISON = -7


def _select_key(logits, form):
    """The values top-k ranks: the fp32 probabilities, or the logits themselves."""
    return torch.softmax(logits.float(), dim=-1) if form == "softmax_topk" else logits


def stable_ref(logits, scale, k, form):
    """``moe_router_ref`` with ties broken by the lowest index (a stable descending sort)."""
    v, ids = torch.sort(_select_key(logits, form), dim=-1, descending=True, stable=True)
    v, ids = v[:, :k], ids[:, :k]
    if form == "softmax_topk":
        w = v / v.sum(dim=-1, keepdim=True)
    else:
        w = torch.softmax(v.float(), dim=-1)
    return w * scale.reshape(-1)[ids].float(), ids


def _tie_free_rows(key, k):
    """Rows whose top k is unambiguous: k distinct values, the k-th strictly above the next."""
    v = torch.sort(key.float(), dim=-1, descending=True).values
    ok = (v[:, 1:k] != v[:, : k - 1]).all(-1)
    if k < v.shape[-1]:
        ok &= v[:, k - 1] != v[:, k]
    return ok


def check_router(w, ids, logits, scale, k, form, ids_dtype=torch.int64):
    """All the checks of the module docstring; returns the tie-free row mask."""
    w, ids, logits, scale = w.cpu(), ids.cpu(), logits.cpu(), scale.cpu()
    t, e = logits.shape
    assert w.shape == (t, k) and ids.shape == (t, k), (w.shape, ids.shape)
    assert w.dtype == torch.float32 and ids.dtype == ids_dtype
    assert w.is_contiguous() and ids.is_contiguous()
    assert torch.isfinite(w).all(), "non-finite weights (unwritten output?)"
    assert ((ids >= 0) & (ids < e)).all(), f"ids out of range (unwritten output?): {ids.tolist()}"
    ids = ids.long()
    sc = scale.reshape(-1).float()

    # 1. lowest-index tie rule, fp32 ops as the reference
    sw, sids = stable_ref(logits, scale, k, form)
    assert torch.equal(ids, sids), f"ids {ids.tolist()} != stable-sort ids {sids.tolist()}"
    torch.testing.assert_close(w, sw, rtol=FP32_RTOL, atol=FP32_ATOL)

    # 2. the literal reference (torch.topk)
    rw, rids = R.moe_router_ref(logits, scale, k, form)
    key = _select_key(logits, form)
    assert torch.equal(key.gather(1, ids), key.gather(1, rids)), "a different value selected than torch.topk"
    torch.testing.assert_close(w / sc[ids], rw / sc[rids], rtol=FP32_RTOL, atol=FP32_ATOL)
    free = _tie_free_rows(key, k)
    assert torch.equal(ids[free], rids[free]), "ids differ from torch.topk on a row without ties"
    torch.testing.assert_close(w[free], rw[free], rtol=FP32_RTOL, atol=FP32_ATOL)

    # 3. fp64 sanity: row sums
    if form == "softmax_topk":
        p = torch.softmax(logits.double(), dim=-1).gather(1, ids)
        n = p / p.sum(dim=-1, keepdim=True)
    else:
        n = torch.softmax(logits.double().gather(1, ids), dim=-1)
    expect = (n * scale.reshape(-1).double()[ids]).sum(-1)
    torch.testing.assert_close(w.double().sum(-1), expect, rtol=1e-5, atol=1e-6)
    return free


def run_router(logits, scale, k, form, device, ids_dtype=torch.int64, rows_per_program=None):
    """The launcher into poisoned output buffers (NaN weights, out-of-range ids)."""
    t = logits.shape[0]
    w_out = poisoned((t, k), torch.float32, device)
    ids_out = torch.full((t, k), IDS_POISON, dtype=ids_dtype, device=device)
    w, ids = moe_router_triton(
        logits, scale, k, form, weights_out=w_out, ids_out=ids_out, ids_dtype=ids_dtype,
        rows_per_program=rows_per_program,
    )
    assert w is w_out and ids is ids_out
    return w, ids


def rand_scale(e, dtype, device):
    return (torch.rand(e) + 0.5).to(dtype).to(device)


# ---- random logits -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("e", [8, 64, 128, 256])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("form", FORMS)
def test_moe_router_fuzz(form, dtype, e, k, device):
    """Random logits; T, rows per program, row stride and the scale dtype vary with the case."""
    mix = e // 8 + k
    t = (1, 3, 5)[mix % 3]
    rows = (None, 2, 4)[k % 3]
    if mix % 2 == 0:  # rows of a wider buffer (row stride > E)
        logits = (torch.randn(t, e + 8) * 2.0).to(dtype).to(device)[:, 3 : 3 + e]
    else:
        logits = (torch.randn(t, e) * 2.0).to(dtype).to(device)
    scale = rand_scale(e, (torch.float32, torch.bfloat16)[mix % 2], device)
    w, ids = run_router(logits, scale, k, form, device, rows_per_program=rows)
    free = check_router(w, ids, logits, scale, k, form)
    if dtype == torch.float32:  # no exact ties among random fp32 logits: ids equal torch.topk's
        assert free.all()


@pytest.mark.parametrize("e,k", [(1, 1), (3, 3), (100, 16), (512, 16)])
@pytest.mark.parametrize("form", FORMS)
def test_padded_and_extreme_sizes(form, e, k, device):
    """E not a power of two (padding columns never selected), E=1, and the largest E and k."""
    logits = (torch.randn(3, e) * 2.0).to(torch.bfloat16).to(device)
    logits[1] = logits[1].abs() * -1.0 - 1.0  # all negative: padding must stay below every real value
    logits[2, : e // 2] = float("-inf")
    scale = rand_scale(e, torch.float32, device)
    w, ids = run_router(logits, scale, k, form, device, rows_per_program=(None, 2)[e % 2])
    check_router(w, ids, logits, scale, k, form)


# ---- exact ties, -inf, extreme magnitudes --------------------------------------------------------


@pytest.mark.parametrize("e,k", [(8, 2), (8, 8), (64, 2), (128, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_IDS.get)
@pytest.mark.parametrize("form", FORMS)
def test_exact_ties(form, dtype, e, k, device):
    """Logits drawn from a handful of values: ties inside and across the top-k boundary."""
    vals = torch.tensor([-1.0, 0.5, 1.0, 2.0, 2.5])
    logits = vals[torch.randint(len(vals), (5, e))]
    logits[0] = 0.5  # a row of all-equal logits: ids 0..k-1
    logits[1, : e // 2].clamp_(max=2.0)
    logits[1, e // 2 :] = 2.5  # the top value repeated in the upper half only
    logits = logits.to(dtype).to(device)
    scale = rand_scale(e, torch.float32, device)
    w, ids = run_router(logits, scale, k, form, device, rows_per_program=(None, 4)[k % 2])
    check_router(w, ids, logits, scale, k, form)
    assert ids[0].tolist() == list(range(k))
    n_top = min(k, e - e // 2)
    assert ids[1, :n_top].tolist() == list(range(e // 2, e // 2 + n_top))


@pytest.mark.parametrize("e,k", [(8, 8), (64, 8), (128, 2)])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("form", FORMS)
def test_neg_inf_logits(form, dtype, e, k, device):
    """-inf logits (probability 0) are chosen only when fewer than k finite entries exist."""
    logits = torch.randn(5, e) * 2.0
    ninf = float("-inf")
    logits[0, torch.randperm(e)[: e // 4]] = ninf  # some -inf, enough finite entries
    logits[1, torch.randperm(e)[: e - k]] = ninf  # exactly k finite entries
    logits[2, torch.randperm(e)[: e - max(1, k // 2)]] = ninf  # fewer finite entries than k
    logits[3, :] = ninf
    logits[3, e - 2] = 1.5  # a single finite entry, near the end
    logits[4, 0] = logits[4, -1] = ninf
    logits = logits.to(dtype).to(device)
    scale = rand_scale(e, torch.float32, device)
    w, ids = run_router(logits, scale, k, form, device)
    check_router(w, ids, logits, scale, k, form)
    ids = ids.cpu()
    assert ids[3, 0] == e - 2 and w[3, 0].cpu() == scale[e - 2].cpu().float()
    n_fin = int(torch.isfinite(logits[2].cpu().float()).sum())
    assert (w[2, n_fin:].cpu() == 0).all() and (w[2, :n_fin].cpu() > 0).all()
    # the zero-weight picks are the lowest-index -inf entries
    fill = [i for i in range(e) if not torch.isfinite(logits[2, i].cpu().float())][: k - n_fin]
    assert ids[2, n_fin:].tolist() == fill


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter: max - (-max)
@pytest.mark.parametrize("kind", ["1e4", "near-max"])
@pytest.mark.parametrize("dtype", IO_DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("form", FORMS)
def test_extreme_magnitudes(form, dtype, kind, device):
    """|logits| ~1e4 (multiples of 256: every other probability is exactly 0) and near the
    dtype's max (differences overflow to -inf): top-k among zeros, ties with the maximum."""
    e, k = 64, 8
    if kind == "1e4":
        logits = torch.round(torch.randn(4, e) * 1e4 / 256) * 256
        logits[1, 5] = logits[1, 40] = logits[1].max() + 256  # a tied maximum
    else:
        big = torch.finfo(dtype).max
        logits = (torch.rand(4, e) * 2 - 1) * big
        logits[:, 0] = -big
        logits[:, 1] = big
        logits[2, 7] = big  # tied maximum
        logits[3, 1] = -big  # no entry at the max; the largest is somewhere else
    logits = logits.to(dtype).to(device)
    scale = rand_scale(e, torch.float32, device)
    w, ids = run_router(logits, scale, k, form, device)
    check_router(w, ids, logits, scale, k, form)


# ---- outputs, dtypes, layouts --------------------------------------------------------------------


@pytest.mark.parametrize("scale_kind", ["fp16", "fp64-2d", "bf16-strided"])
def test_scale_dtypes_and_int32_ids(scale_kind, device):
    e, k, t = 128, 8, 3
    logits = (torch.randn(t, e) * 2.0).to(torch.bfloat16).to(device)
    if scale_kind == "fp16":
        scale = rand_scale(e, torch.float16, device)
    elif scale_kind == "fp64-2d":
        scale = rand_scale(e, torch.float64, device).reshape(1, e)
    else:
        scale = rand_scale(2 * e, torch.bfloat16, device)[::2]
    for form in FORMS:
        w, ids = run_router(logits, scale, k, form, device, ids_dtype=torch.int32)
        check_router(w, ids, logits, scale, k, form, ids_dtype=torch.int32)


def test_fresh_outputs_and_empty(device):
    e, k = 64, 2
    logits = torch.randn(7, e, device=device)
    scale = rand_scale(e, torch.float32, device)
    w, ids = moe_router_triton(logits, scale, k)
    check_router(w, ids, logits, scale, k, "softmax_topk")
    w, ids = moe_router_triton(logits[:0], scale, k, "topk_softmax")
    assert w.shape == (0, k) and ids.shape == (0, k) and w.dtype == torch.float32 and ids.dtype == torch.int64


def test_validation_errors(device):
    x = torch.randn(3, 16, device=device)
    s = torch.ones(16, device=device)
    cases = [
        (dict(logits=x[None]), "2-D"),
        (dict(logits=x.double()), "unsupported dtype"),
        (dict(logits=torch.randn(2, MAX_EXPERTS + 1, device=device), scale=torch.ones(MAX_EXPERTS + 1)), "experts"),
        (dict(scale=torch.ones(15, device=device)), "E=16"),
        (dict(scale=torch.ones(16, dtype=torch.int32, device=device)), "per_expert_scale: unsupported dtype"),
        (dict(scale=torch.ones(16, device="meta")), "per_expert_scale is on meta"),
        (dict(k=0), "top_k=0 out of range"),
        (dict(k=17, logits=torch.randn(3, 32, device=device), scale=torch.ones(32, device=device)), "top_k=17"),
        (dict(k=5, logits=x[:, :4], scale=s[:4]), "top_k=5"),
        (dict(k=True), "top_k must be an int"),
        (dict(form="softmax"), "form must be one of"),
        (dict(ids_dtype=torch.int16), "ids_dtype"),
        (dict(weights_out=torch.empty(3, 2, dtype=torch.bfloat16, device=device)), "weights_out"),
        (dict(weights_out=torch.empty(3, 3, device=device)), "weights_out"),
        (dict(weights_out=torch.empty(2, 3, device=device).t()), "weights_out must be contiguous"),
        (dict(ids_out=torch.empty(3, 2, dtype=torch.int32, device=device)), "ids_out"),
    ]
    for over, match in cases:
        kw = dict(logits=x, scale=s, k=2, form="softmax_topk")
        kw.update(over)
        extra = {n: kw.pop(n) for n in ("weights_out", "ids_out", "ids_dtype") if n in kw}
        with pytest.raises(ValueError, match=match):
            moe_router_triton(kw["logits"], kw["scale"], kw["k"], kw["form"], **extra)

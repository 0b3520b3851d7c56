"""Triton MoE-dispatch launcher vs torch (CUDA, or CPU through the interpreter).

The reference is what transformers' grouped_mm dispatch computes, with the sort made stable:
``torch.sort(ids, stable=True)``, ``cumsum(histc(ids.float(), E, 0, E - 1), dtype=int32)``,
``inv_perm[perm] = arange(S)``, ``hidden[perm // k]``, ``weights[perm]``.  Every output must be
EXACTLY equal (ints, and values copied bit for bit).  Outputs are preallocated and filled with
garbage first, so an element the kernel forgets stays wrong.
"""

import pytest
import torch

from gemma4_passes.kernels import reference as R
from gemma4_passes.kernels.moe_dispatch import moe_dispatch_triton

ID_POISON = -7  # not a valid position or count


def torch_dispatch(ids, hidden, weights, e, k, zero_sentinel_rows=False):
    """The reference spelled with the graph's ops (stable sort, histc, cumsum, index_put)."""
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    offsets = torch.cumsum(torch.histc(sorted_ids.float(), bins=e, min=0, max=e - 1), 0, dtype=torch.int32)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    rows = hidden[perm // k] if hidden is not None else None
    if rows is not None and zero_sentinel_rows:
        rows = rows.masked_fill((sorted_ids >= e)[:, None], 0)
    w = weights.reshape(-1)[perm] if weights is not None else None
    return sorted_ids, perm, offsets, inv, rows, w


def poisoned_outs(s, e, h, ids_dtype, h_dtype, w_dtype, device):
    def ints(n, dt):
        return torch.full((n,), ID_POISON, dtype=dt, device=device)

    return (ints(s, ids_dtype), ints(s, torch.int64), ints(e, torch.int32), ints(s, torch.int64),
            torch.full((s, h), float("nan"), dtype=h_dtype, device=device) if h_dtype else None,
            torch.full((s,), float("nan"), dtype=w_dtype, device=device) if w_dtype else None)


def run_and_check(ids, hidden, weights, e, k, device, zero=False):
    ids, hidden = ids.to(device), hidden.to(device) if hidden is not None else None
    weights = weights.to(device) if weights is not None else None
    s = ids.numel()
    outs = poisoned_outs(s, e, hidden.shape[1] if hidden is not None else 0, ids.dtype,
                         hidden.dtype if hidden is not None else None,
                         weights.dtype if weights is not None else None, device)
    got = moe_dispatch_triton(ids, hidden, weights, e, k, zero, out=outs)
    for g, o in zip(got, outs):
        assert g is o
    want = torch_dispatch(*(t.cpu() if t is not None else None for t in (ids, hidden, weights)), e, k, zero)
    ref = R.moe_dispatch_ref(*(t.cpu() if t is not None else None for t in (ids, hidden, weights)), e, k, zero)
    names = ("sorted_ids", "perm", "offsets", "inv_perm", "hidden_sorted", "weights_sorted")
    for name, g, w, r in zip(names, got, want, ref):
        if w is None:
            assert g is None and r is None, name
            continue
        g = g.cpu()
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g, w), f"{name}: {g.tolist() if g.dim() == 1 else g} != {w.tolist() if w.dim() == 1 else w}"
        assert torch.equal(r, w), f"reference {name} differs from the torch ops"
    return got


def draw_ids(kind, t, k, e):
    """[T, k] ids: distinct per token (as top-k gives), or heavy duplicates across tokens."""
    if kind == "topk":  # each token picks k distinct experts
        return torch.rand(t, e).argsort(dim=1)[:, :k].contiguous()
    if kind == "few":  # every id among 3 experts: long runs, most experts empty
        pick = torch.randperm(e)[:3]
        return pick[torch.randint(0, 3, (t, k))]
    if kind == "equal":
        return torch.full((t, k), e // 2 + 1 if e > 2 else 0, dtype=torch.int64)
    if kind == "upper":  # experts below e/2 get no token
        return torch.randint(e // 2, e, (t, k))
    raise ValueError(kind)


KINDS = ("topk", "few", "equal", "upper")


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize("e", [8, 128])
@pytest.mark.parametrize("kind", KINDS)
def test_dispatch_fuzz(kind, e, k, device):
    """Fresh random ids; T odd (S odd for k=1); dtypes and layouts vary with the case."""
    mix = KINDS.index(kind) + e // 8 + k
    t = (1, 5, 13, 33)[mix % 4]
    ids = draw_ids(kind, t, k, e)
    ids = ids.to((torch.int64, torch.int32)[mix % 2])
    h = (24, 40)[mix % 2]
    h_dtype = (torch.bfloat16, torch.float32, torch.float16)[mix % 3]
    if mix % 3 == 1:  # rows of a wider buffer: row stride > H
        hidden = torch.randn(t, h + 8).to(h_dtype)[:, 4 : 4 + h]
    else:
        hidden = torch.randn(t, h).to(h_dtype)
    weights = torch.rand(t, k)
    got = run_and_check(ids, hidden, weights, e, k, device)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=e)
    assert got[2].cpu().tolist() == counts.cumsum(0).tolist()


@pytest.mark.parametrize("e,k,t", [(8, 8, 65), (8, 8, 131), (4, 2, 301)])
def test_heavy_buckets_split_and_blocks(e, k, t, device):
    """S >= 16 E: heavy buckets copied by several programs; S > 1024: several id blocks."""
    ids = torch.randint(0, e, (t, k))
    ids[: t // 2] = 1  # one bucket much heavier than the rest
    run_and_check(ids, torch.randn(t, 16, dtype=torch.bfloat16), torch.rand(t * k), e, k, device)


@pytest.mark.parametrize("zero", [False, True], ids=["keep-rows", "zero-sentinel-rows"])
def test_out_of_range_ids(zero, device):
    """Expert-parallel sentinels (== E), and ids < 0 / > E: sorted by value (stable), not counted
    in the offsets; with zero_sentinel_rows the rows of ids >= E are zeros."""
    e, k, t = 8, 2, 21
    ids = torch.randint(0, e, (t, k))
    ids[::3, 0] = e  # transformers' EP sentinel
    ids[1, 1], ids[4, 1], ids[10, 0] = -1, e + 5, e + 5
    ids[7, 1] = -3
    got = run_and_check(ids, torch.randn(t, 24), torch.rand(t, k), e, k, device, zero=zero)
    rows = got[4].cpu()
    high = got[0].cpu() >= e
    assert bool((rows[high] == 0).all()) == zero


def test_all_sentinels_and_no_hidden_or_weights(device):
    e, k, t = 16, 8, 3
    ids = torch.full((t, k), e)
    run_and_check(ids, torch.randn(t, 8), None, e, k, device, zero=True)
    ids = torch.randint(0, e, (t, k))
    run_and_check(ids, None, torch.rand(t, k, dtype=torch.bfloat16), e, k, device)
    run_and_check(ids.reshape(-1)[:7], None, None, e, k, device)  # ids alone: any S


def test_fresh_outputs_and_empty(device):
    e, k = 8, 2
    ids = torch.randint(0, e, (5, k), device=device)
    hidden, w = torch.randn(5, 16, device=device), torch.rand(10, device=device)
    got = moe_dispatch_triton(ids, hidden, w, e, k)
    for g, r in zip(got, R.moe_dispatch_ref(ids.cpu(), hidden.cpu(), w.cpu(), e, k)):
        assert g.is_contiguous() and torch.equal(g.cpu(), r)
    got = moe_dispatch_triton(ids[:0], hidden[:0], w[:0], e, k)
    assert [tuple(g.shape) for g in got] == [(0,), (0,), (e,), (0,), (0, 16), (0,)]
    assert got[2].dtype == torch.int32 and not bool(got[2].any())


def test_validation_errors(device):
    ids = torch.randint(0, 8, (3, 2), device=device)
    h, w = torch.randn(3, 16, device=device), torch.rand(6, device=device)
    cases = [
        (dict(ids=ids.float()), "int64 or int32"),
        (dict(e=0), "num_experts"),
        (dict(k=0), "top_k"),
        (dict(k=True), "top_k"),
        (dict(h=torch.randn(4, 16, device=device)), "rows"),
        (dict(h=h.double()), "2-D float"),
        (dict(w=torch.rand(5, device=device)), "S=6"),
        (dict(out=(None,) * 5), "6 tensors"),
        (dict(out=(torch.empty(6, dtype=torch.int32, device=device),) + (None,) * 5), r"out\[sorted_ids\]"),
    ]
    for over, match in cases:
        kw = dict(ids=ids, h=h, w=w, e=8, k=2, out=None)
        kw.update(over)
        with pytest.raises(ValueError, match=match):
            moe_dispatch_triton(kw["ids"], kw["h"], kw["w"], kw["e"], kw["k"], out=kw["out"])

"""The one-shot all-reduce + epilogue kernel, its push/reduce protocol played out on CPU.

The Triton interpreter runs one launch at a time, so W ranks are emulated in one process: every
rank's push phase (``phase=1``), then every rank's reduce phase (``phase=2``), over W CPU
"symmetric" buffers whose addresses every rank holds -- the same buffer layout, sentinel, slot
rotation and program grid as the single launch on GPUs (``phase=0``; benchmarks/allreduce_check.py
runs that on 2 H200s).  Outputs are poisoned before each call; the reference sums the ranks in
order in fp32, rounds once, and runs the plain-torch epilogue.
"""

import types

import pytest
import torch

from gemma4_passes.kernels import reference as ref
from gemma4_passes.kernels.oneshot_allreduce import oneshot_allreduce_norm

pytestmark = pytest.mark.usefixtures("device")

SENTINEL = -32768
EPS, NEXT_EPS = 1e-6, 1e-5


class EmulatedGroup:
    """W ranks' workspaces over plain CPU buffers (capacity elements per rank and slot)."""

    def __init__(self, world: int, capacity: int):
        self.buffers = [torch.full((3 * world * capacity,), SENTINEL, dtype=torch.int16) for _ in range(world)]
        ptrs = torch.tensor([b.data_ptr() for b in self.buffers], dtype=torch.int64)
        self.ranks = [types.SimpleNamespace(world=world, rank=r, capacity=capacity, peer_ptrs=ptrs,
                                            state=torch.zeros(2, dtype=torch.int32)) for r in range(world)]

    def call(self, xs, residual, w, scalar, nw, second, unrounded=False, programs=3):
        outs = [(torch.full_like(residual, float("nan")), torch.full_like(residual, float("nan")))
                for _ in xs]
        kw = dict(unrounded_sum=unrounded, programs=programs)
        for ws, x, (o, n) in zip(self.ranks, xs, outs):
            oneshot_allreduce_norm(x, residual, w, scalar, nw, EPS, NEXT_EPS, second, ws, phase=1, out=o,
                                   normed_out=n, **kw)
        return [oneshot_allreduce_norm(x, residual, w, scalar, nw, EPS, NEXT_EPS, second, ws, phase=2, out=o,
                                       normed_out=n, **kw) for ws, x, (o, n) in zip(self.ranks, xs, outs)]

    def all_empty(self) -> bool:
        return all(bool((b == SENTINEL).all()) for b in self.buffers)


def _want(xs, residual, w, scalar, nw, second, unrounded):
    total = torch.zeros(xs[0].shape, dtype=torch.float32)
    for x in xs:  # rank order, fp32, one rounding: what every rank computes
        total += x.float()
    s = total.to(xs[0].dtype)
    if second:
        return ref.rmsnorm_add_rmsnorm_ref(s, residual, w, scalar, nw, EPS, NEXT_EPS, unrounded)
    return None, ref.rmsnorm_add_ref(s, residual, w, scalar, EPS)


# (second norm, scalar, next weight, unrounded fp32 sum): post-attention, post-FFN, PLE/FFN tail
# without a next norm, SGLang's unrounded residual norm
SITES = {"post_attn": (True, False, True, False), "post_ffn": (True, True, True, False),
         "tail_only": (False, True, False, False), "unrounded": (True, False, False, True)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("site", list(SITES))
def test_matches_reference_across_calls(world, dtype, site):
    second, has_sc, has_nw, unrounded = SITES[site]
    n = 72
    group = EmulatedGroup(world, capacity=17 * n)
    g = torch.Generator().manual_seed(world * 100 + len(site))
    for call, t in enumerate((5, 1, 17, 3, 5)):  # > 3 calls: every slot is used and reused
        xs = [torch.randn(t, n, generator=g).to(dtype) for _ in range(world)]
        xs[0][0, :4] = -0.0  # a real -0.0 must not read as "not arrived yet"
        residual = (2 * torch.randn(t, n, generator=g)).to(dtype)
        w, nw = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
        scalar = (torch.rand(1, generator=g) + 0.5).to(dtype) if has_sc else None
        nw = nw if has_nw else None
        got = group.call(xs, residual, w, scalar, nw, second, unrounded)
        want = _want(xs, residual, w, scalar, nw, second, unrounded)
        for normed, out in got:
            assert torch.equal(out, want[1]), f"call {call}: residual_out"
            if second:
                assert torch.equal(normed, want[0]), f"call {call}: normed"
            else:
                assert normed is None
        assert group.all_empty(), "every slot holds the sentinel again after the call"
        for ws in group.ranks:
            assert ws.state.tolist() == [(call + 1) % 3, 0]  # slot advanced, program count reset


def test_non_power_of_two_hidden_and_more_rows_than_programs():
    n, t = 40, 11
    group = EmulatedGroup(2, capacity=t * n)
    xs = [torch.randn(t, n).to(torch.bfloat16) for _ in range(2)]
    residual, w = torch.randn(t, n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    got = group.call(xs, residual, w, None, None, True, programs=2)  # each program loops over rows
    want = _want(xs, residual, w, None, None, True, False)
    assert all(torch.equal(o, want[1]) and torch.equal(nm, want[0]) for nm, o in got)
    assert group.all_empty()


def test_bad_input_raises():
    group = EmulatedGroup(2, capacity=4 * 72)
    ws = group.ranks[0]
    x, w = torch.randn(4, 72), torch.randn(72)
    with pytest.raises(ValueError, match="bf16/fp16"):
        oneshot_allreduce_norm(x, x, w, None, None, EPS, EPS, False, ws)
    xb = x.to(torch.bfloat16)
    with pytest.raises(ValueError, match="exceed the workspace"):
        oneshot_allreduce_norm(torch.cat([xb, xb]), torch.cat([xb, xb]), w, None, None, EPS, EPS, False, ws)
    with pytest.raises(ValueError, match="residual"):
        oneshot_allreduce_norm(xb, xb[:2], w, None, None, EPS, EPS, False, ws)
    ws3 = types.SimpleNamespace(**{**vars(ws), "world": 3})
    with pytest.raises(ValueError, match="world size 3"):
        oneshot_allreduce_norm(xb, xb, w, None, None, EPS, EPS, False, ws3)

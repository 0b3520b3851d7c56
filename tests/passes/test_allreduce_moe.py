"""allreduce_norm at the MoE branch combine (26B-A4B under TP): the dense-MLP output h1 and the MoE
output h2 are each all-reduced, then combined by ``moe_branch_combine``; both sums over one group
become ONE all-reduce inside ``allreduce_moe_branch_combine``.  Not gated on the one-shot kernel
(one collective instead of two pays on any backend), so these run without the force switch.
"""

import pytest
import torch
import torch.distributed._functional_collectives as funcol
from torch.profiler import ProfilerActivity, profile

from gemma4_passes import build_pass
from gemma4_passes.kernels.allreduce_workspace import ENV_SWITCH

from .conftest import FP32_REL_TOL, _slot, compile_run, eager, g4
from .test_allreduce_norm import force_one_shot, groups  # noqa: F401 - fixtures
from .test_moe import EPS, _combine_args, moe_combine_hf

c10d = torch.ops._c10d_functional
FUSIONS = ["moe_branch_combine", "allreduce_norm"]


@pytest.fixture(autouse=True)
def no_force(force_one_shot, monkeypatch):  # noqa: F811
    monkeypatch.delenv(ENV_SWITCH)


def moe_combine_tp(group1, group2):
    def fn(h1, h2, residual, w1, w2, w3, scalar, w_next):
        return moe_combine_hf(funcol.all_reduce(h1, "sum", group1), funcol.all_reduce(h2, "sum", group2), residual,
                              w1, w2, w3, scalar, w_next)
    return fn


def all_reduces_run(fn, args) -> int:
    """How many all-reduces a call of ``fn`` issues (the fused op's own included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sum(e.name == "gloo:all_reduce" for e in prof.events())  # whichever op issued it


def check(fn, args, n_fused):
    ref = eager(fn, args)
    run = compile_run(fn, args, FUSIONS)
    assert run.matches["moe_branch_combine"] == 1
    assert run.matches["allreduce_norm"] == n_fused
    assert run.count(c10d.all_reduce.default) == run.count(c10d.wait_tensor.default) == 2 * (1 - n_fused)
    assert run.count(g4.moe_branch_combine.default) == 1 - n_fused
    assert run.count(g4.allreduce_moe_branch_combine.default) == n_fused
    for o, r in zip(run.out, ref):
        assert (o - r).abs().max() <= FP32_REL_TOL * r.abs().max()
    return run


def test_two_all_reduces_become_one(groups):
    _, other = groups
    fn, args = moe_combine_tp(other, other), _combine_args(torch.float32)
    run = check(fn, args, 1)
    (node,) = [n for n in run.graph.nodes if n.target is g4.allreduce_moe_branch_combine.default]
    assert node.args[-1] == other.group_name
    assert node.args[0].op == node.args[1].op == "placeholder"  # the partial sums themselves


def test_one_all_reduce_runs(groups):
    """Counted at run time: the fused op's one all-reduce against the unfused graph's two."""
    world, _ = groups
    fn, args = moe_combine_tp(world, world), _combine_args(torch.float32)
    for fusions, n in ((["moe_branch_combine"], 2), (FUSIONS, 1)):
        torch._dynamo.reset()
        try:
            with _slot(build_pass(fusions)), torch.no_grad():
                compiled = torch.compile(fn, fullgraph=True)
                compiled(*args)  # compiles outside the profiler
                assert all_reduces_run(compiled, args) == n
        finally:
            torch._dynamo.reset()


def test_sums_over_different_groups_not_folded(groups):
    world, other = groups
    check(moe_combine_tp(world, other), _combine_args(torch.float32), 0)


def test_one_branch_reduced_not_folded(groups):
    world, _ = groups

    def fn(h1, h2, residual, w1, w2, w3, scalar, w_next):
        return moe_combine_hf(funcol.all_reduce(h1, "sum", world), h2, residual, w1, w2, w3, scalar, w_next)

    run = compile_run(fn, _combine_args(torch.float32), FUSIONS)
    assert run.matches["moe_branch_combine"] == 1 and run.matches["allreduce_norm"] == 0
    assert run.count(c10d.all_reduce.default) == 1 and run.count(g4.allreduce_moe_branch_combine.default) == 0


def test_reduced_value_with_other_users_not_folded(groups):
    world, _ = groups

    def fn(h1, h2, residual, w1, w2, w3, scalar, w_next):
        s2 = funcol.all_reduce(h2, "sum", world)
        out = moe_combine_hf(funcol.all_reduce(h1, "sum", world), s2, residual, w1, w2, w3, scalar, w_next)
        return (*out, s2 * 2)

    check(fn, _combine_args(torch.float32), 0)


def test_op_sums_both_then_combines(groups):
    world, _ = groups
    h1, h2, r, w1, w2, w3, sc, wn = _combine_args(torch.bfloat16)
    for next_w, next_eps in ((wn, EPS), (None, None)):
        got = g4.allreduce_moe_branch_combine(h1, h2, r, w1, w2, w3, sc, next_w, EPS, EPS, EPS, next_eps,
                                              world.group_name)
        want = g4.moe_branch_combine(h1, h2, r, w1, w2, w3, sc, next_w, EPS, EPS, EPS, next_eps)  # world size 1
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    torch.library.opcheck(g4.allreduce_moe_branch_combine.default,
                          (h1, h2, r, w1, w2, w3, sc, wn, EPS, EPS, EPS, EPS, world.group_name))


def moe_combine_tp_flat_experts(group, view=torch.reshape, between=lambda s: s, extra=False):
    """transformers' TP'd experts: the [T, H] expert sum is all-reduced inside the experts module and the
    decoder layer reshapes it back to [B, S, H] after the wait (wait_tensor -> reshape -> combine)."""
    def fn(h1, h2, residual, w1, w2, w3, scalar, w_next):
        s2 = view(between(funcol.all_reduce(h2.reshape(-1, h2.shape[-1]), "sum", group)), h1.shape)
        out = moe_combine_hf(funcol.all_reduce(h1, "sum", group), s2, residual, w1, w2, w3, scalar, w_next)
        return (*out, s2 * 2) if extra else out
    return fn


@pytest.mark.parametrize("dynamic_seq", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("view", [torch.reshape, torch.Tensor.view], ids=["reshape", "view"])
def test_expert_sum_reshaped_after_all_reduce(groups, view, dynamic_seq):
    """The reshape moves onto the partial sum (exact: the all-reduce is elementwise), symbolic sizes too."""
    world, _ = groups
    args = _combine_args(torch.float32)
    if dynamic_seq:  # the reshape's size holds the sequence length as a node
        for a in args[:3]:
            torch._dynamo.mark_dynamic(a, 1)
    run = check(moe_combine_tp_flat_experts(world, view), args, 1)
    (node,) = [n for n in run.graph.nodes if n.target is g4.allreduce_moe_branch_combine.default]
    h1, h2 = node.args[:2]
    assert h1.op == "placeholder"
    assert h2.target is torch.ops.aten.reshape.default and tuple(h2.meta["val"].shape) == tuple(h1.meta["val"].shape)


def test_expert_sum_reshaped_with_other_users_not_folded(groups):
    world, _ = groups
    check(moe_combine_tp_flat_experts(world, extra=True), _combine_args(torch.float32), 0)


def test_expert_sum_mul_after_all_reduce_not_folded(groups):
    """Only shape-only ops are seen through."""
    world, _ = groups
    check(moe_combine_tp_flat_experts(world, between=lambda s: s * 2), _combine_args(torch.float32), 0)


def test_expert_sum_cast_after_all_reduce_not_folded(groups):
    """A cast is not seen through: summing in the other dtype would change the result.  (Parity not
    checked: Inductor drops the bf16 round trip by itself, with or without the passes.)"""
    world, _ = groups
    fn = moe_combine_tp_flat_experts(world, between=lambda s: s.to(torch.bfloat16).to(torch.float32))
    run = compile_run(fn, _combine_args(torch.float32), FUSIONS)
    assert run.matches["moe_branch_combine"] == 1 and run.matches["allreduce_norm"] == 0
    assert run.count(c10d.all_reduce.default) == 2 and run.count(g4.allreduce_moe_branch_combine.default) == 0

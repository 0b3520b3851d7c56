"""allreduce_norm: the all-reduce feeding a norm-before-residual epilogue, folded into one op.

Traced in a real (gloo, world size 1) process group: the post-grad graph holds the same
``_c10d_functional.all_reduce`` + ``wait_tensor`` nodes as under tensor parallelism.  The one-shot
kernel cannot serve gloo/CPU, so the matching tests run with ``GEMMA4_PASSES_ONESHOT_AR=force``
(the fixture below); the gating tests at the end run without it.
"""

import logging

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from gemma4_passes.kernels.allreduce_workspace import ENV_SWITCH
from gemma4_passes.passes import allreduce_forms

from .conftest import FP32_REL_TOL, act, compile_run, eager, g4, rms_hf, weight

c10d = torch.ops._c10d_functional
H = 72
EPS = 1e-6


@pytest.fixture(scope="module")
def groups():
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    other = dist.new_group([0])
    yield dist.group.WORLD, other
    if created:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def force_one_shot(monkeypatch):
    """Fold where the one-shot kernel cannot run (gloo on CPU), and say each reason afresh."""
    monkeypatch.setenv(ENV_SWITCH, "force")
    monkeypatch.setattr(allreduce_forms, "_SAID", set())


def said(caplog, text: str) -> int:
    """How many gemma4_passes INFO records contain ``text``."""
    return sum(text in r.getMessage() for r in caplog.records if r.name == "gemma4_passes" and r.levelno == logging.INFO)


def _post_attn(group):
    def fn(attn, residual, w1, w2):
        r = residual + rms_hf(funcol.all_reduce(attn, "sum", group), w1, EPS)
        return rms_hf(r, w2, EPS), r
    return fn


def _ffn_tail(group):
    def fn(down, residual, w, scalar, w_next):
        x = (residual + rms_hf(funcol.all_reduce(down, "sum", group), w, EPS)) * scalar
        return rms_hf(x, w_next, EPS), x
    return fn


def _args(n_w=2, scalar=False):
    args = [act(2, 3, H, scale=3.0), act(2, 3, H)] + [weight(H)]
    if scalar:
        args.append(0.5 + torch.rand(1))
    return args + [weight(H) for _ in range(n_w - 1)]


FUSIONS = ["post_attn_norm", "ffn_tail", "ple_tail", "allreduce_norm"]


def _check(fn, args, n_fused, op, group_name):
    ref = eager(fn, args)
    run = compile_run(fn, args, FUSIONS)
    assert run.matches["allreduce_norm"] == n_fused
    assert run.count(c10d.all_reduce.default) == 1 - n_fused
    assert run.count(c10d.wait_tensor.default) == 1 - n_fused
    nodes = [n for g in run.graphs for n in g.nodes if n.target is op.default]
    assert len(nodes) == n_fused
    for n in nodes:
        assert n.args[-1] == group_name  # the sum runs over exactly the matched node's group
    for o, r in zip(run.out, ref):
        assert (o - r).abs().max() <= FP32_REL_TOL * r.abs().max()
    return run


def test_post_attention_site(groups):
    world, _ = groups
    run = _check(_post_attn(world), _args(), 1, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)
    assert run.matches["post_attn_norm"] == 1 and run.count(g4.rmsnorm_add_rmsnorm.default) == 0


def test_ffn_tail_site(groups):
    world, _ = groups
    run = _check(_ffn_tail(world), _args(scalar=True), 1, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)
    # the residual here feeds no other norm, so the tail counts as the PLE-style one: same kernel
    assert run.matches["ffn_tail"] + run.matches["ple_tail"] == 1


def test_other_group_is_carried(groups):
    _, other = groups
    assert other.group_name != dist.group.WORLD.group_name
    _check(_post_attn(other), _args(), 1, g4.allreduce_rmsnorm_add_rmsnorm, other.group_name)


def test_reduced_value_with_other_users_not_folded(groups):
    world, _ = groups

    def fn(attn, residual, w1, w2):
        s = funcol.all_reduce(attn, "sum", world)
        r = residual + rms_hf(s, w1, EPS)
        return rms_hf(r, w2, EPS), r, s * 2

    _check(fn, _args(), 0, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)


def test_residual_then_norm_not_matched(groups):
    world, _ = groups

    def fn(attn, residual, w1, w2):  # the FlashInfer / vLLM order, not Gemma-4's
        r = residual + funcol.all_reduce(attn, "sum", world)
        return rms_hf(r, w1, EPS), r

    run = _check(fn, _args(), 0, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)
    assert run.matches["post_attn_norm"] == 0


def test_not_a_sum_not_folded(groups):
    world, _ = groups

    def fn(attn, residual, w1, w2):
        r = residual + rms_hf(funcol.all_reduce(attn, "max", world), w1, EPS)
        return rms_hf(r, w2, EPS), r

    _check(fn, _args(), 0, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)


def test_op_reduces_then_runs_the_epilogue(groups):
    world, _ = groups
    x, r, w1, w2 = _args()
    got = g4.allreduce_rmsnorm_add_rmsnorm(x, r, w1, None, w2, EPS, EPS, False, world.group_name)
    want = g4.rmsnorm_add_rmsnorm(x, r, w1, None, w2, EPS, EPS)  # world size 1: the sum is x
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    got1 = g4.allreduce_rmsnorm_add(x, r, w1, None, EPS, world.group_name)
    assert torch.equal(got1, g4.rmsnorm_add(x, r, w1, None, EPS))


# ---- gating: where the one-shot kernel cannot serve the group, the graph stays unfused ---------


@pytest.mark.parametrize("switch, reason", [(None, "the one-shot kernel needs CUDA"), ("0", f"{ENV_SWITCH}=0")],
                         ids=["cpu", "switched_off"])
def test_unavailable_one_shot_leaves_graph_unfused(groups, monkeypatch, caplog, switch, reason):
    world, _ = groups
    if switch is None:
        monkeypatch.delenv(ENV_SWITCH)
    else:
        monkeypatch.setenv(ENV_SWITCH, switch)
    caplog.set_level(logging.INFO, logger="gemma4_passes")
    for _ in range(2):  # a second compile of the same site says nothing new
        _check(_post_attn(world), _args(), 0, g4.allreduce_rmsnorm_add_rmsnorm, world.group_name)
    assert said(caplog, f"leaving the all-reduce over group {world.group_name!r} unfused: ") == 1
    assert said(caplog, reason) == 1

"""allreduce_norm on SGLang's and vLLM's all-reduce ops: their group names key their own registries
(``"tp:0"`` -> GroupCoordinator), resolved at pass time to the coordinator's c10d ``device_group``.

SGLang's op is the real one (``sglang.srt.distributed.parallel_state`` imports on CPU; SGLang's own
function is registered here as its CPU kernel).  vLLM is not installed: ``vllm::all_reduce`` is
defined here with vLLM's schema unless it already exists.  Both registries get a stand-in
coordinator whose ``device_group`` is a real gloo group of world size 1.
"""

import inspect
import weakref

import pytest
import torch
import torch.distributed as dist

from gemma4_passes.passes import allreduce_forms

from .conftest import FP32_REL_TOL, compile_run, eager, g4, rms_hf
from .test_allreduce_norm import EPS, FUSIONS, _args, force_one_shot, groups, said  # noqa: F401 - fixtures

c10d = torch.ops._c10d_functional
ps = pytest.importorskip("sglang.srt.distributed.parallel_state")  # registers sglang::outplace_all_reduce

SGL = "tp:0"  # SGLang's / vLLM's unique group name, not a c10d one
VLLM_GROUPS: dict = {}  # the vLLM registry handed to the resolver (vLLM's own _groups when it is installed)


class Coordinator:
    """What the pass reads of a GroupCoordinator (``device_group``), and what the eager ops call."""

    def __init__(self, pg):
        self.device_group = pg

    def _all_reduce_out_place(self, x, method=None):
        out = x.clone()
        dist.all_reduce(out, group=self.device_group)
        return out


_LIBS = []  # keeps the test-only kernel registrations alive
if not torch._C._dispatch_has_kernel_for_dispatch_key("sglang::outplace_all_reduce", "CPU"):
    # SGLang registers its op for CUDA (and Meta) only: on CPU run SGLang's own function
    _LIBS.append(torch.library.Library("sglang", "IMPL"))
    _LIBS[-1].impl("outplace_all_reduce", inspect.unwrap(ps.outplace_all_reduce), "CPU")

if not hasattr(torch.ops.vllm, "all_reduce"):

    @torch.library.custom_op("vllm::all_reduce", mutates_args=(), schema="(Tensor tensor, str group_name) -> Tensor")
    def _vllm_all_reduce(tensor, group_name):
        return VLLM_GROUPS[group_name]()._all_reduce_out_place(tensor)

    @_vllm_all_reduce.register_fake
    def _(tensor, group_name):
        return torch.empty_like(tensor)


@pytest.fixture
def coordinator(groups, monkeypatch):
    """A coordinator over the gloo group that is NOT the world (its c10d name differs from ``SGL``),
    registered under ``SGL`` in SGLang's registry and in the vLLM one the resolver is handed."""
    _, other = groups
    coord = Coordinator(other)
    monkeypatch.setitem(ps._groups, SGL, weakref.ref(coord))
    monkeypatch.setitem(VLLM_GROUPS, SGL, weakref.ref(coord))
    monkeypatch.setitem(allreduce_forms.GROUP_REGISTRIES, "vllm", lambda: VLLM_GROUPS)
    return coord


def sglang_ar(x, name=SGL):
    return torch.ops.sglang.outplace_all_reduce(x, name, "auto")


def vllm_ar(x, name=SGL):
    return torch.ops.vllm.all_reduce(x, name)


FORMS = {"sglang": (sglang_ar, torch.ops.sglang.outplace_all_reduce.default),
         "vllm": (vllm_ar, torch.ops.vllm.all_reduce.default)}


def post_attn(ar, name=SGL):
    def fn(attn, residual, w1, w2):
        r = residual + rms_hf(ar(attn, name), w1, EPS)
        return rms_hf(r, w2, EPS), r
    return fn


def ffn_tail(ar):
    def fn(down, residual, w, scalar, w_next):
        x = (residual + rms_hf(ar(down), w, EPS)) * scalar
        return rms_hf(x, w_next, EPS), x
    return fn


def check(fn, args, ar_op, n_fused, group=None):
    ref = eager(fn, args)
    run = compile_run(fn, args, FUSIONS)
    assert run.matches["allreduce_norm"] == n_fused
    assert run.count(ar_op) == 1 - n_fused
    assert run.count(c10d.all_reduce.default) == 0  # the fused op reduces inside, the graph holds none
    nodes = [n for g in run.graphs for n in g.nodes if n.target is g4.allreduce_rmsnorm_add_rmsnorm.default]
    assert len(nodes) == n_fused
    for n in nodes:
        assert n.args[-1] == group  # the coordinator's c10d group, not the framework's name
    for o, r in zip(run.out, ref):
        assert (o - r).abs().max() <= FP32_REL_TOL * r.abs().max()
    return run


@pytest.mark.parametrize("form", FORMS)
def test_post_attention_site(form, coordinator):
    ar, op = FORMS[form]
    assert coordinator.device_group.group_name != SGL
    run = check(post_attn(ar), _args(), op, 1, coordinator.device_group.group_name)
    assert run.matches["post_attn_norm"] == 1


@pytest.mark.parametrize("form", FORMS)
def test_ffn_tail_site(form, coordinator):
    ar, op = FORMS[form]
    run = check(ffn_tail(ar), _args(scalar=True), op, 1, coordinator.device_group.group_name)
    assert run.matches["ffn_tail"] + run.matches["ple_tail"] == 1


@pytest.mark.parametrize("form", FORMS)
def test_missing_registry_entry_not_folded(form, coordinator, monkeypatch, caplog):
    ar, op = FORMS[form]
    # the pass sees a registry without SGL (the op itself still finds it at run time)
    monkeypatch.setitem(allreduce_forms.GROUP_REGISTRIES, form, dict)
    caplog.set_level("INFO", logger="gemma4_passes")
    for _ in range(2):
        run = check(post_attn(ar), _args(), op, 0)
    assert run.matches["post_attn_norm"] == 1
    assert said(caplog, f"leaving the {form} all-reduce over group {SGL!r} unfused: {form} has no live group") == 1


def test_framework_not_loaded_not_folded(coordinator, monkeypatch, caplog):
    monkeypatch.setitem(allreduce_forms.GROUP_REGISTRIES, "vllm", lambda: None)
    caplog.set_level("INFO", logger="gemma4_passes")
    check(post_attn(vllm_ar), _args(), torch.ops.vllm.all_reduce.default, 0)
    assert said(caplog, "vllm's group registry is not loaded") == 1


@pytest.mark.parametrize("form", FORMS)
def test_reduced_value_with_other_users_not_folded(form, coordinator):
    ar, op = FORMS[form]

    def fn(attn, residual, w1, w2):
        s = ar(attn)
        r = residual + rms_hf(s, w1, EPS)
        return rms_hf(r, w2, EPS), r, s * 2

    check(fn, _args(), op, 0)


def test_resolution_reads_the_live_coordinator(groups, coordinator):
    world, other = groups
    assert allreduce_forms.resolve_group("sglang", SGL) == other.group_name
    dead = Coordinator(world)
    ps._groups["tp:dead"] = weakref.ref(dead)
    try:
        del dead  # SGLang's registry holds weakrefs: a destroyed group resolves to nothing
        assert allreduce_forms.resolve_group("sglang", "tp:dead") is None
    finally:
        ps._groups.pop("tp:dead")

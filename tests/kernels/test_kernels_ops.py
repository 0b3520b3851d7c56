"""The gemma4_passes::* custom ops: schemas, opcheck, fake strides, idempotent registration."""

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gemma4_passes.kernels as K
from gemma4_passes.kernels import ops
from gemma4_passes.kernels import reference as R
from kernels_testutil import rand, rand_scalar, rand_weight, rope_tables

HAS_CUDA = torch.cuda.is_available()

SCHEMAS = {
    "rmsnorm_add": "gemma4_passes::rmsnorm_add(Tensor x, Tensor residual, Tensor weight, Tensor? scalar, "
    "float eps) -> Tensor",
    "rmsnorm_add_rmsnorm": "gemma4_passes::rmsnorm_add_rmsnorm(Tensor x, Tensor residual, Tensor weight, "
    "Tensor? scalar, Tensor? next_weight, float eps, float next_eps, bool unrounded_sum=False) "
    "-> (Tensor normed, Tensor residual_out)",
    "gelu_tanh_mul": "gemma4_passes::gelu_tanh_mul(Tensor gate, Tensor other) -> Tensor",
    "q_norm_rope": "gemma4_passes::q_norm_rope(Tensor q, Tensor weight, Tensor cos, Tensor sin, float eps) -> Tensor",
    "qkv_norm_rope": "gemma4_passes::qkv_norm_rope(Tensor q, Tensor k, Tensor v, Tensor q_weight, "
    "Tensor k_weight, Tensor cos, Tensor sin, float q_eps, float k_eps, float v_eps) -> (Tensor, Tensor, Tensor)",
    "moe_input_norms": "gemma4_passes::moe_input_norms(Tensor x, Tensor residual, Tensor weight, "
    "Tensor pre_weight, Tensor pre2_weight, Tensor router_scale, float root, float eps, float pre_eps, "
    "float pre2_eps, float router_eps) -> (Tensor residual_out, Tensor pre, Tensor pre2, Tensor router_in)",
    "moe_branch_combine": "gemma4_passes::moe_branch_combine(Tensor h1, Tensor h2, Tensor residual, Tensor w1, "
    "Tensor w2, Tensor w3, Tensor? scalar, Tensor? next_weight, float eps1, float eps2, float eps3, "
    "float? next_eps) -> (Tensor normed, Tensor residual_out)",
    "moe_router": "gemma4_passes::moe_router(Tensor logits, Tensor per_expert_scale, int top_k, "
    "bool topk_first=False) -> (Tensor weights, Tensor ids)",
    "moe_dispatch": "gemma4_passes::moe_dispatch(Tensor expert_ids, Tensor hidden, Tensor weights, "
    "int num_experts, int top_k, bool zero_sentinel_rows=False) -> (Tensor sorted_ids, Tensor perm, "
    "Tensor offsets, Tensor inv_perm, Tensor hidden_sorted, Tensor weights_sorted)",
    # all-reduce + epilogue (run under a process group: tests/passes/test_allreduce_norm.py)
    "allreduce_rmsnorm_add": "gemma4_passes::allreduce_rmsnorm_add(Tensor x, Tensor residual, Tensor weight, "
    "Tensor? scalar, float eps, str group_name) -> Tensor",
    "allreduce_rmsnorm_add_rmsnorm": "gemma4_passes::allreduce_rmsnorm_add_rmsnorm(Tensor x, Tensor residual, "
    "Tensor weight, Tensor? scalar, Tensor? next_weight, float eps, float next_eps, bool unrounded_sum, "
    "str group_name) -> (Tensor normed, Tensor residual_out)",
    "allreduce_moe_branch_combine": "gemma4_passes::allreduce_moe_branch_combine(Tensor h1, Tensor h2, "
    "Tensor residual, Tensor w1, Tensor w2, Tensor w3, Tensor? scalar, Tensor? next_weight, float eps1, "
    "float eps2, float eps3, float? next_eps, str group_name) -> (Tensor normed, Tensor residual_out)",
}


def _samples(device="cpu", dtype=torch.bfloat16):
    """(op name, args) pairs covering optional inputs, strided views and k is v."""
    n = 72
    x = rand((2, 3, n + 8), dtype, device, scale=3.0)[..., :n]  # non-contiguous rows
    r = rand((2, 3, n), dtype, device)
    w = rand_weight(n, dtype, device)
    w32 = rand_weight(n, torch.float32, device)
    sc = rand_scalar(dtype, (1,), device)
    sc0 = rand_scalar(torch.float32, (), device)
    gate = rand((2, 3, n), dtype, device, scale=3.0)
    pli = rand((2, 3, 4, n), dtype, device)
    b, s, hq, hk, d = 2, 3, 4, 2, 16
    qkv = rand((b, s, (hq + 2 * hk) * d), dtype, device, scale=2.0)
    q = qkv[..., : hq * d].view(b, s, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, s, hk, d)
    v = qkv[..., (hq + hk) * d :].view(b, s, hk, d)
    qw, kw = rand_weight(d, dtype, device), rand_weight(d, torch.float32, device)
    cos, sin = rope_tables(b, s, d, dtype, device)
    n_exp = 16
    logits = rand((5, n_exp + 4), dtype, device, scale=2.0)[:, 2 : 2 + n_exp]  # row stride > E
    pes = (torch.rand(n_exp) + 0.5).to(device)
    top_k_ids = torch.randint(0, n_exp, (7, 2), device=device)
    top_k_ids[::3, 1] = n_exp  # an expert-parallel sentinel (sorted last, not counted)
    tokens = rand((7, n + 8), dtype, device)[:, :n]  # row stride > H
    top_k_w = torch.rand(7, 2, device=device)
    return [
        ("rmsnorm_add", (x, r, w, None, 1e-6)),
        ("rmsnorm_add", (x, r, w32, sc, 1e-6)),
        ("rmsnorm_add_rmsnorm", (x, r, w, sc0, None, 1e-6, 1e-5)),
        ("rmsnorm_add_rmsnorm", (x, r, w, None, w32, 1e-6, 1e-6)),
        ("rmsnorm_add_rmsnorm", (x, r, w, None, w32, 1e-6, 1e-5, True)),  # SGLang fp32 residual form
        ("gelu_tanh_mul", (gate, pli[:, :, 2, :])),
        ("q_norm_rope", (q, qw, cos, sin, 1e-6)),
        ("qkv_norm_rope", (q, k, v, qw, kw, cos, sin, 1e-6, 1e-6, 1e-6)),
        ("qkv_norm_rope", (q, k, k, qw, kw, cos, sin, 1e-6, 1e-5, 1e-4)),  # attention_k_eq_v
        ("moe_router", (logits, pes, 4)),
        ("moe_router", (logits, pes.to(dtype), 2, True)),  # SGLang / vLLM order: top-k, then softmax
        ("moe_dispatch", (top_k_ids.reshape(-1), tokens, top_k_w.reshape(-1), n_exp, 2)),
        ("moe_dispatch", (top_k_ids.reshape(-1).int(), tokens, top_k_w.reshape(-1).to(dtype), n_exp, 2, True)),
        ("moe_input_norms", (x, r, w, w32, w, w, n ** -0.5, 1e-6, 1e-5, 1e-6, 2e-6)),
        ("moe_branch_combine", (x, gate, r, w, w32, w, sc, w, 1e-6, 1e-6, 1e-5, 1e-6)),
        ("moe_branch_combine", (x, gate, r, w, w, w, None, None, 1e-6, 1e-6, 1e-6, None)),  # no next norm
    ]


_REFS = {
    "rmsnorm_add": R.rmsnorm_add_ref,
    "rmsnorm_add_rmsnorm": R.rmsnorm_add_rmsnorm_ref,
    "gelu_tanh_mul": R.gelu_tanh_mul_ref,
    "q_norm_rope": R.q_norm_rope_ref,
    "qkv_norm_rope": R.qkv_norm_rope_ref,
    "moe_input_norms": R.moe_input_norms_ref,
    "moe_branch_combine": R.moe_branch_combine_ref,
    "moe_router": lambda logits, pes, k, topk_first=False: R.moe_router_ref(
        logits, pes, k, "topk_softmax" if topk_first else "softmax_topk"
    ),
    "moe_dispatch": R.moe_dispatch_ref,
}

#: output dtypes of the ops that do not return the io dtype (from the op's args where they vary)
_OUT_DTYPES = {
    "moe_router": lambda args: (torch.float32, torch.int64),
    "moe_dispatch": lambda args: (args[0].dtype, torch.int64, torch.int32, torch.int64, args[1].dtype,
                                  args[2].dtype),
}


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def test_schemas_and_handles():
    assert K.OP_NAMES == tuple(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.gemma4_passes, name).default._schema) == schema
    assert K.rmsnorm_add_op is torch.ops.gemma4_passes.rmsnorm_add
    assert K.rmsnorm_add_rmsnorm_op is torch.ops.gemma4_passes.rmsnorm_add_rmsnorm
    assert K.gelu_tanh_mul_op is torch.ops.gemma4_passes.gelu_tanh_mul
    assert K.q_norm_rope_op is torch.ops.gemma4_passes.q_norm_rope
    assert K.qkv_norm_rope_op is torch.ops.gemma4_passes.qkv_norm_rope
    assert K.moe_router_op is torch.ops.gemma4_passes.moe_router
    assert K.moe_dispatch_op is torch.ops.gemma4_passes.moe_dispatch


def test_registration_is_idempotent():
    K.ensure_registered()
    K.ensure_registered()
    importlib.reload(ops)
    importlib.reload(K)
    K.ensure_registered()
    assert all(K.is_registered(n) for n in K.OP_NAMES)
    x = torch.randn(2, 8)
    torch.testing.assert_close(
        torch.ops.gemma4_passes.gelu_tanh_mul(x, x), R.gelu_tanh_mul_ref(x, x), rtol=0, atol=0
    )


@pytest.mark.parametrize("idx", range(len(_samples())))
def test_opcheck(idx):
    name, args = _samples()[idx]
    torch.library.opcheck(getattr(torch.ops.gemma4_passes, name).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_impl_is_reference_and_contiguous(dtype):
    for name, args in _samples(dtype=dtype):
        got = _as_tuple(getattr(torch.ops.gemma4_passes, name)(*args))
        ref = _as_tuple(_REFS[name](*args))
        dts = _OUT_DTYPES[name](args) if name in _OUT_DTYPES else (dtype,) * len(got)
        for g, r, dt in zip(got, ref, dts):
            assert g.is_contiguous() and g.dtype == dt, name
            assert torch.equal(g, r), name


def test_fake_outputs_are_contiguous_like_real():
    samples = _samples()
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_samples = [
            (n, tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
            for n, args in samples
        ]
        fakes = [_as_tuple(getattr(torch.ops.gemma4_passes, n)(*a)) for n, a in fake_samples]
    for (name, args), fake in zip(samples, fakes):
        real = _as_tuple(getattr(torch.ops.gemma4_passes, name)(*args))
        assert len(fake) == len(real)
        for f, r in zip(fake, real):
            assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride(), name
            assert r.is_contiguous(), name


def test_compiles_fullgraph():
    """The ops trace through dynamo/AOT (functional, fake impls) without graph breaks."""

    def block(x, r, w, sc, nw, gate, other):
        normed, s = torch.ops.gemma4_passes.rmsnorm_add_rmsnorm(x, r, w, sc, nw, 1e-6, 1e-6)
        return torch.ops.gemma4_passes.gelu_tanh_mul(normed + gate, other), s

    n = 48
    args = (
        rand((3, n), torch.bfloat16), rand((3, n), torch.bfloat16), rand_weight(n, torch.bfloat16),
        rand_scalar(torch.bfloat16), rand_weight(n, torch.bfloat16),
        rand((3, n), torch.bfloat16), rand((3, 2, n), torch.bfloat16)[:, 1],
    )
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    for g, e in zip(compiled(*args), block(*args)):
        assert torch.equal(g, e)


# ---- GPU only: the CUDA kernels behind the ops --------------------------------------------------


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_ops_use_triton_and_capture_in_cuda_graph():
    from gemma4_passes.kernels.norm_residual import rmsnorm_add_rmsnorm_triton

    samples = _samples("cuda")
    for name, args in samples:  # warm-up (compiles the kernels outside capture)
        getattr(torch.ops.gemma4_passes, name)(*args)
    x, r, w, sc0, _, eps, next_eps = samples[2][1]
    torch.testing.assert_close(
        torch.ops.gemma4_passes.rmsnorm_add_rmsnorm(*samples[2][1]),
        rmsnorm_add_rmsnorm_triton(x, r, w, sc0, None, eps, next_eps),
        rtol=0, atol=0,
    )
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [_as_tuple(getattr(torch.ops.gemma4_passes, n)(*a)) for n, a in samples]
    # change the scalar in place: a graph replay must read the new value (no .item() baked in)
    sc = samples[1][1][3]
    sc.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    for (name, args), got in zip(samples, outs):
        ref = _as_tuple(_REFS[name](*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))
        for g, e in zip(got, ref):
            assert g.shape == e.shape, (name, g.shape, e.shape)
            if e.numel() == 0:  # moe_branch_combine without a next norm: empty normed output
                continue
            d = (g.cpu().float() - e.float()).abs().max().item()
            assert d <= 2 ** -6 * max(1.0, e.float().abs().max().item()), (name, d)

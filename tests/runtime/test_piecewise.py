"""The piecewise backend: split at registered split ops, Inductor + passes on the other pieces."""

import pytest
import torch

import gemma4_passes
from gemma4_passes.runtime import piecewise_backend, register_split_op, unregister_split_op

g4 = torch.ops.gemma4_passes
EPS = 1e-6


@torch.library.custom_op("gemma4_passes_test::marker", mutates_args=())
def marker(x: torch.Tensor) -> torch.Tensor:
    """Stands in for attention: an opaque op the graph must be split at."""
    return x.clone()


@marker.register_fake
def _(x):
    return torch.empty_like(x)


MARKER = torch.ops.gemma4_passes_test.marker


@pytest.fixture
def split_marker():
    register_split_op(MARKER)
    yield
    unregister_split_op(MARKER)


def rms(x, w):
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + EPS, -0.5) * w.float()).type_as(x)


def layer(attn, residual, w1, w2):
    # post_attn_norm's full pattern: rms(attn) + residual -> rms(., w2)
    r = residual + rms(attn, w1)
    return rms(r, w2), r


def layer_split_inside(attn, residual, w1, w2):
    # the same math with a split op between the first norm and the residual add
    h = MARKER(rms(attn, w1))
    r = residual + h
    return rms(r, w2), r


def _args():
    torch.manual_seed(0)
    return torch.randn(2, 3, 64), torch.randn(2, 3, 64), 1 + 0.3 * torch.randn(64), 1 + 0.3 * torch.randn(64)


def _compile(fn, backend, args):
    torch._dynamo.reset()
    gemma4_passes.reset_match_report()
    return torch.compile(fn, backend=backend, fullgraph=True)(*args)


def _assert_close(got, ref):
    for g, r in zip(got, ref):
        assert (g - r).abs().max() <= 1e-5 * r.abs().max()


def test_no_split_op_one_piece_passes_run(split_marker):
    backend = piecewise_backend(["post_attn_norm"])
    args = _args()
    out = _compile(layer, backend, args)
    assert [p.is_split for p in backend.last_split.pieces] == [False]
    assert gemma4_passes.match_report()["post_attn_norm"] == 1
    _assert_close(out, layer(*args))


def test_split_op_gets_its_own_piece_and_blocks_fusion_across_it(split_marker):
    backend = piecewise_backend(["post_attn_norm"])
    args = _args()
    out = _compile(layer_split_inside, backend, args)
    kinds = [p.is_split for p in backend.last_split.pieces]
    assert kinds == [False, True, False]
    # the marker piece holds exactly the split op
    split_piece = backend.last_split.pieces[1]
    assert split_piece.n_nodes == 1
    # the first norm is in piece 0, the add + second norm in piece 2: nothing to fuse across
    assert gemma4_passes.match_report()["post_attn_norm"] == 0
    _assert_close(out, layer_split_inside(*args))


def test_unregistered_op_is_not_split():
    backend = piecewise_backend(["post_attn_norm"])
    args = _args()
    out = _compile(layer_split_inside, backend, args)
    assert [p.is_split for p in backend.last_split.pieces] == [False]
    _assert_close(out, layer_split_inside(*args))


def test_explicit_split_ops_and_bad_fusion_name():
    backend = piecewise_backend(["post_attn_norm"], split_ops=[MARKER])
    _compile(layer_split_inside, backend, _args())
    assert sum(p.is_split for p in backend.last_split.pieces) == 1
    with pytest.raises(ValueError, match="no_such"):
        piecewise_backend(["no_such"])

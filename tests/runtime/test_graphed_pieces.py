"""Per-bucket capture of compiled pieces and the capture-time parity guard.

On CPU the capture is emulated (a replay recomputes into the static outputs), so bucketing,
padding, static buffers, in-place reads of the previous piece's outputs, the fallbacks and the
parity guard are all exercised; the CUDA test at the end captures real CUDA graphs.
"""

import logging
import operator

import pytest
import torch

import gemma4_passes
from gemma4_passes.runtime import (
    EmulatedCapture,
    GraphedPiece,
    ParityGuard,
    piecewise_backend,
    register_split_op,
    unregister_split_op,
)

EPS = 1e-6
H = 32


@torch.library.custom_op("gemma4_passes_test::attn_standin", mutates_args=())
def attn_standin(x: torch.Tensor) -> torch.Tensor:
    """Stands in for attention: opaque, row-wise, split at."""
    return torch.tanh(x) * 0.5


@attn_standin.register_fake
def _(x):
    return torch.empty_like(x)


ATTN = torch.ops.gemma4_passes_test.attn_standin


@pytest.fixture(autouse=True)
def split_attn():
    register_split_op(ATTN)
    yield
    unregister_split_op(ATTN)


def rms(x, w):
    xf = x.float()
    return (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + EPS, -0.5) * w.float()).type_as(x)


def two_layers(x, w1, w2, w3, wp):
    """Three compiled pieces around two split ops; the last piece returns two outputs."""
    a = ATTN(rms(x, w1))
    r = x + rms(a, w2)
    b = ATTN(r @ wp)
    r2 = r + rms(b, w3)
    return r2, rms(r2, w1)


def cut_rows(x, last, w1, w2, wp):
    """A row cut between pieces (YOCO's shape): the pieces after it run on len(last) rows."""
    a = ATTN(rms(x, w1))
    r = (x + rms(a, w2)).index_select(0, last)
    b = ATTN(r @ wp)
    return r + rms(b, w2)


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [1 + 0.3 * torch.randn(H, generator=g) for _ in range(3)] + [torch.randn(H, H, generator=g) / H**0.5]


def _x(n, seed):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def _compile(fn, backend):
    torch._dynamo.reset()
    gemma4_passes.reset_match_report()
    return torch.compile(fn, backend=backend, fullgraph=True)


def _close(got, ref, tol=1e-5):
    got = got if isinstance(got, (tuple, list)) else [got]
    ref = ref if isinstance(ref, (tuple, list)) else [ref]
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert (g - r).abs().max() <= tol * r.abs().max(), (g - r).abs().max()


def _backend(**kw):
    kw.setdefault("buckets", (4, 8, 16))
    return piecewise_backend(["post_attn_norm"], cudagraphs=True, capturer=EmulatedCapture(), **kw)


def _run_sizes(fn, backend, sizes, w):
    compiled = _compile(fn, backend)
    outs = []
    for i, n in enumerate(sizes):
        x = _x(n, i)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
        outs.append((compiled(x, *w), fn(x, *w)))
    return outs


def test_pieces_are_captured_per_bucket_and_padded_rows_do_not_leak():
    backend = _backend()
    w = _weights()
    for got, ref in _run_sizes(two_layers, backend, [3, 5, 8, 4, 13, 16, 7], w):
        _close(got, ref)
    pieces = backend.pieces
    assert len(pieces) == 3 and all(isinstance(p, GraphedPiece) for p in pieces.values())
    # sizes 3,4 -> bucket 4; 5,7,8 -> 8; 13,16 -> 16: three captures per piece, nothing rejected
    assert backend.capture.captures == 3 * 3
    assert all(sorted(p.graphs) == [4, 8, 16] for p in pieces.values())
    assert backend.capture.rejected == []


def test_above_largest_bucket_runs_uncaptured_and_correct(caplog):
    backend = _backend()
    w = _weights()
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        for got, ref in _run_sizes(two_layers, backend, [3, 40], w):
            _close(got, ref)
    assert backend.capture.captures == 3  # only bucket 4
    assert "above the largest captured size 16" in caplog.text


def test_next_piece_reads_previous_static_output_in_place():
    backend = _backend()
    w = _weights()
    _run_sizes(two_layers, backend, [6, 6], w)
    names = sorted(backend.pieces)
    first, last = backend.pieces[names[0]], backend.pieces[names[-1]]
    produced = {o.data_ptr() for o in first.graphs[8].outs if isinstance(o, torch.Tensor)}
    consumed = {a.data_ptr() for a in last.graphs[8].static_args if isinstance(a, torch.Tensor)}
    # the middle piece's residual r feeds the last piece: read from its static buffer, no copy
    middle = backend.pieces[names[1]]
    middle_out = {o.data_ptr() for o in middle.graphs[8].outs if isinstance(o, torch.Tensor)}
    assert middle_out & consumed, "the last piece should read the middle piece's residual in place"
    assert produced  # the first piece produced static outputs


def test_returned_outputs_survive_the_next_replay():
    backend = _backend()
    w = _weights()
    compiled = _compile(two_layers, backend)
    x1, x2 = _x(6, 1), _x(6, 2)
    torch._dynamo.mark_dynamic(x1, 0)
    first = compiled(x1, *w)
    kept = [t.clone() for t in first]
    compiled(x2, *w)
    compiled(x2, *w)
    for a, b in zip(first, kept):
        assert torch.equal(a, b)


def test_parity_guard_catches_a_corrupted_piece_and_falls_back(caplog):
    names = []

    def inject(piece, bucket):
        names.append((piece, bucket))
        return bucket == 8 and piece == sorted({p for p, _ in names})[0]

    backend = _backend(fault_injection=inject)
    w = _weights()
    with caplog.at_level(logging.WARNING, logger="gemma4_passes"):
        for got, ref in _run_sizes(two_layers, backend, [6, 3, 7, 8, 13], w):
            _close(got, ref)  # every call correct: the corrupted size runs uncaptured
    rejected = backend.capture.rejected
    assert len(rejected) == 1 and rejected[0][1] == 8
    piece = rejected[0][0]
    assert f"piece {piece} captured at 8 tokens does not match" in caplog.text
    assert "relative error" in caplog.text
    # only that size of that piece fell back; the other pieces and sizes stay captured
    assert backend.pieces[piece].graphs[8] is not None
    assert sorted(k for k, v in backend.pieces[piece].graphs.items() if hasattr(v, "replay")) == [4, 16]


def test_parity_guard_off_lets_the_corruption_through():
    # the same fault without the guard gives wrong results: the guard is what catches it
    backend = _backend(parity_guard=False, fault_injection=lambda piece, bucket: True)
    w = _weights()
    (got, ref), = _run_sizes(two_layers, backend, [6], w)
    assert (got[0] - ref[0]).abs().max() > 0.1


def test_parity_guard_model_policy_stops_all_capture(caplog):
    backend = _backend(parity_guard=ParityGuard(on_mismatch="model"), fault_injection=lambda p, b: b == 8)
    w = _weights()
    with caplog.at_level(logging.WARNING, logger="gemma4_passes"):
        for got, ref in _run_sizes(two_layers, backend, [6, 3, 13], w):
            _close(got, ref)
    assert backend.capture.disabled_reason is not None
    assert backend.capture.captures == 1  # the first capture was rejected, nothing captured after
    assert "the whole model runs uncaptured" in caplog.text


def test_parity_guard_is_silent_on_correct_graphs(caplog):
    backend = _backend()
    with caplog.at_level(logging.WARNING, logger="gemma4_passes"):
        _run_sizes(two_layers, backend, [3, 6, 12], _weights())
    assert backend.capture.rejected == [] and "parity guard" not in caplog.text


def test_pieces_after_a_row_cut_are_captured_at_their_own_size(caplog):
    backend = _backend()
    w = [_weights()[0], _weights()[1], _weights()[3]]
    compiled = _compile(cut_rows, backend)
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        for i, (n, rows) in enumerate([(12, 3), (13, 2), (15, 3)]):
            x, last = _x(n, i), torch.arange(n - rows, n)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(last, 0)
            _close(compiled(x, last, *w), cut_rows(x, last, *w))
    first, cut, after = (backend.pieces[k] for k in sorted(backend.pieces))
    assert sorted(first.graphs) == [16]  # 12..15 tokens
    assert not cut.shape.capturable and "2 size symbols" in cut.shape.reason
    assert sorted(after.graphs) == [4]  # 2..3 rows after the cut
    assert "runs uncaptured: shapes depend on 2 size symbols" in caplog.text


def test_input_at_another_address_is_copied_in(caplog):
    backend = _backend()
    w = _weights()
    compiled = _compile(two_layers, backend)
    x = _x(6, 0)
    torch._dynamo.mark_dynamic(x, 0)
    compiled(x, *w)
    captures = backend.capture.captures
    w2 = [t.clone() * 1.1 for t in w]
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        _close(compiled(x, *w2), two_layers(x, *w2))
    assert "changed address since capture; copied into static buffers" in caplog.text
    assert backend.capture.captures > captures  # recaptured with those inputs copied in
    # later calls replay with whatever those inputs hold now: other values, other addresses
    captures = backend.capture.captures
    for seed in (3, 4):
        w3 = [t.clone() * (1 + seed / 10) for t in _weights(seed)]
        _close(compiled(x, *w3), two_layers(x, *w3))
    assert backend.capture.captures == captures


def test_static_piece_replays_new_activations():
    # no dynamic dim: the pieces are static, and x arrives at a new address every call
    backend = _backend()
    w = _weights()
    compiled = _compile(two_layers, backend)
    for seed in range(4):
        x = _x(6, seed)
        _close(compiled(x, *w), two_layers(x, *w))
    assert backend.capture.captures >= 1 and not backend.capture.rejected


def test_cpu_default_is_uncaptured():
    backend = piecewise_backend(["post_attn_norm"])
    w = _weights()
    compiled = _compile(two_layers, backend)
    x = _x(6, 0)
    _close(compiled(x, *w), two_layers(x, *w))
    assert backend.capture is None and not any(isinstance(p, GraphedPiece) for p in backend.pieces.values())


def test_bad_buckets_and_policy():
    with pytest.raises(ValueError, match="buckets"):
        piecewise_backend([], buckets=(0, 4))
    with pytest.raises(ValueError, match="on_mismatch"):
        ParityGuard(on_mismatch="piece")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_replay_and_guard():
    backend = piecewise_backend(["post_attn_norm"], buckets=(4, 8, 16), fault_injection=lambda p, b: b == 16)
    w = [t.cuda() for t in _weights()]
    compiled = _compile(two_layers, backend)
    for i, n in enumerate([3, 6, 8, 13, 5]):
        x = _x(n, i).cuda()
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
        _close(compiled(x, *w), two_layers(x, *w), tol=1e-4)
    assert backend.capture.captures == 9
    assert {b for _, b, _ in backend.capture.rejected} == {16}


def test_strided_token_input_is_captured_in_its_own_layout(caplog):
    # a column slice of a wider buffer (row stride 2H): the bucket buffer keeps that layout
    backend = _backend()
    w = _weights()
    compiled = _compile(two_layers, backend)
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        for i, n in enumerate((6, 3, 12)):
            wide = torch.randn(n, 2 * H, generator=torch.Generator().manual_seed(i))
            x = wide[:, :H]
            if i == 0:
                torch._dynamo.mark_dynamic(wide, 0)
                x = wide[:, :H]
            _close(compiled(x, *w), two_layers(x, *w))
    assert "not contiguous" not in caplog.text
    assert backend.capture.captures >= 2 and not backend.capture.rejected


def writes_token_input(x, acc, w1, w2, w3, wp):
    acc.add_(x)  # a token-sized input written in place by the first piece
    a = ATTN(rms(x, w1))
    return x + rms(a, w2)


def test_piece_writing_its_token_input_runs_uncaptured(caplog):
    backend = _backend()
    w = _weights()
    compiled = _compile(writes_token_input, backend)
    with caplog.at_level(logging.INFO, logger="gemma4_passes"):
        for i, n in enumerate((6, 3, 6)):
            x, acc = _x(n, i), _x(n, 10 + i)
            if i == 0:
                torch._dynamo.mark_dynamic(x, 0)
                torch._dynamo.mark_dynamic(acc, 0)
            want_acc = acc + x
            _close(compiled(x, acc, *w), writes_token_input(x, acc.clone(), *w))
            assert torch.equal(acc, want_acc)  # the write reached the caller's tensor
    assert "writes its token-sized inputs" in caplog.text


def test_mutated_inputs_found():
    from gemma4_passes.runtime.piece_shapes import mutated_inputs

    def f(a, b, c):
        a.add_(1)
        b[:, 0].copy_(c[:, 0])
        return a + b + c

    assert mutated_inputs(torch.fx.symbolic_trace(f)) == {0, 1}
    assert mutated_inputs(torch.fx.symbolic_trace(lambda a, b: (a * 2, b.view(-1)))) == frozenset()

    def g(a, c, d):
        torch.add(c, 1, out=d)  # out=
        return a

    assert mutated_inputs(torch.fx.symbolic_trace(g)) == {2}
    # as Dynamo records them: x[0] = 1.0 through a view (operator.setitem), torch.Tensor.mul_(y, 2),
    # w += 1 (operator.iadd)
    graph = torch.fx.Graph()
    x, y, w, z = (graph.placeholder(n) for n in "xywz")
    graph.call_function(operator.setitem, (graph.call_method("view", (x, -1)), 0, 1.0))
    graph.call_function(torch.Tensor.mul_, (y, 2))
    graph.call_function(operator.iadd, (w, 1))
    graph.output(z)
    assert mutated_inputs(torch.fx.GraphModule(torch.nn.Module(), graph)) == {0, 1, 2}

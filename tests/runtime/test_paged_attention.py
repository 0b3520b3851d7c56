"""The paged attention op and the transformers Gemma-4 models run through it.

* op level: against a dense masked softmax, KV-shared calls write nothing, padding, opcheck;
* model level, against transformers' own SDPA attention (each request run alone, no cache): a
  prefill of requests of different lengths, decode steps for all of them at once, sequences far
  past the sliding window (the sliding pool reusing released pages), extend chunks, mixed batches;
* the KV-shared guard: the piecewise-compiled model calls the op with K/V absent in every
  KV-shared layer, writes each cache exactly once per KV-owning layer, and matches eager.

Every cache buffer starts as NaN, so a read of a slot nobody wrote turns the logits NaN.
Tolerances: fp64 runs agree with SDPA to 1e-10 (same semantics, up to reassociation); fp32 to
1e-4 of the largest logit, the project's fp32 parity bound (transformers' own SDPA and eager
attention differ by ~2e-5 on these models in fp32, so 1e-5 absolute is below the noise floor).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from gemma4_passes import presets
from gemma4_passes.models import build_model
from gemma4_passes.runtime.paged_attention import ATTN_IMPLEMENTATION, PagedBatch, paged_attention
from gemma4_passes.runtime.paged_cache import FULL_POOL, SLIDING_POOL, OutOfPagesError, PagedKVCache, sliding_pages_bound
from gemma4_passes.runtime.paged_runner import PagedGemma4Runner

PRESETS = ["tiny-e2b", "tiny-e4b", "tiny-31b", "tiny-26b-a4b"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is steadier and faster than two."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------
# Op level
# ------------------------------------------------------------------------------------------------
def _dense_attention(q, keys, values, q_pos, window):
    """One request, straight from its whole K/V history: [n, Hq, D] queries at positions q_pos."""
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    kpos = torch.arange(keys.shape[0])
    mask = kpos[None, :] <= q_pos[:, None]
    if window:
        mask &= kpos[None, :] > q_pos[:, None] - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=1.0)
    return out.transpose(0, 1)


class _OpHarness:
    """Requests on a hand-built page layout (shuffled pages), driven through the op directly."""

    def __init__(self, window, heads=4, kv_heads=2, dim=8, page_size=4, pages=32, dtype=torch.float64):
        g = torch.Generator().manual_seed(0)
        self.g, self.window, self.heads, self.kv_heads, self.dim, self.ps = g, window, heads, kv_heads, dim, page_size
        self.dtype = dtype
        self.k_cache = torch.full((pages, page_size, kv_heads, dim), float("nan"), dtype=dtype)
        self.v_cache = torch.full_like(self.k_cache, float("nan"))
        self.free = torch.randperm(pages, generator=g).tolist()
        self.tables: list[list[int]] = []
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []  # full K/V per request

    def add(self):
        self.tables.append([])
        self.history.append((torch.empty(0, self.kv_heads, self.dim, dtype=self.dtype),) * 2)
        return len(self.tables) - 1

    def step(self, new_tokens, kv_shared=False):
        """new_tokens[r] new tokens for request r (0: not in this batch). Returns (out, expected)."""
        rids = [r for r, n in enumerate(new_tokens) if n]
        qs, ks, vs, slots, starts, lens, expect_args = [], [], [], [], [0], [], []
        for r in rids:
            n = new_tokens[r]
            old = self.history[r][0].shape[0]
            while len(self.tables[r]) * self.ps < old + n:
                self.tables[r].append(self.free.pop())
            q = torch.randn(n, self.heads, self.dim, generator=self.g, dtype=self.dtype)
            k = torch.randn(n, self.kv_heads, self.dim, generator=self.g, dtype=self.dtype)
            v = torch.randn(n, self.kv_heads, self.dim, generator=self.g, dtype=self.dtype)
            if not kv_shared:
                self.history[r] = (torch.cat([self.history[r][0], k]), torch.cat([self.history[r][1], v]))
            pos = torch.arange(old, old + n) if not kv_shared else torch.arange(old - n, old)
            slots += [self.tables[r][p // self.ps] * self.ps + p % self.ps for p in pos.tolist()]
            qs.append(q), ks.append(k), vs.append(v)
            starts.append(starts[-1] + n)
            lens.append(int(pos[-1]) + 1)
            expect_args.append((q, r, pos))
        width = max(len(self.tables[r]) for r in rids)
        table = torch.tensor([self.tables[r] + [-1] * (width - len(self.tables[r])) for r in rids], dtype=torch.int32)
        k = None if kv_shared else torch.cat(ks)
        v = None if kv_shared else torch.cat(vs)
        out = paged_attention(
            torch.cat(qs), k, v, self.k_cache, self.v_cache, torch.tensor(slots), table,
            torch.tensor(starts, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), self.window, 1.0,
        )
        expected = torch.cat([
            _dense_attention(q, self.history[r][0][: pos[-1] + 1], self.history[r][1][: pos[-1] + 1], pos, self.window)
            for q, r, pos in expect_args
        ])
        return out, expected


@pytest.mark.parametrize("gather_bytes", [None, 1], ids=["one-group", "group-per-request"])
@pytest.mark.parametrize("window", [0, 5], ids=["full", "sliding"])
def test_op_matches_dense_attention_on_mixed_batches(window, gather_bytes, monkeypatch):
    import gemma4_passes.runtime.paged_attention as pa

    if gather_bytes is not None:  # decode batches split into groups of one request
        monkeypatch.setattr(pa, "DECODE_GATHER_BYTES", gather_bytes)
    h = _OpHarness(window)
    for _ in range(3):
        h.add()
    steps = [
        [9, 3, 1],  # prefill of three lengths
        [1, 1, 1],  # decode
        [6, 1, 0],  # extend + decode; request 2 idle
        [1, 7, 2],
        [1, 1, 1],
    ]
    for new in steps:
        out, expected = h.step(new)
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_op_kv_shared_call_reads_and_writes_nothing_new():
    h = _OpHarness(window=5)
    h.add(), h.add()
    h.step([7, 3])
    before = (h.k_cache.clone(), h.v_cache.clone())
    out, expected = h.step([2, 1], kv_shared=True)  # queries over the last tokens, k = v = None
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.equal(h.k_cache.nan_to_num(7.0), before[0].nan_to_num(7.0))
    assert torch.equal(h.v_cache.nan_to_num(7.0), before[1].nan_to_num(7.0))


def test_op_padding_tokens_write_nothing_and_return_zero():
    k_cache = torch.full((4, 4, 1, 8), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    q, k, v = torch.randn(3, 2, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    out = paged_attention(
        q, k, v, k_cache, v_cache, torch.tensor([4, 5, -1]), torch.tensor([[1]], dtype=torch.int32),
        torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 0, 1.0,
    )
    assert torch.equal(out[2], torch.zeros(2, 8))
    assert not torch.isnan(out[:2]).any()
    assert torch.isnan(k_cache.view(-1, 1, 8)[6:]).all()  # the padding token's would-be slot
    # decode with a padding request (no queries, length 0) beside a real one
    out = paged_attention(
        q[:2], None, None, k_cache, v_cache, torch.tensor([-1, -1]), torch.tensor([[1], [-1]], dtype=torch.int32),
        torch.tensor([0, 1, 1], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32), 0, 1.0,
    )
    assert not torch.isnan(out[0]).any() and torch.equal(out[1], torch.zeros(2, 8))
    with pytest.raises(ValueError, match="a real token has no slot"):
        paged_attention(q, k, v, k_cache, v_cache, torch.tensor([4, -1, -1]), torch.tensor([[1]], dtype=torch.int32),
                        torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 0, 1.0)
    with pytest.raises(ValueError, match="both k and v"):
        paged_attention(q, k, None, k_cache, v_cache, torch.tensor([4, 5, -1]), torch.tensor([[1]], dtype=torch.int32),
                        torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2], dtype=torch.int32), 0, 1.0)


def test_opcheck():
    k_cache = torch.zeros(4, 4, 2, 8)
    v_cache = torch.zeros(4, 4, 2, 8)
    table = torch.tensor([[2, 0], [3, -1]], dtype=torch.int32)
    qsl = torch.tensor([0, 5, 6], dtype=torch.int32)
    lens = torch.tensor([5, 1], dtype=torch.int32)
    slots = torch.tensor([8, 9, 10, 11, 0, 12])
    for k, v in ((torch.randn(6, 2, 8), torch.randn(6, 2, 8)), (None, None)):
        torch.library.opcheck(paged_attention, (torch.randn(6, 4, 8), k, v, k_cache, v_cache, slots, table, qsl, lens, 3, 1.0))


# ------------------------------------------------------------------------------------------------
# Model level, against transformers SDPA
# ------------------------------------------------------------------------------------------------
_MODELS: dict = {}


def _models(name, dtype):
    """(model for the paged runner, untouched SDPA reference), same weights; built once per module."""
    key = (name if isinstance(name, str) else name.name, dtype)
    if key not in _MODELS:
        # grouped_mm (transformers' default MoE path on CPU) has no fp64 kernel
        experts = "eager" if dtype == torch.float64 else None
        ref = build_model(name, dtype=dtype, seed=0, attn_implementation="sdpa", experts_implementation=experts)
        _MODELS[key] = (copy.deepcopy(ref), ref)
    paged, ref = _MODELS[key]
    return paged, ref


def _sdpa_last_logits(ref, seqs):
    with torch.no_grad():
        return torch.stack([ref(input_ids=torch.tensor(s)[None], use_cache=False).logits[0, -1] for s in seqs])


def _assert_matches(got, want, dtype, what):
    assert not torch.isnan(got).any(), f"{what}: NaN logits (an unwritten cache slot was read)"
    err = (got - want).abs().max().item()
    bound = TOL[dtype] * (1.0 if dtype == torch.float64 else want.abs().max().item())
    assert err <= bound, f"{what}: max |paged - sdpa| = {err:.3g} > {bound:.3g}"


def _prompts(lengths, seed=0, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", PRESETS)
def test_prefill_then_decode_matches_sdpa(name, dtype):
    model, ref = _models(name, dtype)
    window = presets.resolve(name).sliding_window
    cache = PagedKVCache.for_model(model, max_requests=3, max_seq_len=64, page_size=4)
    runner = PagedGemma4Runner(model, cache)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    # three lengths: inside the window, just past it, well past it (the prefill itself wraps)
    seqs = _prompts([5, window + 3, 2 * window + 7])
    logits = runner.prefill(seqs)
    _assert_matches(logits, _sdpa_last_logits(ref, seqs), dtype, f"{name} prefill")
    for step in range(6):
        tokens = logits.argmax(-1).tolist()
        for s, t in zip(seqs, tokens):
            s.append(t)
        logits = runner.decode(tokens)
        want = _sdpa_last_logits(ref, seqs)
        _assert_matches(logits, want, dtype, f"{name} decode step {step}")
        assert logits.argmax(-1).tolist() == want.argmax(-1).tolist()
    for rid in runner.request_ids:
        assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, 4)


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-31b"])
def test_long_sequences_wrap_the_sliding_pool(name):
    """Requests many windows long in a sliding pool that only fits the windows: its pages are
    released and reused over and over, and the logits still match."""
    dtype = torch.float64
    model, ref = _models(name, dtype)
    window, ps, chunk = presets.resolve(name).sliding_window, 4, 6
    per_request = sliding_pages_bound(window, ps, chunk)
    cache = PagedKVCache(model, num_full_pages=64, num_sliding_pages=2 * per_request, page_size=ps)
    runner = PagedGemma4Runner(model, cache)
    seqs = _prompts([chunk, chunk - 1], seed=1)
    logits = runner.prefill(seqs)
    total = 0
    while total < 5 * window:  # extend chunks, then decode
        chunks = _prompts([chunk, chunk], seed=total + 2)
        for s, c in zip(seqs, chunks):
            s.extend(c)
        logits = runner.extend(chunks)
        total += chunk
    for _ in range(3):
        tokens = logits.argmax(-1).tolist()
        for s, t in zip(seqs, tokens):
            s.append(t)
        logits = runner.decode(tokens)
    assert min(len(s) for s in seqs) > 4 * window
    _assert_matches(logits, _sdpa_last_logits(ref, seqs), dtype, f"{name} long")
    for rid in runner.request_ids:
        assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, ps)


@pytest.mark.parametrize("name", ["tiny-e4b", "tiny-26b-a4b"])
def test_extend_matches_one_shot_prefill(name):
    dtype = torch.float64
    model, ref = _models(name, dtype)
    (seq,) = _prompts([29], seed=3)
    one_shot = PagedGemma4Runner(model, PagedKVCache.for_model(model, max_requests=1, max_seq_len=64))
    want = one_shot.prefill([seq])
    chunked = PagedGemma4Runner(model, PagedKVCache.for_model(model, max_requests=2, max_seq_len=64, page_size=4))
    chunked.prefill([seq[:7]])
    chunked.extend([seq[7:10]])
    # a mixed batch: the first request extends while a new request's prompt is prefilled alongside
    (other,) = _prompts([4], seed=4)
    other_id = chunked.cache.add_request()
    chunked.request_ids.append(other_id)
    got = chunked.step([(chunked.request_ids[0], seq[10:]), (other_id, other)])
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=0)
    _assert_matches(got, _sdpa_last_logits(ref, [seq, other]), dtype, f"{name} extend")


def test_kv_shared_layers_read_the_owner_cache(monkeypatch):
    """The op gets K/V only in KV-owning layers; a NaN in the owner's slot of a key every query
    sees turns the logits NaN; released sliding pages can hold anything."""
    import gemma4_passes.runtime.paged_attention as pa

    name, dtype = "tiny-e4b", torch.float64
    p = presets.resolve(name)
    model, _ = _models(name, dtype)
    cache = PagedKVCache.for_model(model, max_requests=1, max_seq_len=64, page_size=4)
    runner = PagedGemma4Runner(model, cache)
    calls = []

    def spy(q, k, v, k_cache, *rest):
        calls.append((k is None, v is None, k_cache))
        return paged_attention(q, k, v, k_cache, *rest)

    monkeypatch.setattr(pa, "paged_attention", spy)
    (seq,) = _prompts([20], seed=5)
    runner.prefill([seq])
    rid = runner.request_ids[0]
    assert [(kn, vn) for kn, vn, _ in calls] == [(i in p.kv_shared_layers,) * 2 for i in range(p.num_hidden_layers)]
    assert all(calls[i][2] is cache.layer_kv(p.kv_source(i))[0] for i in range(p.num_hidden_layers))
    # released sliding pages (outside every later window) and free pages may hold anything
    assert cache.pages(rid, SLIDING_POOL).count(-1) > 0
    free = torch.tensor(cache.pools[SLIDING_POOL]._free, dtype=torch.long)
    for layer in cache.owning_layers:
        if cache.layer(layer).pool == SLIDING_POOL:
            for t in cache.layer_kv(layer):
                t[free] = float("nan")
    assert not torch.isnan(runner.decode([1])).any()
    # poison position 0 in the full-attention owner (every full-layer query attends to it)
    owner = p.kv_producers[presets.FULL]
    k, _ = cache.layer_kv(owner)
    flat = k.view(-1, *k.shape[2:])
    flat[cache.slots(rid, FULL_POOL, [0])[0]] = float("nan")
    assert torch.isnan(runner.decode([2])).all()


def test_padded_batches_match_unpadded():
    """Token padding (what a CUDA-graph bucket adds): pad rows write nothing, logits unchanged."""
    name, dtype = "tiny-31b", torch.float64
    model, _ = _models(name, dtype)
    seqs = _prompts([6, 3], seed=9)
    runs = []
    for pad in (None, lambda n: 16):
        cache = PagedKVCache.for_model(model, max_requests=2, max_seq_len=32, page_size=4)
        runner = PagedGemma4Runner(model, cache, pad_tokens_to=pad)
        runs.append([runner.prefill(seqs), runner.decode([5, 7])])
        meta = runner.last_batch
        assert isinstance(meta, PagedBatch) and meta.num_tokens == (2 if pad is None else 16)
        assert meta.slot_mapping[FULL_POOL].shape == (meta.num_tokens,)
        assert meta.page_table[FULL_POOL].shape == (2, 8)  # max_pages_per_request wide
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_runner_out_of_pages_rolls_back():
    name, dtype = "tiny-31b", torch.float64
    model, _ = _models(name, dtype)
    cache = PagedKVCache(model, num_full_pages=6, num_sliding_pages=64, page_size=4)
    runner = PagedGemma4Runner(model, cache)
    runner.prefill(_prompts([8], seed=6))
    free = {n: pool.num_free for n, pool in cache.pools.items()}
    with pytest.raises(OutOfPagesError, match="'full' pool is out of pages"):
        runner.prefill(_prompts([9, 9], seed=7))
    assert {n: pool.num_free for n, pool in cache.pools.items()} == free
    assert len(runner.request_ids) == 1
    runner.decode([3])  # the surviving request still runs
    with pytest.raises(ValueError, match="paged_batch"):
        model(input_ids=torch.tensor([[1, 2]]))


# ------------------------------------------------------------------------------------------------
# KV-shared guard under the piecewise backend
# ------------------------------------------------------------------------------------------------
def _op_calls(split_module):
    """(top-level call_module node, op node inside it) per paged-attention call, in graph order."""
    calls = []
    for node in split_module.graph.nodes:
        if node.op != "call_module":
            continue
        sub = split_module.get_submodule(node.target) if node.target in split_module._modules else None
        if sub is None:  # compiled pieces are no longer submodules
            continue
        for inner in sub.graph.nodes:
            target = getattr(inner.target, "overloadpacket", inner.target)  # Dynamo records the packet
            if inner.op == "call_function" and target is paged_attention:
                calls.append((node, inner, sub))
    return calls


def test_piecewise_kv_shared_guard():
    """Compiled with the piecewise backend (default fusions): every KV-shared layer's attention is
    a split-op call with K/V None reading its owner's cache; one cache write per KV-owning layer,
    each before the shared layers' reads; only split pieces touch the caches; outputs match eager."""
    from gemma4_passes.runtime import piecewise_backend

    preset = presets.layer_slice("tiny-e4b", 4)  # S F | S F: both kinds of KV-shared layer
    model, _ = _models(preset, torch.float32)
    compiled_model = copy.deepcopy(model)
    backend = piecewise_backend()
    prompts = _prompts([3, 9, 14], seed=8)

    eager = PagedGemma4Runner(model, PagedKVCache.for_model(model, max_requests=3, max_seq_len=32, page_size=4))
    want = eager.prefill(prompts)
    cache = PagedKVCache.for_model(compiled_model, max_requests=3, max_seq_len=32, page_size=4)
    runner = PagedGemma4Runner(compiled_model, cache, forward=torch.compile(compiled_model, backend=backend))
    got = runner.prefill(prompts)
    _assert_matches(got, want, torch.float32, "piecewise vs eager")

    split = backend.last_split.module
    calls = _op_calls(split)
    n_layers = preset.num_hidden_layers
    assert len(calls) == n_layers
    assert sum(p.is_split for p in backend.last_split.pieces) == n_layers
    shared = set(preset.kv_shared_layers)
    writes, reads_by_cache = {}, {}
    for layer, (outer, inner, sub) in enumerate(calls):
        # the piece holds the op alone; map its k_cache placeholder to the top-level input
        assert [n.op for n in sub.graph.nodes if n.op not in ("placeholder", "output")] == ["call_function"]
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        k, v, k_cache = inner.args[1], inner.args[2], inner.args[3]
        top_cache = outer.args[placeholders.index(k_cache)]
        if layer in shared:
            assert k is None and v is None, f"KV-shared layer {layer} passes K/V to the op"
            reads_by_cache.setdefault(top_cache, []).append(outer)
        else:
            assert k is not None and v is not None
            assert top_cache not in writes, "two layers write one cache"
            writes[top_cache] = outer
    assert len(writes) == n_layers - len(shared)  # one cache write per KV-owning layer
    order = {n: i for i, n in enumerate(split.graph.nodes)}
    for cache_node, readers in reads_by_cache.items():
        assert cache_node in writes, "a KV-shared layer reads a cache no owner wrote"
        assert all(order[writes[cache_node]] < order[r] for r in readers)
    # no compiled (non-split) piece receives a cache tensor: nothing else can write the caches
    split_nodes = {outer for outer, _, _ in calls}
    for cache_node in writes:
        assert all(user in split_nodes for user in cache_node.users)

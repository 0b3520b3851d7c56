"""The paged KV cache: two pools, KV-shared layers on their owner's storage, the sliding pool
keeping only the window, page accounting and clear errors."""

import math

import pytest
import torch

from gemma4_passes import presets
from gemma4_passes.runtime.paged_cache import (
    FULL_POOL,
    SLIDING_POOL,
    OutOfPagesError,
    PagedKVCache,
    sliding_pages_bound,
)


def _cache(preset="tiny-e4b", full=64, sliding=64, page_size=4, **kw):
    return PagedKVCache(preset, num_full_pages=full, num_sliding_pages=sliding, page_size=page_size, **kw)


def _grow(cache, rid, n):
    cache.reserve([(rid, n)])
    cache.commit([(rid, n)])


@pytest.mark.parametrize("name", ["tiny-e2b", "tiny-e4b", "tiny-31b", "tiny-26b-a4b"])
def test_pools_follow_layer_types_and_kv_sharing(name):
    p = presets.resolve(name)
    cache = _cache(name)
    for i, info in enumerate(cache.layers):
        sliding = p.layer_types[i] == presets.SLIDING
        assert info.pool == (SLIDING_POOL if sliding else FULL_POOL)
        assert info.owner == p.kv_source(i)
        assert info.kv_shared == (i in p.kv_shared_layers)
        assert info.sliding_window == (p.sliding_window if sliding else 0)
        k, v = cache.layer_kv(i)
        owner_k, owner_v = cache.layer_kv(p.kv_source(i))
        assert k is owner_k and v is owner_v  # KV-shared layers read the owner's tensors, own none
        heads = p.num_key_value_heads if sliding else p.full_kv_heads
        dim = p.head_dim if sliding else p.global_head_dim
        assert k.shape == (64, 4, heads, dim)
    owners = [i for i in range(p.num_hidden_layers) if i not in p.kv_shared_layers]
    assert cache.owning_layers == owners
    stored = {id(t) for pool in cache.pools.values() for t in (*pool.k.values(), *pool.v.values())}
    assert len(stored) == 2 * len(owners)


def test_fresh_storage_is_poisoned_with_nan():
    cache = _cache()
    for pool in cache.pools.values():
        for t in (*pool.k.values(), *pool.v.values()):
            assert torch.isnan(t).all()
    clean = _cache(poison=False)
    assert not torch.isnan(clean.layer_kv(0)[0]).any()


def test_slots_follow_the_page_tables():
    cache = _cache()
    a, b = cache.add_request(), cache.add_request()
    cache.reserve([(a, 6), (b, 3)])
    for rid, n in ((a, 6), (b, 3)):
        for pool in (FULL_POOL, SLIDING_POOL):
            table = cache.pages(rid, pool)
            assert len(table) == math.ceil(n / 4)
            assert cache.slots(rid, pool, range(n)) == [table[p // 4] * 4 + p % 4 for p in range(n)]
    # no slot is shared between requests
    for pool in (FULL_POOL, SLIDING_POOL):
        assert not set(cache.slots(a, pool, range(6))) & set(cache.slots(b, pool, range(3)))
    cache.commit([(a, 6), (b, 3)])
    assert (cache.seq_len(a), cache.seq_len(b)) == (6, 3)
    table = cache.page_table([a, b], FULL_POOL)
    assert table.dtype == torch.int32 and table.shape == (2, 2)
    assert table[1, 1].item() == -1


def test_sliding_pool_holds_only_the_window():
    window, ps = presets.resolve("tiny-e4b").sliding_window, 4
    cache = _cache(full=64, sliding=64, page_size=ps)
    rid = cache.add_request()
    for n in range(1, 61):  # token by token, far past the window
        cache.reserve([(rid, 1)])
        assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, ps, 1)
        cache.commit([(rid, 1)])
        assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, ps)
        assert cache.pages_held(rid, FULL_POOL) == math.ceil(n / ps)  # full attention keeps all
        # every key a later query can see is still addressable; older pages are released
        first_needed = max(0, n - window + 1)
        cache.slots(rid, SLIDING_POOL, range(first_needed, n))
    with pytest.raises(ValueError, match="released"):
        cache.slots(rid, SLIDING_POOL, [0])
    # an extend chunk is held whole while it is written, then cut back to the window
    cache.reserve([(rid, 10)])
    assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, ps, 10)
    cache.commit([(rid, 10)])
    assert cache.pages_held(rid, SLIDING_POOL) <= sliding_pages_bound(window, ps)


def test_released_sliding_pages_are_reused_by_other_requests():
    window, ps = 8, 4
    per_request = sliding_pages_bound(window, ps, 1)
    cache = _cache(full=64, sliding=2 * per_request, page_size=ps)
    a, b = cache.add_request(), cache.add_request()
    for _ in range(40):  # 40 tokens each = 10 pages each, from a pool of 2 * 4 sliding pages
        _grow(cache, a, 1)
        _grow(cache, b, 1)
    assert cache.pools[SLIDING_POOL].num_free >= 0
    live = cache.slots(a, SLIDING_POOL, range(40 - window + 1, 40))
    assert not set(live) & set(cache.slots(b, SLIDING_POOL, range(40 - window + 1, 40)))


def test_free_request_returns_every_page():
    cache = _cache()
    free0 = {n: p.num_free for n, p in cache.pools.items()}
    a, b = cache.add_request(), cache.add_request()
    _grow(cache, a, 23)
    _grow(cache, b, 5)
    cache.free_request(a)
    cache.free_request(b)
    assert {n: p.num_free for n, p in cache.pools.items()} == free0
    assert cache.request_ids == []
    with pytest.raises(KeyError, match="unknown request"):
        cache.seq_len(a)


def test_out_of_pages_raises_a_clear_error_and_allocates_nothing():
    cache = _cache(full=5, sliding=64, page_size=4)
    a, b = cache.add_request(), cache.add_request()
    _grow(cache, a, 8)  # 2 full pages
    free0 = {n: p.num_free for n, p in cache.pools.items()}
    with pytest.raises(OutOfPagesError, match=r"'full' pool is out of pages: this batch needs 4 more, 3 of 5"):
        cache.reserve([(a, 4), (b, 12)])  # 1 + 3 pages
    assert {n: p.num_free for n, p in cache.pools.items()} == free0
    assert cache.pages(b, FULL_POOL) == []
    cache.reserve([(a, 4), (b, 8)])  # fits: nothing was left reserved by the failed call
    cache.cancel([(a, 4), (b, 8)])  # a failed forward hands the pages back
    assert {n: p.num_free for n, p in cache.pools.items()} == free0


def test_max_pages_per_request_fixes_page_table_width():
    cache = _cache(max_pages_per_request=3)
    rid = cache.add_request()
    _grow(cache, rid, 5)
    assert cache.page_table([rid], FULL_POOL).shape == (1, 3)
    with pytest.raises(ValueError, match="exceed the cache's limit of 12 tokens"):
        cache.reserve([(rid, 8)])


def test_reserve_rejects_bad_batches():
    cache = _cache()
    rid = cache.add_request()
    with pytest.raises(ValueError, match="at least one token"):
        cache.reserve([(rid, 0)])
    cache.reserve([(rid, 2)])
    with pytest.raises(RuntimeError, match="already has 2 tokens reserved"):
        cache.reserve([(rid, 1)])
    with pytest.raises(RuntimeError, match="commit of 3 tokens, 2 reserved"):
        cache.commit([(rid, 3)])


def test_for_model_sizes_pools_for_the_window():
    from gemma4_passes.models import build_model

    model = build_model("tiny-e4b")
    cache = PagedKVCache.for_model(model, max_requests=3, max_seq_len=100, max_chunk=16, page_size=4)
    assert cache.pools[FULL_POOL].num_pages == 3 * 25
    assert cache.pools[SLIDING_POOL].num_pages == 3 * sliding_pages_bound(8, 4, 16)
    assert cache.dtype == torch.float32 and cache.max_pages_per_request == 25

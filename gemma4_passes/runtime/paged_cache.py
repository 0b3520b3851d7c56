"""A paged KV cache for Gemma-4 with two pools: full attention and sliding window.

Layout
------
* Two :class:`PagePool` s, ``"full"`` and ``"sliding"``.  A pool owns one K and one V tensor per
  KV-owning layer of its attention type, each ``[num_pages, page_size, kv_heads, head_dim]``; a page
  id means the same page in every layer of the pool, so one page table per request and pool serves
  all its layers.  (Full and sliding layers differ in head_dim and, with ``attention_k_eq_v``, in
  kv_heads, hence two pools.)
* KV-shared layers (E2B/E4B tails) own no storage: :meth:`PagedKVCache.layer_kv` maps them to their
  owner layer's tensors (``kv_source`` from :func:`gemma4_passes.models.describe`).
* Token ``pos`` of a request lives in slot ``page_table[pos // page_size] * page_size +
  pos % page_size`` of each pool.  Page tables are indexed by *logical* page (``pos // page_size``).
* The sliding pool keeps only the window: after a batch, every sliding page whose tokens all lie
  before ``seq_len - window + 1`` (the first key any later query can see) goes back to the pool's
  free list, where any request may reuse it; its page-table entry becomes ``-1``.  Per request the
  pool therefore holds at most ``ceil((window - 1) / page_size) + 1`` pages between batches, plus
  the pages of the chunk being written during one (the chunk is written before it is attended).

Bookkeeping is host-side Python (page ids, lengths); the tensors live on the model's device.  Fresh
storage is poisoned with NaN by default, so attention that reads a slot nobody wrote shows up as
NaN logits.

Typical use (the runner does this)::

    cache = PagedKVCache.for_model(model, max_requests=8, max_seq_len=4096)
    rid = cache.add_request()
    cache.reserve([(rid, 100)])        # pages for the next 100 tokens, atomically for the batch
    ...forward...                      # writes those tokens through the paged attention op
    cache.commit([(rid, 100)])         # seq_len += 100, out-of-window sliding pages freed
    cache.free_request(rid)
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "FULL_POOL",
    "SLIDING_POOL",
    "OutOfPagesError",
    "LayerKV",
    "PagePool",
    "PagedKVCache",
    "sliding_pages_bound",
]

FULL_POOL = "full"
SLIDING_POOL = "sliding"


class OutOfPagesError(RuntimeError):
    """A batch needs more pages of a pool than are free.  Nothing was allocated."""

    def __init__(self, pool: str, needed: int, free: int, total: int):
        self.pool, self.needed, self.free, self.total = pool, needed, free, total
        super().__init__(
            f"paged KV cache: the {pool!r} pool is out of pages: this batch needs {needed} more, "
            f"{free} of {total} are free (finish or free requests, run smaller batches/chunks, or build "
            f"the cache with more {pool} pages)"
        )


@dataclass(frozen=True)
class LayerKV:
    """Where one decoder layer's attention reads (and, unless KV-shared, writes) its K/V."""

    layer: int
    owner: int  # the layer whose storage it uses (itself unless KV-shared)
    pool: str  # FULL_POOL or SLIDING_POOL
    kv_shared: bool
    sliding_window: int  # 0 for full attention
    kv_heads: int
    head_dim: int


def sliding_pages_bound(window: int, page_size: int, chunk: int = 0) -> int:
    """Most sliding pages one request holds: ``window - 1`` kept tokens plus a ``chunk`` being written,
    starting anywhere inside a page."""
    return math.ceil((window - 1 + chunk) / page_size) + 1


class PagePool:
    """Pages of one attention type: K/V storage per owning layer and a free list of page ids."""

    def __init__(
        self,
        name: str,
        owner_layers: Sequence[int],
        *,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        poison: bool = True,
    ):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"pool {name!r}: num_pages and page_size must be >= 1")
        self.name = name
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        shape = (num_pages, page_size, kv_heads, head_dim)
        fill = float("nan") if poison else 0.0
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for layer in owner_layers:
            self.k[layer] = torch.full(shape, fill, dtype=dtype, device=device)
            self.v[layer] = torch.full(shape, fill, dtype=dtype, device=device)
        # Pop from the end: lowest ids first, which makes tests and dumps easy to read.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPagesError(self.name, n, len(self._free), self.num_pages)
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: Iterable[int]) -> None:
        for p in pages:
            if p < 0:
                continue
            if not 0 <= p < self.num_pages:
                raise ValueError(f"pool {self.name!r}: page {p} out of range")
            self._free.append(p)


@dataclass
class _Request:
    seq_len: int = 0  # tokens committed (written and attended)
    reserved: int = 0  # tokens of the batch in flight
    pages: dict[str, list[int]] = field(default_factory=lambda: {FULL_POOL: [], SLIDING_POOL: []})


class PagedKVCache:
    """Two page pools plus per-request page tables for one Gemma-4 text model.

    ``config``: a ``transformers`` Gemma-4 text config, a model, a preset or a preset name (anything
    :func:`gemma4_passes.models.describe` takes).  ``num_full_pages`` / ``num_sliding_pages``: pool
    sizes in pages (see :meth:`for_model` for sizing from request counts).  ``dtype``/``device``
    default to the model's parameters' when ``config`` is a model, else fp32 on the CPU.
    ``max_pages_per_request``: when set, a request may not grow past it and page tables are built
    this wide, so their shape stays the same from batch to batch (no recompiles as requests grow).
    """

    def __init__(
        self,
        config: Any,
        *,
        num_full_pages: int,
        num_sliding_pages: int,
        page_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        poison: bool = True,
        max_pages_per_request: int | None = None,
    ):
        from ..models import describe

        facts = describe(config)
        # A model gives the defaults: K/V stored in another dtype than the model computes them in
        # would round them silently.
        param = next(config.parameters(), None) if isinstance(config, torch.nn.Module) else None
        dtype = dtype or (param.dtype if param is not None else torch.float32)
        device = device or (param.device if param is not None else "cpu")
        self.page_size = page_size
        self.max_pages_per_request = max_pages_per_request
        self.dtype = dtype
        self.device = torch.device(device)
        self.sliding_window = int(facts["sliding_window"] or 0)
        self.layers: list[LayerKV] = []
        for f in facts["layers"]:
            sliding = f["sliding_window"] is not None
            self.layers.append(
                LayerKV(
                    layer=f["index"],
                    owner=f["kv_source"],
                    pool=SLIDING_POOL if sliding else FULL_POOL,
                    kv_shared=f["kv_shared"],
                    sliding_window=int(f["sliding_window"] or 0),
                    kv_heads=f["num_key_value_heads"],
                    head_dim=f["head_dim"],
                )
            )
        self.pools: dict[str, PagePool] = {}
        for name, num_pages in ((FULL_POOL, num_full_pages), (SLIDING_POOL, num_sliding_pages)):
            owners = [l for l in self.layers if l.pool == name and not l.kv_shared]
            if not owners:  # a model without sliding (or full) layers: an empty pool of one page
                owners_idx, heads, dim = [], 1, 1
            else:
                owners_idx, heads, dim = [l.layer for l in owners], owners[0].kv_heads, owners[0].head_dim
                if any((l.kv_heads, l.head_dim) != (heads, dim) for l in owners):
                    raise ValueError(f"{name} layers disagree on kv_heads/head_dim: {owners}")
            self.pools[name] = PagePool(
                name, owners_idx, num_pages=max(num_pages, 1), page_size=page_size, kv_heads=heads,
                head_dim=dim, dtype=dtype, device=device, poison=poison,
            )
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()

    @classmethod
    def for_model(
        cls,
        model: Any,
        *,
        max_requests: int,
        max_seq_len: int,
        max_chunk: int | None = None,
        page_size: int = 16,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        poison: bool = True,
    ) -> "PagedKVCache":
        """A cache big enough for ``max_requests`` requests of up to ``max_seq_len`` tokens each, fed
        in chunks of at most ``max_chunk`` tokens (default ``max_seq_len``: one-shot prefill).
        dtype/device default to the model's parameters'."""
        from ..models import describe

        window = int(describe(model)["sliding_window"] or 0)
        chunk = max_seq_len if max_chunk is None else max_chunk
        full = max_requests * math.ceil(max_seq_len / page_size)
        sliding = max_requests * min(
            sliding_pages_bound(window, page_size, chunk), math.ceil(max_seq_len / page_size)
        )
        return cls(
            model, num_full_pages=full, num_sliding_pages=sliding, page_size=page_size,
            dtype=dtype, device=device, poison=poison,
            max_pages_per_request=math.ceil(max_seq_len / page_size),
        )

    # ---- layers --------------------------------------------------------------------------------
    def layer(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k_cache, v_cache) a layer attends over: its owner's storage for KV-shared layers."""
        info = self.layers[layer]
        pool = self.pools[info.pool]
        return pool.k[info.owner], pool.v[info.owner]

    @property
    def owning_layers(self) -> list[int]:
        return [l.layer for l in self.layers if not l.kv_shared]

    @property
    def kv_shared_layers(self) -> list[int]:
        return [l.layer for l in self.layers if l.kv_shared]

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self) -> int:
        rid = next(self._ids)
        self._requests[rid] = _Request()
        return rid

    @property
    def request_ids(self) -> list[int]:
        return list(self._requests)

    def seq_len(self, rid: int) -> int:
        return self._req(rid).seq_len

    def pages(self, rid: int, pool: str) -> list[int]:
        """The request's page table for ``pool`` by logical page (-1: released sliding page)."""
        return list(self._req(rid).pages[pool])

    def pages_held(self, rid: int, pool: str) -> int:
        return sum(p >= 0 for p in self._req(rid).pages[pool])

    def reserve(self, batch: Sequence[tuple[int, int]]) -> None:
        """Allocate pages for the next ``n`` tokens of each ``(request_id, n)``, all or nothing."""
        need = {FULL_POOL: {}, SLIDING_POOL: {}}
        for rid, n in batch:
            req = self._req(rid)
            if req.reserved:
                raise RuntimeError(f"request {rid} already has {req.reserved} tokens reserved")
            if n < 1:
                raise ValueError(f"request {rid}: a batch entry needs at least one token, got {n}")
            end_pages = math.ceil((req.seq_len + n) / self.page_size)
            if self.max_pages_per_request is not None and end_pages > self.max_pages_per_request:
                raise ValueError(
                    f"request {rid}: {req.seq_len + n} tokens exceed the cache's limit of "
                    f"{self.max_pages_per_request * self.page_size} tokens per request"
                )
            for name in need:
                need[name][rid] = end_pages - len(req.pages[name])
        for name, per_req in need.items():
            total = sum(per_req.values())
            if total > self.pools[name].num_free:
                pool = self.pools[name]
                raise OutOfPagesError(name, total, pool.num_free, pool.num_pages)
        for rid, n in batch:
            req = self._req(rid)
            for name, per_req in need.items():
                req.pages[name].extend(self.pools[name].allocate(per_req[rid]))
            req.reserved = n

    def commit(self, batch: Sequence[tuple[int, int]]) -> None:
        """The reserved tokens are written: advance lengths, release out-of-window sliding pages."""
        for rid, n in batch:
            req = self._req(rid)
            if req.reserved != n:
                raise RuntimeError(f"request {rid}: commit of {n} tokens, {req.reserved} reserved")
            req.seq_len += n
            req.reserved = 0
            self._release_out_of_window(req)

    def cancel(self, batch: Sequence[tuple[int, int]]) -> None:
        """Drop a reservation (the forward failed): pages past ``seq_len`` go back to the pools."""
        for rid, _ in batch:
            req = self._req(rid)
            keep = math.ceil(req.seq_len / self.page_size)
            for name, table in req.pages.items():
                self.pools[name].release(table[keep:])
                del table[keep:]
            req.reserved = 0

    def free_request(self, rid: int) -> None:
        req = self._requests.pop(rid)
        for name, table in req.pages.items():
            self.pools[name].release(table)

    def _release_out_of_window(self, req: _Request) -> None:
        if not self.sliding_window:
            return
        # Later queries start at position seq_len; the earliest key they see is seq_len - window + 1.
        first_needed = max(0, req.seq_len - self.sliding_window + 1)
        table = req.pages[SLIDING_POOL]
        for logical in range(first_needed // self.page_size):
            if table[logical] >= 0:
                self.pools[SLIDING_POOL].release([table[logical]])
                table[logical] = -1

    def _req(self, rid: int) -> _Request:
        try:
            return self._requests[rid]
        except KeyError:
            raise KeyError(f"unknown request id {rid} (active: {list(self._requests)})") from None

    # ---- addressing ----------------------------------------------------------------------------
    def slots(self, rid: int, pool: str, positions: Iterable[int]) -> list[int]:
        """Flat slot ids (``page * page_size + offset``) of token positions of a request in a pool."""
        table = self._req(rid).pages[pool]
        out = []
        for pos in positions:
            page = table[pos // self.page_size]
            if page < 0:
                raise ValueError(f"request {rid}: position {pos} was released from the {pool} pool")
            out.append(page * self.page_size + pos % self.page_size)
        return out

    def page_table(self, rids: Sequence[int], pool: str, width: int | None = None) -> torch.Tensor:
        """``[len(rids), width]`` int32 page tables (padded with -1) on the cache's device; ``width``
        defaults to ``max_pages_per_request`` when set, else the longest table."""
        tables = [self._req(r).pages[pool] for r in rids]
        if width is None:
            width = self.max_pages_per_request or max([len(t) for t in tables] + [1])
        out = torch.full((len(rids), width), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            if len(t) > width:
                raise ValueError(f"page table of request {rids[i]} is wider than {width}")
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out.to(self.device)

"""Paged attention for transformers Gemma-4 models: the ``gemma4_passes::paged_attention`` op, the
batch metadata it reads, and the transformers attention function that calls it.

The op (a split op of the piecewise backend, so it always runs eagerly between compiled pieces)::

    gemma4_passes::paged_attention(
        Tensor q,                   # [T, Hq, D]   the batch's query tokens, packed request by request
        Tensor? k, Tensor? v,       # [T, Hkv, D]  the new tokens' K/V; None in KV-shared layers
        Tensor(a!) k_cache,         # [pages, page_size, Hkv, D]  the (owner) layer's pool storage
        Tensor(b!) v_cache,
        Tensor slot_mapping,        # [T] int64  flat slot of each new token in this pool
        Tensor page_table,          # [B, max_pages] int32  per request, logical page -> page (-1: none)
        Tensor query_start_loc,     # [B+1] int32 (host)  request r's queries are q[qsl[r]:qsl[r+1]]
        Tensor seq_lens,            # [B] int32 (host)  request length including this batch's tokens
        int sliding_window,         # 0: full attention
        float scale,                # Gemma-4: 1.0 (q/k are RMS-normed instead)
    ) -> Tensor                     # [T, Hq, D], q's dtype

Rows from ``query_start_loc[-1]`` to ``T`` are padding (a CUDA-graph bucket's): not written, and
their output is 0.

Request r's queries are its last ``n = qsl[r+1] - qsl[r]`` tokens, at positions
``seq_lens[r] - n .. seq_lens[r] - 1`` (decode: n = 1; prefill/extend: n > 1).  When ``k``/``v`` are
given they are first written to ``slot_mapping``; then each query attends over keys at positions
``kp <= qp`` (and ``kp > qp - sliding_window`` on sliding layers, transformers'
``sliding_window_overlay``), read from the cache through ``page_table``.  GQA: head ``h`` reads
KV head ``h // (Hq // Hkv)``.  No logit soft-capping: Gemma-4's text attention has none.

The implementation is plain PyTorch, correct on any device: gather the keys a request's queries
can see through its page table and run SDPA with an explicit mask (fp32 accumulation; fp64 stays
fp64); decode batches (one query per request) are gathered padded and attended in one call per
group of requests.  The fake impl only allocates the output.  A fused paged kernel (Triton /
FlashInfer) is future work.

Feeding transformers: :func:`register` puts :func:`paged_attention_forward` into
``transformers.AttentionInterface`` as ``"gemma4_paged"``; the model is then called with
``paged_batch=PagedBatch(...)`` in its kwargs (transformers forwards unknown kwargs down to the
attention function), the mask as ``{"full_attention": None, "sliding_attention": None}`` (skips
mask creation) and per-token ``position_ids``; see :mod:`gemma4_passes.runtime.paged_runner`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .paged_cache import FULL_POOL, SLIDING_POOL, PagedKVCache

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PagedBatch",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_forward",
    "register",
]

#: the name the attention function is registered under in transformers
ATTN_IMPLEMENTATION = "gemma4_paged"
_OP = "gemma4_passes::paged_attention"


# ------------------------------------------------------------------------------------------------
# The op
# ------------------------------------------------------------------------------------------------
def _write_new_kv(k, v, k_cache, v_cache, slot_mapping, num_real: int) -> None:
    """Store the real tokens' K/V at their slots; rows from ``num_real`` on are padding."""
    kc = k_cache.view(-1, k_cache.shape[-2], k_cache.shape[-1])
    vc = v_cache.view(-1, v_cache.shape[-2], v_cache.shape[-1])
    slots = slot_mapping[:num_real].long()
    # A negative slot would wrap to the end of the pool; check where it costs no device sync.
    if slots.device.type == "cpu" and bool((slots < 0).any()):
        raise ValueError("paged_attention: a real token has no slot (slot_mapping < 0)")
    kc.index_copy_(0, slots, k[:num_real].to(kc.dtype))
    vc.index_copy_(0, slots, v[:num_real].to(vc.dtype))


#: most bytes of gathered K+V one batched-decode group may hold (requests are grouped to fit)
DECODE_GATHER_BYTES = 256 << 20
#: decode key spans are padded to a multiple of this, so kernels see few distinct shapes
DECODE_KEY_ALIGN = 64
# cuDNN's SDPA builds a graph per new shape (measured ~1.5 ms of CPU per call on H100 while key
# lengths grow step by step); the memory-efficient kernel takes the mask without that cost.
_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def _attend(q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Masked attention of a group: q [G, n, Hq, D], keys/vals [G, L, Hkv, D], allowed [G, n, L]
    -> [G, n, Hq, Dv].  K/V heads are repeated for GQA (not ``enable_gqa``) so that CUDA's
    memory-efficient kernel, which takes a mask, can run; SDPA accumulates in fp32."""
    group = q.shape[2] // keys.shape[2]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=2)
        vals = vals.repeat_interleave(group, dim=2)
    with sdpa_kernel(_BACKENDS):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype), vals.transpose(1, 2).to(q.dtype),
            attn_mask=allowed[:, None], scale=scale,
        )
    return out.transpose(1, 2)


def _slots_of(page_table_rows: torch.Tensor, kpos: torch.Tensor, page_size: int) -> torch.Tensor:
    """Flat slots of key positions ``kpos`` [G, L] through page-table rows [G, max_pages]."""
    pages = torch.gather(page_table_rows.long(), 1, kpos // page_size)
    # A -1 page would wrap to the end of the pool; check where it costs no device sync.
    if pages.device.type == "cpu" and bool((pages < 0).any()):
        raise RuntimeError("paged_attention: a key lies in a page that is not allocated (released?)")
    return pages * page_size + kpos % page_size


def _decode_batched(q, kc, vc, page_table, rows, lens, window, scale, out, page_size) -> None:
    """One query per request (at its last position): gather every request's keys padded to the
    longest, in groups that fit DECODE_GATHER_BYTES, and attend in one SDPA call per group."""
    dev = q.device
    lens_t = torch.tensor(lens, device=dev)
    lo = (lens_t - window).clamp(min=0) if window else torch.zeros_like(lens_t)
    visible = [min(l, window) if window else l for l in lens]  # keys each query sees
    span = [-(-n // DECODE_KEY_ALIGN) * DECODE_KEY_ALIGN for n in visible]  # rounded up
    per_key = 2 * kc.shape[1] * kc.shape[2] * kc.element_size()
    start = 0
    while start < len(lens):
        width = span[start]
        end = start + 1
        while end < len(lens) and (end - start + 1) * max(width, span[end]) * per_key <= DECODE_GATHER_BYTES:
            width = max(width, span[end])
            end += 1
        g = slice(start, end)
        kpos = lo[g, None] + torch.arange(width, device=dev)[None, :]
        real = kpos < lens_t[g, None]
        # padding keys point at the request's last (written) slot, so no NaN enters the product
        kpos = torch.minimum(kpos, lens_t[g, None] - 1)
        slots = _slots_of(page_table[g].to(dev), kpos, page_size)
        o = _attend(q[rows[g]][:, None], kc[slots], vc[slots], real[:, None, :], scale)
        out[rows[g]] = o[:, 0].to(out.dtype)
        start = end


def paged_attention_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    page_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int,
    scale: float,
) -> torch.Tensor:
    """The op's semantics in plain PyTorch (see the module docstring); mutates the caches.

    Decode batches (one query per request) run as one padded gather + SDPA per group of
    requests; batches with longer chunks run request by request."""
    if (k is None) != (v is None):
        raise ValueError("paged_attention: pass both k and v, or neither (KV-shared layer)")
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if k is not None:
        _write_new_kv(k, v, k_cache, v_cache, slot_mapping, starts[-1])

    num_tokens, num_heads, _ = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    kc = k_cache.view(-1, kv_heads, k_cache.shape[-1])
    vc = v_cache.view(-1, kv_heads, v_cache.shape[-1])
    out = q.new_zeros(num_tokens, num_heads, v_cache.shape[-1])
    live = [r for r in range(len(lens)) if starts[r + 1] > starts[r]]  # requests with queries
    if live and all(starts[r + 1] - starts[r] == 1 for r in live):
        rows = torch.tensor([starts[r] for r in live], device=q.device)
        table = page_table if len(live) == len(lens) else page_table[torch.tensor(live, device=page_table.device)]
        _decode_batched(q, kc, vc, table, rows, [lens[r] for r in live],
                        sliding_window, scale, out, page_size)
        return out
    for r in live:
        q0, q1 = starts[r], starts[r + 1]
        n_q, seq_len = q1 - q0, lens[r]
        first_q = seq_len - n_q
        # Only keys some query of this request can see: the window of the first query onwards.
        lo = max(0, first_q - sliding_window + 1) if sliding_window else 0
        kpos = torch.arange(lo, seq_len, device=q.device)
        slots = _slots_of(page_table[r : r + 1].to(q.device), kpos[None], page_size)[0]
        qpos = torch.arange(first_q, seq_len, device=q.device)
        allowed = kpos[None, :] <= qpos[:, None]
        if sliding_window:
            allowed &= kpos[None, :] > qpos[:, None] - sliding_window
        o = _attend(q[None, q0:q1], kc[slots][None], vc[slots][None], allowed[None], scale)
        out[q0:q1] = o[0].to(out.dtype)
    return out


def _fake(q, k, v, k_cache, v_cache, slot_mapping, page_table, query_start_loc, seq_lens, sliding_window, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def _define_op():
    """Define the op once per process (re-importing this module must not redefine it)."""
    if hasattr(torch.ops, "gemma4_passes") and hasattr(torch.ops.gemma4_passes, "paged_attention"):
        return torch.ops.gemma4_passes.paged_attention
    opdef = torch.library.custom_op(_OP, paged_attention_reference, mutates_args=("k_cache", "v_cache"))
    opdef.register_fake(_fake)
    return torch.ops.gemma4_passes.paged_attention


#: ``torch.ops.gemma4_passes.paged_attention``
paged_attention = _define_op()


# ------------------------------------------------------------------------------------------------
# Batch metadata
# ------------------------------------------------------------------------------------------------
@dataclass
class PagedBatch:
    """Everything one forward of a packed batch needs, built by :meth:`build` after
    :meth:`PagedKVCache.reserve`.

    Per pool (``"full"``/``"sliding"``): ``slot_mapping[pool]`` [T] int64 and ``page_table[pool]``
    [B, max_pages] int32, on the cache's device.  ``query_start_loc`` [B+1] and ``seq_lens`` [B]
    are int32 host tensors (the reference loops over requests on the host; a kernel would take
    device copies).  ``positions`` [T] int64 and ``logits_indices`` [B] int64 (each request's last
    token in the packed row) are on the device.  ``layer_kv[i]`` is layer i's (k_cache, v_cache),
    the owner's for KV-shared layers.  Tokens past ``query_start_loc[-1]`` (``num_tokens`` >
    real tokens) are padding: slot -1, position 0, zero attention output.
    """

    request_ids: tuple[int, ...]
    num_tokens: int
    positions: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: dict[str, torch.Tensor]
    page_table: dict[str, torch.Tensor]
    logits_indices: torch.Tensor
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]]
    layer_pool: list[str]
    layer_window: list[int]
    layer_kv_shared: list[bool]

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        batch: Sequence[tuple[int, int]],
        *,
        pad_tokens_to: int | None = None,
    ) -> "PagedBatch":
        """Metadata for ``(request_id, num_new_tokens)`` pairs whose pages are reserved."""
        rids = [rid for rid, _ in batch]
        if len(set(rids)) != len(rids):
            raise ValueError(f"a request appears twice in one batch: {rids}")
        starts, lens, positions = [0], [], []
        slots = {FULL_POOL: [], SLIDING_POOL: []}
        for rid, n in batch:
            first = cache.seq_len(rid)
            pos = range(first, first + n)
            positions.extend(pos)
            for pool in slots:
                slots[pool].extend(cache.slots(rid, pool, pos))
            starts.append(starts[-1] + n)
            lens.append(first + n)
        real = starts[-1]
        total = real if pad_tokens_to is None else pad_tokens_to
        if total < real:
            raise ValueError(f"pad_tokens_to={pad_tokens_to} < {real} tokens in the batch")
        pad = total - real
        dev = cache.device

        def device_long(xs):
            return torch.tensor(xs, dtype=torch.int64).to(dev)

        return cls(
            request_ids=tuple(rids),
            num_tokens=total,
            positions=device_long(positions + [0] * pad),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            slot_mapping={p: device_long(s + [-1] * pad) for p, s in slots.items()},
            page_table={p: cache.page_table(rids, p) for p in slots},
            logits_indices=device_long([s - 1 for s in starts[1:]]),
            layer_kv=[cache.layer_kv(i) for i in range(len(cache.layers))],
            layer_pool=[l.pool for l in cache.layers],
            layer_window=[l.sliding_window for l in cache.layers],
            layer_kv_shared=[l.kv_shared for l in cache.layers],
        )


# ------------------------------------------------------------------------------------------------
# transformers attention function
# ------------------------------------------------------------------------------------------------
def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | None,
    value: torch.Tensor | None,
    attention_mask: Any,
    scaling: float | None = None,
    sliding_window: int | None = None,
    paged_batch: PagedBatch | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface over :data:`paged_attention`.

    transformers hands over ``query`` [1, Hq, T, D] and ``key``/``value`` [1, Hkv, T, D] (one packed
    row); returns ``[1, T, Hq, D]``.  The mask is ignored: the op masks from the metadata.  In
    KV-shared layers transformers passes the owner layer's K/V (its ``shared_kv_states``); they are
    dropped here, because the owner already wrote them to the cache the layer reads.
    """
    if paged_batch is None:
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs paged_batch=PagedBatch(...) in the model "
            "call (use gemma4_passes.runtime.paged_runner.PagedGemma4Runner)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: expected one packed row, got batch {query.shape[0]}")
    layer = module.layer_idx
    pool = paged_batch.layer_pool[layer]
    window = paged_batch.layer_window[layer]
    if (sliding_window or 0) != window:
        raise ValueError(f"layer {layer}: model sliding_window={sliding_window}, cache has {window}")
    k_cache, v_cache = paged_batch.layer_kv[layer]
    q = query[0].transpose(0, 1)
    if paged_batch.layer_kv_shared[layer] != bool(getattr(module, "is_kv_shared_layer", False)):
        raise ValueError(f"layer {layer}: the cache and the model disagree on KV sharing")
    if paged_batch.layer_kv_shared[layer]:
        k = v = None
    else:
        k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    out = paged_attention(
        q, k, v, k_cache, v_cache,
        paged_batch.slot_mapping[pool], paged_batch.page_table[pool],
        paged_batch.query_start_loc, paged_batch.seq_lens,
        window, 1.0 if scaling is None else float(scaling),
    )
    return out.unsqueeze(0), None


def register() -> str:
    """Register :func:`paged_attention_forward` with transformers as ``"gemma4_paged"`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION

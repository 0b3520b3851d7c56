"""A small driver that runs a transformers Gemma-4 causal LM over a :class:`PagedKVCache`.

    cache = PagedKVCache.for_model(model, max_requests=4, max_seq_len=256)
    runner = PagedGemma4Runner(model, cache)              # or forward=torch.compile(model, ...)
    logits = runner.prefill([[1, 2, 3], [4, 5]])          # [2, vocab]: last-token logits
    logits = runner.decode(logits.argmax(-1).tolist())    # one token per active request
    logits = runner.extend([[7, 8, 9]], request_ids=[runner.request_ids[0]])

How the model is fed: every batch (prefill, extend, decode or a mix) is one packed row
``input_ids [1, T]`` with ``position_ids [1, T]`` holding each token's position in its own request;
``attention_mask`` is ``{"full_attention": None, "sliding_attention": None}``, which transformers
takes as already-built masks (no mask is created); the paged attention op masks from the metadata
passed as the ``paged_batch`` kwarg; ``logits_to_keep`` is the tensor of each request's last-token
index, so the LM head runs on B rows only (and transformers' own KV-shared-layer slicing stays off:
it only applies to an int ``logits_to_keep``); ``use_cache=False``: the paged cache is the only cache.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .paged_attention import ATTN_IMPLEMENTATION, PagedBatch, register
from .paged_cache import PagedKVCache

__all__ = ["PagedGemma4Runner", "use_paged_attention"]

_NO_MASKS = {"full_attention": None, "sliding_attention": None}


def use_paged_attention(model: torch.nn.Module) -> None:
    """Register the paged attention function and switch ``model`` to it."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # pragma: no cover - older transformers
        model.config._attn_implementation = ATTN_IMPLEMENTATION


class PagedGemma4Runner:
    """Prefill / extend / decode batches of requests of mixed lengths through a paged KV cache.

    ``model``: a ``Gemma4ForCausalLM`` (switched to the ``"gemma4_paged"`` attention function).
    ``forward``: what is called with the model's keyword arguments, default ``model`` itself; pass a
    compiled model (``torch.compile(model, backend=piecewise_backend())``) to run compiled.
    ``pad_tokens_to``: optional ``f(num_tokens) -> padded`` (e.g. a CUDA-graph bucket); padding
    tokens write nothing and their logits are never read.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        *,
        forward: Callable[..., Any] | None = None,
        pad_tokens_to: Callable[[int], int] | None = None,
    ):
        use_paged_attention(model)
        self.model = model
        self.cache = cache
        self.forward = model if forward is None else forward
        self.pad_tokens_to = pad_tokens_to
        self.request_ids: list[int] = []  # active requests, in the order they were added
        self.last_batch: PagedBatch | None = None

    # ---- batches -------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start one request per prompt; returns last-token logits ``[len(prompts), vocab]``.
        The new ids are the last ``len(prompts)`` entries of :attr:`request_ids`."""
        rids = [self.cache.add_request() for _ in prompts]
        self.request_ids.extend(rids)
        try:
            return self.step(list(zip(rids, prompts)))
        except Exception:
            for rid in rids:
                self.release(rid)
            raise

    def extend(self, chunks: Sequence[Sequence[int]], request_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Append a chunk of tokens to each request (default: every active request, in order)."""
        rids = self._ids_for(chunks, request_ids)
        return self.step(list(zip(rids, chunks)))

    def decode(self, tokens: Sequence[int], request_ids: Sequence[int] | None = None) -> torch.Tensor:
        """One new token per request (default: every active request, in order)."""
        rids = self._ids_for(tokens, request_ids)
        return self.step([(rid, [int(t)]) for rid, t in zip(rids, tokens)])

    def step(self, batch: Sequence[tuple[int, Sequence[int]]]) -> torch.Tensor:
        """Run one packed forward over ``(request_id, new_tokens)`` pairs; last-token logits ``[B, vocab]``."""
        sizes = [(rid, len(toks)) for rid, toks in batch]
        self.cache.reserve(sizes)
        try:
            real = sum(n for _, n in sizes)
            padded = real if self.pad_tokens_to is None else self.pad_tokens_to(real)
            meta = PagedBatch.build(self.cache, sizes, pad_tokens_to=padded)
            flat = [int(t) for _, toks in batch for t in toks] + [0] * (padded - real)
            input_ids = torch.tensor(flat, dtype=torch.long).to(self.cache.device)[None]
            with torch.no_grad():
                out = self.forward(
                    input_ids=input_ids,
                    position_ids=meta.positions[None],
                    attention_mask=dict(_NO_MASKS),
                    logits_to_keep=meta.logits_indices,
                    use_cache=False,
                    paged_batch=meta,
                )
        except Exception:
            self.cache.cancel(sizes)
            raise
        self.cache.commit(sizes)
        self.last_batch = meta
        return out.logits[0]

    # ---- requests ------------------------------------------------------------------------------
    def release(self, rid: int) -> None:
        """Finish a request: its pages go back to the pools."""
        self.cache.free_request(rid)
        self.request_ids.remove(rid)

    def _ids_for(self, items: Sequence[Any], request_ids: Sequence[int] | None) -> list[int]:
        rids = list(self.request_ids if request_ids is None else request_ids)
        if len(rids) != len(items):
            raise ValueError(f"{len(items)} inputs for {len(rids)} requests {rids}")
        return rids

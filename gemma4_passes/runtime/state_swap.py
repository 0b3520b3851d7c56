"""Point an attention backend at another KV pool with its sliding-window state switched along.

SGLang's frozen-KV MTP draft (the Gemma-4 assistant) reads the TARGET model's KV: its worker
swaps ``draft_attn_backend.token_to_kv_pool`` to the target pool for the duration of a
metadata build or a forward (``speculative/frozen_kv_mtp_utils.py``, ``frozen_kv_target_view``
/ ``target_kv_pool_view``). When the target pool is a hybrid SWA pool, the backend's
sliding-window state must follow: a backend whose flags still describe the draft's own
(non-SWA) pool builds page tables with full-pool indices and reads the SWA layers out of range.
:func:`swa_backend_view` swaps the pool and that state together and restores all of it on exit,
exceptions included.

Duck-typed on the attribute names SGLang 0.5.23's backends use (``layers/attention/``):

* ``token_to_kv_pool`` -- every backend;
* ``_swa_kv_pool`` -- the SWA pool reads translate against (trtllm_mha, flashinfer), and
  ``_swa_full_to_swa_mapping`` -- trtllm_mha's cached copy of that pool's full->SWA index map
  (None when its KV index translator translates ids itself, as at its construction);
* ``use_sliding_window_kv_pool`` -- gates the full->SWA translation of write locations
  (triton, trtllm_mha) and of reads (flashinfer). It is raised to True only when the backend
  has what the flag makes it touch: a CUDA-graph SWA write buffer
  (``cuda_graph_swa_out_cache_loc``) when it keeps CUDA-graph state, nothing otherwise. A
  backend built on a non-SWA pool has no such buffer, and a read-only view (the frozen draft
  never writes KV) does not need it; it is always lowered to False for a non-SWA pool;
* ``sliding_window_size`` -- only when the caller passes one; a backend that allocated no
  window buffers (``window_kv_indptr`` is None) cannot take a window and raises ValueError.

A pool counts as a hybrid SWA pool when it has ``full_to_swa_index_mapping``,
``translate_loc_from_full_to_swa`` and ``layers_mapping`` (``mem_cache/swa_memory_pool.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

__all__ = ["MISSING", "is_swa_pool", "swap_attributes", "swa_view_state", "swa_backend_view"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: marks an attribute that did not exist before a swap (it is deleted again on restore)
MISSING: Any = _Missing()

#: the CUDA-graph state each backend family allocates in ``init_cuda_graph_state``
_CUDA_GRAPH_STATE_ATTRS = ("cuda_graph_attn_logits", "decode_cuda_graph_metadata", "cuda_graph_kv_indices")


def is_swa_pool(pool: Any) -> bool:
    """True for a hybrid full/SWA KV pool (SGLang's ``SWAKVPool`` and its subclasses)."""
    return (
        pool is not None
        and hasattr(pool, "full_to_swa_index_mapping")
        and callable(getattr(pool, "translate_loc_from_full_to_swa", None))
        and hasattr(pool, "layers_mapping")
    )


@contextmanager
def swap_attributes(obj: Any, values: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Set ``obj``'s attributes to ``values`` for the block; restore every one afterwards.

    All-or-nothing: if setting one attribute fails, those already set are restored before the
    error propagates. Restoring runs in reverse order on normal exit and on exceptions; an
    attribute that did not exist before is deleted again. Yields the saved values.
    """
    saved: dict[str, Any] = {}
    try:
        for name, value in values.items():
            before = getattr(obj, name, MISSING)
            setattr(obj, name, value)
            saved[name] = before  # only what was really changed is restored
    except BaseException:
        _restore(obj, saved)
        raise
    try:
        yield dict(saved)
    finally:
        _restore(obj, saved)


def _restore(obj: Any, saved: dict[str, Any]) -> None:
    errors = []
    for name, value in reversed(list(saved.items())):
        try:
            if value is MISSING:
                if name in getattr(obj, "__dict__", {}):
                    delattr(obj, name)
            else:
                setattr(obj, name, value)
        except Exception as e:  # keep restoring the others
            errors.append(f"{name}: {e!r}")
    if errors:
        raise RuntimeError(f"could not restore {type(obj).__name__} attributes: {'; '.join(errors)}")


def _keeps_cuda_graph_state(backend: Any) -> bool:
    for name in _CUDA_GRAPH_STATE_ATTRS:
        value = getattr(backend, name, None)
        if value is not None and not (isinstance(value, dict) and not value):  # {} before capture
            return True
    return False


def swa_view_state(backend: Any, pool: Any, *, sliding_window_size: int | None = None) -> dict[str, Any]:
    """The attribute values under which ``backend`` reads ``pool`` consistently (see the module doc)."""
    swa = is_swa_pool(pool)
    values: dict[str, Any] = {"token_to_kv_pool": pool}
    if hasattr(backend, "_swa_kv_pool"):
        values["_swa_kv_pool"] = pool if swa else None
    if hasattr(backend, "_swa_full_to_swa_mapping"):
        translating = bool(getattr(getattr(backend, "kv_index_translator", None), "is_translating", False))
        values["_swa_full_to_swa_mapping"] = pool.full_to_swa_index_mapping if swa and not translating else None
    if hasattr(backend, "use_sliding_window_kv_pool"):
        if not swa:
            values["use_sliding_window_kv_pool"] = False
        elif backend.use_sliding_window_kv_pool:
            values["use_sliding_window_kv_pool"] = True
        else:
            has_write_buffer = getattr(backend, "cuda_graph_swa_out_cache_loc", None) is not None
            if has_write_buffer or not _keeps_cuda_graph_state(backend):
                values["use_sliding_window_kv_pool"] = True
    if sliding_window_size is not None and hasattr(backend, "sliding_window_size"):
        if (
            sliding_window_size > 0
            and hasattr(backend, "window_kv_indptr")
            and getattr(backend, "window_kv_indptr") is None
        ):
            raise ValueError(
                f"{type(backend).__name__} was built without sliding-window buffers (window_kv_indptr is None); "
                f"it cannot read a pool with a {sliding_window_size}-token window"
            )
        values["sliding_window_size"] = sliding_window_size
    return values


@contextmanager
def swa_backend_view(backend: Any, pool: Any, *, sliding_window_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Point ``backend`` at ``pool`` with its sliding-window state switched to match, for the block.

    Yields the values that were in place before (restored on exit, exceptions included).
    """
    with swap_attributes(backend, swa_view_state(backend, pool, sliding_window_size=sliding_window_size)) as saved:
        yield saved

"""gemma4_passes.runtime.state_swap: the backend's SWA state follows the pool, and comes back.

The backends here are stand-ins with the attribute names of SGLang 0.5.23's attention backends;
``test_attribute_names_match_sglang`` checks those names against the installed sglang sources
(the real classes need CUDA to import).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from gemma4_passes.runtime.state_swap import MISSING, is_swa_pool, swa_backend_view, swa_view_state, swap_attributes


class SWAPool:
    """Mirrors ``sglang.srt.mem_cache.swa_memory_pool.SWAKVPool``'s duck-type surface."""

    def __init__(self):
        self.full_to_swa_index_mapping = object()
        self.layers_mapping = {0: (0, True), 5: (0, False)}

    def translate_loc_from_full_to_swa(self, loc):
        return loc


class MHAPool:
    """The draft's own, non-SWA pool."""


def triton_like(pool, *, graphs=False, window=511):
    """TritonAttnBackend: flag from isinstance(pool, SWAKVPool); CUDA-graph SWA buffer only if the flag was set."""
    b = SimpleNamespace(
        token_to_kv_pool=pool,
        use_sliding_window_kv_pool=is_swa_pool(pool),
        sliding_window_size=window,
        window_kv_indptr=object() if window else None,
    )
    if graphs:
        b.cuda_graph_attn_logits = object()
        if b.use_sliding_window_kv_pool:
            b.cuda_graph_swa_out_cache_loc = object()
    return b


def trtllm_like(pool, resolved_swa_pool):
    """TRTLLMHAAttnBackend: _swa_kv_pool resolved at init (the allocator's pool for frozen-KV drafts)."""
    return SimpleNamespace(
        token_to_kv_pool=pool,
        _swa_kv_pool=resolved_swa_pool,
        _swa_full_to_swa_mapping=getattr(resolved_swa_pool, "full_to_swa_index_mapping", None),
        use_sliding_window_kv_pool=resolved_swa_pool is not None,
        kv_index_translator=SimpleNamespace(is_translating=False),
        decode_cuda_graph_metadata={},
        cuda_graph_swa_out_cache_loc=None,
        sliding_window_size=511,
    )


# ------------------------------------------------------------------------------------------------
def test_swap_attributes_restores_after_block_and_on_exception():
    obj = SimpleNamespace(a=1, b="x")
    with swap_attributes(obj, {"a": 2, "c": 3}) as saved:
        assert (obj.a, obj.b, obj.c) == (2, "x", 3)
        assert saved == {"a": 1, "c": MISSING}
    assert (obj.a, obj.b) == (1, "x") and not hasattr(obj, "c")

    with pytest.raises(KeyError, match="boom"):
        with swap_attributes(obj, {"a": 5, "c": 6}):
            assert obj.a == 5
            raise KeyError("boom")
    assert obj.a == 1 and not hasattr(obj, "c")


def test_swap_attributes_is_all_or_nothing():
    class Guarded:
        a = 1

        @property
        def frozen(self):
            return "f"

    obj = Guarded()
    obj.a = 1
    with pytest.raises(AttributeError):
        with swap_attributes(obj, {"a": 2, "frozen": "no"}):  # the second set fails
            pytest.fail("the block must not run")
    assert obj.a == 1 and obj.frozen == "f"


def test_nested_swaps_unwind_in_order():
    obj = SimpleNamespace(pool="draft")
    with swap_attributes(obj, {"pool": "target"}):
        with swap_attributes(obj, {"pool": "other"}):
            assert obj.pool == "other"
        assert obj.pool == "target"
    assert obj.pool == "draft"


def test_is_swa_pool_duck_type():
    assert is_swa_pool(SWAPool())
    assert not is_swa_pool(MHAPool()) and not is_swa_pool(None)


# ------------------------------------------------------------------------------------------------
def test_triton_eager_view_switches_flag_with_pool_and_restores():
    draft_pool, target = MHAPool(), SWAPool()
    backend = triton_like(draft_pool)
    assert backend.use_sliding_window_kv_pool is False
    with swa_backend_view(backend, target) as before:
        assert backend.token_to_kv_pool is target
        assert backend.use_sliding_window_kv_pool is True
        assert before == {"token_to_kv_pool": draft_pool, "use_sliding_window_kv_pool": False}
    assert backend.token_to_kv_pool is draft_pool and backend.use_sliding_window_kv_pool is False


def test_view_restores_on_exception():
    draft_pool, target = MHAPool(), SWAPool()
    backend = triton_like(draft_pool)
    with pytest.raises(IndexError, match="page index out of range"):
        with swa_backend_view(backend, target):
            assert backend.use_sliding_window_kv_pool is True
            raise IndexError("page index out of range")
    assert backend.token_to_kv_pool is draft_pool and backend.use_sliding_window_kv_pool is False


def test_triton_with_cuda_graph_state_keeps_flag_without_write_buffer():
    # captured without an SWA write buffer: raising the flag would make replay touch a buffer that
    # does not exist; the frozen draft only reads, so the flag stays and the pool still switches
    backend = triton_like(MHAPool(), graphs=True)
    target = SWAPool()
    state = swa_view_state(backend, target)
    assert state == {"token_to_kv_pool": target}


def test_non_swa_pool_lowers_flags():
    swa_pool, plain = SWAPool(), MHAPool()
    backend = trtllm_like(swa_pool, swa_pool)
    with swa_backend_view(backend, plain):
        assert backend.use_sliding_window_kv_pool is False
        assert backend._swa_kv_pool is None and backend._swa_full_to_swa_mapping is None
    assert backend._swa_kv_pool is swa_pool and backend.use_sliding_window_kv_pool is True
    assert backend._swa_full_to_swa_mapping is swa_pool.full_to_swa_index_mapping


def test_trtllm_view_points_read_routing_at_the_target_pool():
    stale, target = SWAPool(), SWAPool()
    backend = trtllm_like(MHAPool(), stale)
    with swa_backend_view(backend, target):
        assert backend._swa_kv_pool is target
        assert backend._swa_full_to_swa_mapping is target.full_to_swa_index_mapping
        assert backend.use_sliding_window_kv_pool is True
    assert backend._swa_kv_pool is stale
    # a translating KV index translator keeps no cached mapping (as at construction)
    backend.kv_index_translator.is_translating = True
    assert swa_view_state(backend, target)["_swa_full_to_swa_mapping"] is None


def test_window_switches_only_where_buffers_exist():
    target = SWAPool()
    backend = triton_like(MHAPool(), window=511)
    with swa_backend_view(backend, target, sliding_window_size=1023):
        assert backend.sliding_window_size == 1023
    assert backend.sliding_window_size == 511
    no_window = triton_like(MHAPool(), window=None)
    with pytest.raises(ValueError, match="without sliding-window buffers"):
        with swa_backend_view(no_window, target, sliding_window_size=511):
            pass
    assert no_window.token_to_kv_pool is not target and no_window.sliding_window_size is None


# ------------------------------------------------------------------------------------------------
def _sglang_srt() -> Path | None:
    spec = importlib.util.find_spec("sglang")
    return Path(spec.submodule_search_locations[0]) / "srt" if spec and spec.submodule_search_locations else None


def _self_attributes(path: Path, class_name: str) -> set[str]:
    """Names assigned as ``self.<name> = ...`` (or annotated) anywhere in ``class_name``."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    names = set()
    for node in ast.walk(cls):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                names.add(t.attr)
    return names


def _methods(path: Path, class_name: str) -> set[str]:
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.skipif(_sglang_srt() is None, reason="sglang is not installed")
def test_attribute_names_match_sglang():
    srt = _sglang_srt()
    attn = srt / "layers" / "attention"
    triton = _self_attributes(attn / "triton_backend.py", "TritonAttnBackend")
    assert {"token_to_kv_pool", "use_sliding_window_kv_pool", "sliding_window_size", "window_kv_indptr",
            "cuda_graph_swa_out_cache_loc", "cuda_graph_attn_logits"} <= triton
    trtllm = _self_attributes(attn / "trtllm_mha_backend.py", "TRTLLMHAAttnBackend")
    assert {"_swa_kv_pool", "_swa_full_to_swa_mapping", "cuda_graph_swa_out_cache_loc",
            "decode_cuda_graph_metadata"} <= trtllm
    flashinfer = _self_attributes(attn / "flashinfer_backend.py", "FlashInferAttnBackend")
    assert {"token_to_kv_pool", "_swa_kv_pool", "use_sliding_window_kv_pool", "kv_index_translator"} <= flashinfer
    pool_file = srt / "mem_cache" / "swa_memory_pool.py"
    assert {"full_to_swa_index_mapping", "layers_mapping"} <= _self_attributes(pool_file, "SWAKVPool")
    assert "translate_loc_from_full_to_swa" in _methods(pool_file, "SWAKVPool")

"""SWA pool planner: how to split a KV budget between the full-attention pool and the
sliding-window (SWA) pool of a Gemma-4 model so that the most requests fit without eviction.

Pure arithmetic on a model config; nothing here imports SGLang (or torch). SGLang facts are
from sglang 0.5.23 (paths relative to ``sglang/srt/``); ``docs/sglang_kv_pools.md`` has the
longer reading.

Bytes per token, per pool
-------------------------
``full_bytes = sum over full-attention layers that OWN KV of 2 * kv_heads * head_dim * dtype_bytes``
and the same over sliding layers for ``swa_bytes``:

* the factor 2 is K and V. On full layers with ``attention_k_eq_v`` (26B-A4B, 31B) V is still
  a cache tensor of its own: transformers computes ``value_states = v_norm(k_proj(x))`` and
  ``key_states = rope(k_norm(k_proj(x)))`` (two different tensors) and passes both to
  ``past_key_values.update`` (``models/gemma4/modeling_gemma4.py``, ``Gemma4TextAttention.forward``);
  SGLang loads ``k_proj`` into both the k and v shards of ``qkv_proj``
  (``models/gemma4_causal.py`` ``load_weights``, ``should_dup_k_to_v``) and sizes every token
  as ``kv_heads * (head_dim + v_head_dim)`` (``model_executor/pool_configurator.py:703-716``).
* KV-shared layers (E2B: the last 20 of 35, E4B: the last 18 of 42) own no KV: they attend
  over the K/V of the last non-shared layer of their type. (SGLang 0.5.23 still allocates pool
  slots for them; ``gemma4_passes.integrations.sglang_swa`` reclaims those.)
* with tensor parallelism each rank holds ``max(1, kv_heads // tp)`` heads, as SGLang's
  ``ModelConfig.get_num_kv_heads`` / ``get_swa_num_kv_heads``; the budget is per rank.

Tokens a request needs (``L`` = prompt + output tokens, ``W`` = SGLang's window)
------------------------------------------------------------------------------------
* full pool: ``ceil_page(L)``.
* SWA pool: ``min(ceil_page(L), W + eviction_interval * draft_tokens + 2 * page_size)``: a
  running request keeps its last window plus the tokens decoded since the last SWA eviction
  (every ``SGLANG_SWA_EVICTION_INTERVAL`` = 128 steps, ``environ.py:730``) plus one page of
  eviction alignment and one page of decode allocation -- SGLang's own per-request worst case
  (``compute_swa_request_cap``, ``model_executor/pool_configurator.py:924-968``).
* plus, once for the whole SWA pool, the prefill chunks in flight:
  ``chunks_in_flight * min(chunked_prefill_size, ceil_page(L)) + page_size`` (same function;
  2 chunks with the overlap scheduler, 1 without): a chunk writes all its tokens into the SWA
  pool before the out-of-window ones are evicted (``mem_cache/prefill_budget.py:27-57``).
* and the SWA pool must exceed ``W + page_size`` (``validate_swa_pool_size``,
  ``model_executor/pool_configurator.py:198-216``).
* ``W`` is SGLang's exclusive window, ``config.sliding_window - 1`` for Gemma-4
  (``models/gemma4_causal.py:83-84``).

How SGLang turns ``swa_full_tokens_ratio`` into the two pools
-------------------------------------------------------------
``HybridSWAPoolConfigurator`` (``model_executor/pool_configurator.py``): bytes per "token" =
``full_bytes + ratio * swa_bytes`` (``_recompute_cell_size``, 786-802);
``max_total = int(budget // cell)`` (``calculate_pool_sizes``, 907-916); ``full_tokens =
page_floor(max_total)``, ``swa_tokens = page_floor(int(full_tokens * ratio))``
(``_solve_pool_sizes``, 859-893). The ratio is ``swa_tokens / full_tokens`` and must be in
``(0, 1]`` (``arg_groups/kv_cache_hook.py:427``); unset, it falls back to 0.8
(``arg_groups/fields/schedule.py:150-162``). :func:`sglang_pool_sizes` is that formula.

The plan
--------
For ``k`` requests the pools need ``k * full_req`` and ``max(k * swa_req + reserve, floor)``
tokens. The planner finds the largest ``k <= requests`` for which a ratio exists whose
SGLang-sized pools hold ``k`` requests, and picks the ratio that gives both pools the same
headroom over that need (``swa_need(k) / full_need(k)``; the spare memory of a large budget is
split in the same proportion, as SGLang's single ratio does anyway). The ratio is rounded up to
4 decimals (what a user would pass on the command line) and the pools are the ones SGLang's
formula gives for exactly that value. Where the SWA need exceeds the full need (requests
shorter than the window, or few requests next to the prefill-chunk reserve) the ratio is capped
at SGLang's maximum 1.0.

``binding`` names the pool that caps how many requests of this shape the planned pools hold
(the other pool alone would hold more): "full" when spare memory is left in the SWA pool,
"swa" when the full pool has room the SWA pool cannot match (ratio capped at 1.0), "both" when
they run out together.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from ..presets import FULL, SLIDING, Gemma4Preset, resolve

__all__ = [
    "SGLANG_DEFAULT_RATIO",
    "KVLayout",
    "SglangSchedule",
    "PoolSizes",
    "SwaPlan",
    "kv_layout",
    "dtype_bytes",
    "parse_bytes",
    "request_needs",
    "sglang_pool_sizes",
    "pool_capacity",
    "plan_pools",
    "plan_swa_pools",
]

#: ``swa_full_tokens_ratio`` SGLang 0.5.23 uses when the user gave none (``fields/schedule.py``).
SGLANG_DEFAULT_RATIO = 0.8
#: ``model_type`` values of Gemma-4 configs (text decoder and multimodal wrapper).
GEMMA4_MODEL_TYPES = ("gemma4_text", "gemma4", "gemma4_unified", "gemma4_unified_text")
RATIO_DECIMALS = 4

_DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes of one KV element: a name ("bf16", "fp8_e4m3", ...), a torch dtype or an int."""
    if isinstance(dtype, bool):
        raise ValueError(f"not a KV cache dtype: {dtype!r}")
    if isinstance(dtype, int):
        if dtype <= 0:
            raise ValueError(f"dtype bytes must be positive, got {dtype}")
        return dtype
    itemsize = getattr(dtype, "itemsize", None)  # torch.dtype, numpy dtype
    if isinstance(itemsize, int) and not isinstance(dtype, str):
        return itemsize
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BYTES))}")
    return _DTYPE_BYTES[key]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """``"40GiB"``, ``"12.5GB"``, ``"1e10"`` or a number -> bytes (int)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a byte count from {text!r} (e.g. 40GiB, 12.5GB, 1e10)")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0 or not math.isfinite(value):
        raise ValueError(f"the KV budget must be a positive number of bytes, got {text!r}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# The model side: which layers own KV, and their shapes.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVLayout:
    """Per-layer KV facts of one Gemma-4 text decoder."""

    name: str
    layer_types: tuple[str, ...]
    sliding_window: int  # the config's (inclusive) window
    kv_shared_layers: tuple[int, ...]  # own no KV
    full_kv_heads: int
    full_head_dim: int
    swa_kv_heads: int
    swa_head_dim: int

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Full-attention layers that own KV."""
        shared = set(self.kv_shared_layers)
        return tuple(i for i, t in enumerate(self.layer_types) if t == FULL and i not in shared)

    @property
    def swa_layers(self) -> tuple[int, ...]:
        """Sliding-window layers that own KV."""
        shared = set(self.kv_shared_layers)
        return tuple(i for i, t in enumerate(self.layer_types) if t == SLIDING and i not in shared)

    @property
    def sglang_window(self) -> int:
        """SGLang's exclusive window for Gemma-4 (``models/gemma4_causal.py:83-84``)."""
        return self.sliding_window - 1

    def bytes_per_token(self, dtype: Any, *, tp_size: int = 1, include_kv_shared: bool = False) -> tuple[int, int]:
        """(full-pool, SWA-pool) bytes per token on one rank.

        ``include_kv_shared=True`` counts the KV-shared layers too: what SGLang 0.5.23 allocates
        unless their slots are reclaimed.
        """
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        b = dtype_bytes(dtype)
        if include_kv_shared:
            n_full = sum(t == FULL for t in self.layer_types)
            n_swa = sum(t == SLIDING for t in self.layer_types)
        else:
            n_full, n_swa = len(self.full_layers), len(self.swa_layers)
        full_heads = max(1, self.full_kv_heads // tp_size)
        swa_heads = max(1, self.swa_kv_heads // tp_size)
        return n_full * 2 * full_heads * self.full_head_dim * b, n_swa * 2 * swa_heads * self.swa_head_dim * b


def _layout_from_preset(p: Gemma4Preset) -> KVLayout:
    return KVLayout(
        name=p.name,
        layer_types=tuple(p.layer_types),
        sliding_window=p.sliding_window,
        kv_shared_layers=p.kv_shared_layers,
        full_kv_heads=p.full_kv_heads,
        full_head_dim=p.global_head_dim,
        swa_kv_heads=p.num_key_value_heads,
        swa_head_dim=p.head_dim,
    )


def _one_shape(shapes: set[tuple[int, int]], layer_type: str, name: str) -> tuple[int, int]:
    if len(shapes) != 1:
        raise ValueError(f"{name}: {layer_type} layers have more than one (head_dim, kv_heads): {sorted(shapes)}")
    return next(iter(shapes))


def _layout_from_hf(cfg: Any) -> KVLayout:
    """A transformers Gemma-4 config (text or multimodal), read by attribute (no import)."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in GEMMA4_MODEL_TYPES:
        raise ValueError(f"not a Gemma-4 config: model_type {model_type!r} (expected one of {GEMMA4_MODEL_TYPES})")
    text = getattr(cfg, "text_config", None) or cfg
    types = tuple(getattr(text, "layer_types", None) or ())
    if not types or set(types) - {FULL, SLIDING}:
        raise ValueError(f"Gemma-4 config without usable layer_types: {types!r}")
    n = len(types)
    modes = getattr(text, "kv_sharing_modes", None)
    if modes is not None:
        shared = tuple(i for i, m in enumerate(modes) if m == "reuse")
    else:  # transformers 5.17 decides it from num_kv_shared_layers (the tail of the stack)
        k = int(getattr(text, "num_kv_shared_layers", 0) or 0)
        shared = tuple(range(n - k, n)) if k else ()
    per_layer = getattr(text, "per_layer_config", None)
    if per_layer is not None:  # transformers >= 5.2x: heterogeneous per-layer view
        shapes: dict[str, set] = {FULL: set(), SLIDING: set()}
        for i, t in enumerate(types):
            shapes[t].add((int(per_layer[i].head_dim), int(per_layer[i].num_key_value_heads)))
        full_dim, full_heads = _one_shape(shapes[FULL], FULL, model_type)
        swa_dim, swa_heads = _one_shape(shapes[SLIDING] or shapes[FULL], SLIDING, model_type)
    else:
        swa_dim, swa_heads = int(text.head_dim), int(text.num_key_value_heads)
        full_dim = int(getattr(text, "global_head_dim", None) or swa_dim)
        global_heads = getattr(text, "num_global_key_value_heads", None)
        k_eq_v = bool(getattr(text, "attention_k_eq_v", False))
        full_heads = int(global_heads) if (k_eq_v and global_heads) else swa_heads
    return KVLayout(
        name=str(getattr(cfg, "name_or_path", "") or getattr(text, "name_or_path", "") or model_type),
        layer_types=types,
        sliding_window=int(text.sliding_window),
        kv_shared_layers=shared,
        full_kv_heads=full_heads,
        full_head_dim=full_dim,
        swa_kv_heads=swa_heads,
        swa_head_dim=swa_dim,
    )


def kv_layout(model: Any) -> KVLayout:
    """The KV layout of a preset, a preset name or a transformers Gemma-4 config (or model)."""
    if isinstance(model, KVLayout):
        return model
    if isinstance(model, (Gemma4Preset, str)):
        return _layout_from_preset(resolve(model))
    cfg = getattr(model, "config", None) if not hasattr(model, "model_type") else model
    if cfg is None:
        raise ValueError(f"not a Gemma-4 preset or config: {type(model).__name__}")
    return _layout_from_hf(cfg)


# ------------------------------------------------------------------------------------------------
# SGLang's side: scheduling facts that set the per-request needs, and its sizing formula.
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SglangSchedule:
    """The SGLang settings the pool needs depend on (defaults: SGLang 0.5.23's)."""

    page_size: int = 1
    chunked_prefill_size: int = 8192  # 0.5.23 picks 2048-8192+ by GPU memory (arg_groups/memory_hook.py)
    swa_eviction_interval: int = 128  # SGLANG_SWA_EVICTION_INTERVAL (environ.py:730)
    draft_tokens: int = 1  # speculative_num_draft_tokens (1 without speculative decoding)
    chunks_in_flight: int = 2  # 1 with --disable-overlap-schedule

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < (0 if f.name == "chunked_prefill_size" else 1):
                raise ValueError(f"SglangSchedule.{f.name} must be a positive int, got {v!r}")

    def page_ceil(self, tokens: int) -> int:
        return -(-tokens // self.page_size) * self.page_size

    def page_floor(self, tokens: int) -> int:
        return tokens // self.page_size * self.page_size


@dataclass(frozen=True)
class RequestNeeds:
    """Pool tokens for requests of one shape (see the module docstring)."""

    full_per_request: int
    swa_per_request: int
    swa_reserve: int  # prefill chunks in flight, once per pool
    swa_floor: int  # smallest SWA pool SGLang accepts

    def full_need(self, k: int) -> int:
        return k * self.full_per_request

    def swa_need(self, k: int) -> int:
        return max(k * self.swa_per_request + self.swa_reserve, self.swa_floor)


def request_needs(tokens_per_request: int, window: int, schedule: SglangSchedule = SglangSchedule()) -> RequestNeeds:
    """Pool tokens one request of ``tokens_per_request`` tokens needs; ``window`` is SGLang's (exclusive)."""
    if tokens_per_request < 1:
        raise ValueError(f"tokens per request must be >= 1, got {tokens_per_request}")
    s = schedule
    length = s.page_ceil(tokens_per_request)
    chunk = s.chunked_prefill_size if s.chunked_prefill_size > 0 else length  # no chunking: whole prompt
    return RequestNeeds(
        full_per_request=length,
        swa_per_request=min(length, window + s.swa_eviction_interval * s.draft_tokens + 2 * s.page_size),
        swa_reserve=s.chunks_in_flight * min(chunk, length) + s.page_size,
        swa_floor=s.page_ceil(window + s.page_size + 1),
    )


def sglang_pool_sizes(budget_bytes: int, ratio: float, full_bytes: int, swa_bytes: int, page_size: int = 1) -> tuple[int, int]:
    """(full_tokens, swa_tokens) SGLang 0.5.23 allocates for ``ratio`` and a KV budget.

    ``HybridSWAPoolConfigurator`` without a draft model or unified memory
    (``model_executor/pool_configurator.py``: ``_recompute_cell_size`` 786-802,
    ``calculate_pool_sizes`` 907-916, ``_solve_pool_sizes`` 859-893).
    """
    if not 0 < ratio <= 1.0:
        raise ValueError(f"swa_full_tokens_ratio must be in (0, 1], got {ratio}")
    cell = full_bytes + ratio * swa_bytes  # float, as in SGLang
    max_total = int(budget_bytes // cell)
    full_tokens = max_total // page_size * page_size
    swa_tokens = int(full_tokens * ratio) // page_size * page_size
    return full_tokens, swa_tokens


@dataclass(frozen=True)
class PoolSizes:
    """Two pools and how many requests of the planned shape they hold."""

    ratio: float
    full_tokens: int
    swa_tokens: int
    full_holds: int  # requests the full pool alone holds
    swa_holds: int  # requests the SWA pool alone holds (after the prefill reserve)
    binding: str  # "full", "swa" or "both"

    @property
    def holds(self) -> int:
        return min(self.full_holds, self.swa_holds)


def pool_capacity(full_tokens: int, swa_tokens: int, needs: RequestNeeds, ratio: float = float("nan")) -> PoolSizes:
    """How many requests each pool holds, and which one binds."""
    full_holds = full_tokens // needs.full_per_request
    usable = swa_tokens - needs.swa_reserve
    swa_holds = usable // needs.swa_per_request if swa_tokens >= needs.swa_floor and usable > 0 else 0
    binding = "both" if full_holds == swa_holds else ("full" if full_holds < swa_holds else "swa")
    return PoolSizes(ratio, full_tokens, swa_tokens, full_holds, swa_holds, binding)


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwaPlan:
    """The planned split, with SGLang's default ratio beside it."""

    model: str
    dtype_bytes: int
    tp_size: int
    budget_bytes: int
    requests: int
    tokens_per_request: int
    schedule: SglangSchedule
    full_bytes_per_token: int
    swa_bytes_per_token: int
    needs: RequestNeeds
    planned: PoolSizes
    sglang_default: PoolSizes
    full_kv_layers: int | None = None  # layers priced in the full pool (None: bytes given directly)
    swa_kv_layers: int | None = None
    kv_shared_layers: int | None = None  # layers that own no KV

    @property
    def swa_full_tokens_ratio(self) -> float:
        return self.planned.ratio

    @property
    def full_tokens(self) -> int:
        return self.planned.full_tokens

    @property
    def swa_tokens(self) -> int:
        return self.planned.swa_tokens

    @property
    def admitted(self) -> int:
        """Requests of the workload that run at once without eviction."""
        return min(self.requests, self.planned.holds)

    @property
    def binding(self) -> str:
        return self.planned.binding

    @property
    def default_admitted(self) -> int:
        return min(self.requests, self.sglang_default.holds)

    def as_dict(self) -> dict[str, Any]:
        out = dict(
            model=self.model, dtype_bytes=self.dtype_bytes, tp_size=self.tp_size,
            budget_bytes=self.budget_bytes, requests=self.requests, tokens_per_request=self.tokens_per_request,
            schedule=dataclasses.asdict(self.schedule),
            full_bytes_per_token=self.full_bytes_per_token, swa_bytes_per_token=self.swa_bytes_per_token,
            full_kv_layers=self.full_kv_layers, swa_kv_layers=self.swa_kv_layers,
            kv_shared_layers=self.kv_shared_layers, needs=dataclasses.asdict(self.needs),
            swa_full_tokens_ratio=self.swa_full_tokens_ratio, full_tokens=self.full_tokens,
            swa_tokens=self.swa_tokens, admitted=self.admitted, binding=self.binding,
            planned=dict(dataclasses.asdict(self.planned), holds=self.planned.holds),
            sglang_default=dict(dataclasses.asdict(self.sglang_default), holds=self.sglang_default.holds,
                                admitted=self.default_admitted),
        )
        return out


def _ratio_candidates(exact: float) -> list[float]:
    """The ratio rounded up to 4 decimals first (a value a user can type), then exact, then down."""
    scale = 10**RATIO_DECIMALS
    up = min(1.0, math.ceil(exact * scale - 1e-9) / scale)
    down = math.floor(exact * scale + 1e-9) / scale
    return [r for r in dict.fromkeys((up, min(exact, 1.0), down)) if 0 < r <= 1.0]


def _fit(k: int, budget: int, full_bytes: int, swa_bytes: int, needs: RequestNeeds, page: int) -> PoolSizes | None:
    """Pools (via SGLang's formula) that hold ``k`` requests, or None."""
    exact = needs.swa_need(k) / needs.full_need(k)
    for ratio in _ratio_candidates(exact):
        full, swa = sglang_pool_sizes(budget, ratio, full_bytes, swa_bytes, page)
        sizes = pool_capacity(full, swa, needs, ratio)
        if sizes.holds >= k:
            return sizes
    return None


def plan_pools(
    *,
    full_bytes_per_token: int,
    swa_bytes_per_token: int,
    window: int,
    budget_bytes: int | str,
    requests: int,
    tokens_per_request: int,
    schedule: SglangSchedule = SglangSchedule(),
    model: str = "",
    dtype: Any = "bf16",
    tp_size: int = 1,
) -> SwaPlan:
    """The planner on explicit bytes per token and SGLang's (exclusive) ``window``.

    Raises ValueError when the budget does not hold one request of ``tokens_per_request``.
    """
    budget = parse_bytes(budget_bytes)
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    full_bytes, swa_bytes = int(full_bytes_per_token), int(swa_bytes_per_token)
    if full_bytes <= 0 or swa_bytes <= 0:
        raise ValueError(
            f"{model or 'model'}: the planner needs both pools (full {full_bytes} B/token, SWA {swa_bytes} B/token)"
        )
    needs = request_needs(tokens_per_request, int(window), schedule)
    page = schedule.page_size

    # Upper bound on k: the byte need of k requests with no rounding and no ratio cap.
    per_request = needs.full_per_request * full_bytes + needs.swa_per_request * swa_bytes
    upper = min(requests, max(0, (budget - needs.swa_reserve * swa_bytes) // per_request))
    best: PoolSizes | None = None
    lo, hi = 1, upper
    while lo <= hi:  # the largest k that fits (fitting gets harder as k grows)
        mid = (lo + hi) // 2
        sizes = _fit(mid, budget, full_bytes, swa_bytes, needs, page)
        if sizes is not None:
            best, lo = sizes, mid + 1
        else:
            hi = mid - 1
    if best is None:
        one = needs.full_need(1) * full_bytes + needs.swa_need(1) * swa_bytes
        raise ValueError(
            f"a KV budget of {budget} bytes ({budget / 2**30:.2f} GiB) is too small for one request of "
            f"{tokens_per_request} tokens on {model or 'this model'}: it needs {needs.full_need(1)} full-pool "
            f"tokens x {full_bytes} B + {needs.swa_need(1)} SWA-pool tokens x {swa_bytes} B = {one} bytes "
            f"({one / 2**30:.2f} GiB; the SWA part includes {needs.swa_reserve} tokens for "
            f"{schedule.chunks_in_flight} prefill chunk(s) in flight)"
        )
    default_full, default_swa = sglang_pool_sizes(budget, SGLANG_DEFAULT_RATIO, full_bytes, swa_bytes, page)
    return SwaPlan(
        model=model,
        dtype_bytes=dtype_bytes(dtype),
        tp_size=tp_size,
        budget_bytes=budget,
        requests=requests,
        tokens_per_request=tokens_per_request,
        schedule=schedule,
        full_bytes_per_token=full_bytes,
        swa_bytes_per_token=swa_bytes,
        needs=needs,
        planned=best,
        sglang_default=pool_capacity(default_full, default_swa, needs, SGLANG_DEFAULT_RATIO),
    )


def plan_swa_pools(
    model: Any,
    *,
    budget_bytes: int | str,
    requests: int,
    tokens_per_request: int,
    dtype: Any = "bf16",
    tp_size: int = 1,
    schedule: SglangSchedule = SglangSchedule(),
    include_kv_shared: bool = False,
) -> SwaPlan:
    """Plan the full / SWA pool split for ``requests`` concurrent requests of ``tokens_per_request``.

    ``model``: a preset, a preset name or a transformers Gemma-4 config (anything else raises
    ValueError). ``include_kv_shared=True`` prices the KV-shared layers as SGLang 0.5.23
    allocates them (without the plugin's reclaim). Raises ValueError when the budget does not
    hold one request.
    """
    layout = kv_layout(model)
    full_bytes, swa_bytes = layout.bytes_per_token(dtype, tp_size=tp_size, include_kv_shared=include_kv_shared)
    plan = plan_pools(
        full_bytes_per_token=full_bytes,
        swa_bytes_per_token=swa_bytes,
        window=layout.sglang_window,
        budget_bytes=budget_bytes,
        requests=requests,
        tokens_per_request=tokens_per_request,
        schedule=schedule,
        model=layout.name,
        dtype=dtype,
        tp_size=tp_size,
    )
    counted = set() if include_kv_shared else set(layout.kv_shared_layers)
    return dataclasses.replace(
        plan,
        full_kv_layers=sum(t == FULL and i not in counted for i, t in enumerate(layout.layer_types)),
        swa_kv_layers=sum(t == SLIDING and i not in counted for i, t in enumerate(layout.layer_types)),
        kv_shared_layers=len(layout.kv_shared_layers),
    )

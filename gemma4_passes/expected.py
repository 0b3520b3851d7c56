"""How many times each fusion should match a whole Gemma-4 model, from its config.

The rule per layer (one compiled graph holding every layer):
  qkv_norm             every layer (q alone in KV-shared layers)
  moe_input_norms      every MoE layer (26B-A4B): its post-attention site
  moe_branch_combine   every MoE layer: its FFN tail
  moe_router           every MoE layer
  moe_dispatch         every MoE layer whose experts run transformers' "grouped_mm" implementation
                       (transformers' default where it can dispatch; a config that names another
                       implementation, e.g. "eager" or "batched_mm", has no such dispatch: 0)
  post_attn_norm       every other layer (MoE layers too when moe_input_norms is not selected)
  ffn_tail             every other layer without PLE (its next norm is the next layer's input
                       norm, or the final norm after the last layer)
  ple_tail, ple_gate   every layer with PLE (E2B/E4B)
  kv_shared_dead_kv    0: transformers builds no k/v projections in KV-shared layers, so its
                       graphs hold no dead K/V work (SGLang's merged QKV GEMM does: one match
                       per KV-shared layer there)
"""

from __future__ import annotations

from typing import Any

from .passes import DEFAULT_FUSIONS, FUSIONS


def expected_matches(preset_or_config: Any, fusions=None, rows: int | None = None) -> dict[str, int]:
    """Matches per fusion for one compile of the whole decoder, given the selected fusions.

    An MoE layer's post-attention site and FFN tail go to the MoE fusions when they are selected
    (they run first), else to ``post_attn_norm`` / ``ffn_tail``.  ``rows``: the static token count
    of the compiled graph, if known; where Inductor's own fusion measured faster for that many rows
    of this hidden size the norm epilogues are left unfused (``kernels.norm_residual.prefer_inductor``).
    """
    from .models import describe

    layers = describe(preset_or_config)["layers"]
    grouped = _experts_implementation(preset_or_config) == "grouped_mm"
    selected = list(DEFAULT_FUSIONS) if fusions is None else list(fusions)
    names = selected
    moe_in = "moe_input_norms" in names
    moe_out = "moe_branch_combine" in names
    per_fusion = {
        "moe_input_norms": sum(l["is_moe"] for l in layers),
        "post_attn_norm": sum(not (l["is_moe"] and moe_in) for l in layers),
        "moe_branch_combine": sum(l["is_moe"] for l in layers),
        "ffn_tail": sum(not l["has_ple"] and not (l["is_moe"] and moe_out) for l in layers),
        "ple_tail": sum(l["has_ple"] for l in layers),
        "ple_gate": sum(l["has_ple"] for l in layers),
        "qkv_norm": len(layers),
        "moe_router": sum(l["is_moe"] for l in layers),
        "moe_dispatch": sum(l["is_moe"] for l in layers) if grouped else 0,
        "kv_shared_dead_kv": 0,
    }
    if rows is not None:
        from .kernels.norm_residual import prefer_inductor

        if prefer_inductor(int(rows), int(describe(preset_or_config)["hidden_size"])):
            for name in ("post_attn_norm", "ffn_tail", "ple_tail"):
                per_fusion[name] = 0
    # every fusion is listed (the match report lists them all); the unselected ones expect 0
    return {name: per_fusion.get(name, 0) if name in selected else 0 for name in FUSIONS}


def _experts_implementation(preset_or_config: Any) -> str:
    """The experts implementation a model built from this runs: the config's, or transformers'
    default ("grouped_mm") where none is named (presets, preset names, fresh configs)."""
    from .models import _as_text_config

    impl = getattr(_as_text_config(preset_or_config), "_experts_implementation", None)
    return "grouped_mm" if impl is None else str(impl)

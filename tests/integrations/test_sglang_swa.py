"""The SWA hooks (gemma4_passes.integrations.sglang_swa) against the real sglang 0.5.23 package.

What imports on a CPU machine is used as is: ``ServerArgs`` and its CLI parser,
``layer_setup.resolve_layer_indices`` / ``ModelLayerInfo``, ``HookRegistry`` and the plugin
loader. ``pool_configurator`` and ``frozen_kv_mtp_utils`` import the whole model stack (they stop
at torchvision here), so their code is taken from the installed source file: the classes and
functions named below are compiled from sglang's own text, with the few module globals their
bodies call replaced by stand-ins, and run unchanged.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

try:
    import sglang.srt.plugins  # noqa: F401
    from sglang.srt.model_executor.model_runner_components import layer_setup
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn
    from sglang.srt.server_args import ServerArgs
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"sglang is not importable ({type(exc).__name__}: {exc})", allow_module_level=True)

from gemma4_passes import presets
from gemma4_passes.integrations import sglang_plugin, sglang_swa
from gemma4_passes.runtime import swa
from gemma4_passes.runtime.swa import plan_pools

SRT = Path(importlib.util.find_spec("sglang").submodule_search_locations[0]) / "srt"
GiB = 2**30


# ------------------------------------------------------------------------------------------------
# sglang source, compiled from the installed files
# ------------------------------------------------------------------------------------------------
def _compile_from_source(path: Path, names: list[str], namespace: dict) -> dict:
    tree = ast.parse(path.read_text())
    picked = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in names]
    assert sorted(n.name for n in picked) == sorted(names), f"{path.name} no longer defines {names}"
    future = ast.parse("from __future__ import annotations").body
    module = ast.Module(body=future + picked, type_ignores=[])
    mod = types.ModuleType(f"sglang_source_{path.stem}")
    mod.__dict__.update(namespace)
    sys.modules[mod.__name__] = mod  # dataclasses resolve string annotations through sys.modules
    exec(compile(module, str(path), "exec"), mod.__dict__)
    return mod.__dict__


class AttentionArch(Enum):  # stand-in for configs.model_config.AttentionArch
    MLA = "mla"
    MHA = "mha"


def load_pool_configurator(ratio: float = 0.8, *, unified: bool = False) -> dict:
    """``pool_configurator``'s sizing classes and ``create_memory_pool_configurator``, from source."""
    schedule = SimpleNamespace(swa_full_tokens_ratio=ratio, max_running_requests=None)
    namespace = dict(
        logging=logging, logger=logging.getLogger("sglang.srt.model_executor.pool_configurator"),
        dataclass=dataclass, Optional=Optional, bisect_right=bisect_right, torch=torch,
        AttentionArch=AttentionArch,
        get_parallel=lambda: SimpleNamespace(attn_tp_size=1, attn_dcp_size=1),
        get_schedule=lambda: schedule,
        get_memory=lambda: SimpleNamespace(enable_unified_memory=unified, disable_radix_cache=False),
        is_deepseek_v4=lambda hf_config: False,
    )
    names = ["MemoryPoolConfig", "MemoryPoolConfigurator", "HybridSWAPoolConfigurator",
             "SWARequestCapPoolConfigurator", "_dflash_draft_cell_size", "create_memory_pool_configurator"]
    return _compile_from_source(SRT / "model_executor" / "pool_configurator.py", names, namespace)


def sglang_model_config(name: str, *, architecture: str = "Gemma4ForCausalLM"):
    """SGLang's ``ModelConfig`` surface for a Gemma-4 preset after its config overrides
    (``utils/hf_transformers/config.py`` ``_apply_gemma4_attention_overrides``: head_dim /
    num_key_value_heads are the FULL layers', ``swa_*`` the sliding ones') and
    ``get_hybrid_layer_ids`` (``configs/model_config.py``: every layer by layer_types, KV-shared
    ones included)."""
    p = presets.resolve(name)
    return SimpleNamespace(
        hf_config=SimpleNamespace(architectures=[architecture]),
        hf_text_config=SimpleNamespace(num_kv_shared_layers=p.num_kv_shared_layers),
        attention_arch=AttentionArch.MHA,
        head_dim=p.global_head_dim, v_head_dim=p.global_head_dim,
        swa_head_dim=p.head_dim, swa_v_head_dim=p.head_dim,
        get_num_kv_heads=lambda tp, dcp=1: max(1, p.full_kv_heads // tp),
        get_swa_num_kv_heads=lambda tp: max(1, p.num_key_value_heads // tp),
        is_hybrid_swa=True,
        swa_attention_layer_ids=list(p.sliding_attention_layers),
        full_attention_layer_ids=list(p.full_attention_layers),
        num_hidden_layers=p.num_hidden_layers, num_attention_layers=p.num_hidden_layers,
        num_nextn_predict_layers=None, context_len=p.max_position_embeddings,
    )


def server_args(*cli: str) -> ServerArgs:
    """A real ServerArgs from SGLang's own CLI parser."""
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(["--model-path", "google/gemma-4-x", *cli]))


def kv_cache_configurator(name: str, layer_info, sargs: ServerArgs, **model_kw):
    p = presets.resolve(name)
    return SimpleNamespace(
        kv_cache_dtype_str="bfloat16", kv_cache_dtype=torch.bfloat16,
        model_config=sglang_model_config(name, **model_kw), layer_info=layer_info,
        sliding_window_size=p.sliding_window - 1, page_size=1, is_hybrid_swa=True,
        is_draft_worker=False, server_args=sargs, attn_dp_size=1,
        spec_algorithm=SimpleNamespace(is_eagle=lambda: False, is_standalone=lambda: False,
                                       is_dflash_family=lambda: False),
        spec_aux_config=SimpleNamespace(eagle_draft_num_layers=None),
        fused_entry_bytes=lambda kind: None,
    )


def layer_info_for(name: str) -> "layer_setup.ModelLayerInfo":
    p = presets.resolve(name)
    return layer_setup.ModelLayerInfo(
        start_layer=0, end_layer=p.num_hidden_layers, num_effective_layers=p.num_hidden_layers,
        swa_attention_layer_ids=list(p.sliding_attention_layers),
        full_attention_layer_ids=list(p.full_attention_layers),
    )


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    sglang_swa.reset_planned_ratio()
    for env in (sglang_swa.ENV_PLAN, sglang_swa.ENV_WORKLOAD, sglang_swa.ENV_RECLAIM, sglang_swa.ENV_VIEW,
                sglang_swa.ENV_STRICT, "SGLANG_SWA_EVICTION_INTERVAL"):
        monkeypatch.delenv(env, raising=False)
    yield
    sglang_swa.reset_planned_ratio()


# ------------------------------------------------------------------------------------------------
# SGLang's sizing formula, round trip
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["e4b", "26b-a4b", "31b"])
@pytest.mark.parametrize("ratio", [0.8, 0.2519, 0.1017, 1.0, 0.05])
@pytest.mark.parametrize("budget", [3 * GiB, 40 * GiB, 123_456_789_012])
def test_planner_formula_is_sglangs(name, ratio, budget):
    ns = load_pool_configurator(ratio)
    kvc = kv_cache_configurator(name, layer_info_for(name), server_args())
    conf = ns["HybridSWAPoolConfigurator"](kvc)  # SGLang's own __init__
    full_b, swa_b = swa.kv_layout(name).bytes_per_token("bf16", include_kv_shared=True)
    assert (conf._full_cell_bytes(), conf._swa_cell_bytes()) == (full_b, swa_b)
    try:
        config = conf.calculate_pool_sizes(budget, 1)
    except ValueError:  # SGLang rejects an SWA pool below one window; the planner's capacity is 0 there
        full, swa_tokens = swa.sglang_pool_sizes(budget, ratio, full_b, swa_b)
        assert swa_tokens <= kvc.sliding_window_size + 1
        return
    assert (config.full_max_total_num_tokens, config.swa_max_total_num_tokens) == swa.sglang_pool_sizes(
        budget, ratio, full_b, swa_b
    )


# ------------------------------------------------------------------------------------------------
# (1) the planned ratio, at pool sizing
# ------------------------------------------------------------------------------------------------
def _hooked_create(ns):
    return _wrap_fn(ns["create_memory_pool_configurator"], sglang_swa.after_create_memory_pool_configurator,
                    HookType.AFTER)


def test_ratio_given_by_user_reads_real_server_args():
    assert not sglang_swa.ratio_given_by_user(server_args())
    assert sglang_swa.ratio_given_by_user(server_args("--swa-full-tokens-ratio", "0.8"))  # explicit default
    assert sglang_swa.ratio_given_by_user(server_args("--swa-full-tokens-ratio", "0.3"))
    assert not sglang_swa.ratio_given_by_user(ServerArgs(model_path="x"))
    assert sglang_swa.ratio_given_by_user(ServerArgs(model_path="x", swa_full_tokens_ratio=0.5))


def test_unset_ratio_is_planned_and_logged(monkeypatch, caplog):
    # E4B with its KV-shared slots reclaimed (owners: 4 full, 20 sliding layers): the planner's
    # hand-computed case in tests/runtime/test_swa.py, through SGLang's configurator
    monkeypatch.setenv(sglang_swa.ENV_WORKLOAD, "64x4096")
    p = presets.resolve("e4b")
    info = layer_setup.ModelLayerInfo(
        start_layer=0, end_layer=42, num_effective_layers=42,
        swa_attention_layer_ids=[i for i in p.sliding_attention_layers if i < 24],
        full_attention_layer_ids=[i for i in p.full_attention_layers if i < 24],
    )
    ns = load_pool_configurator(0.8)
    kvc = kv_cache_configurator("e4b", info, server_args())
    caplog.set_level(logging.INFO, logger="gemma4_passes.sglang")
    conf = _hooked_create(ns)(kvc)
    assert type(conf).__name__ == "HybridSWAPoolConfigurator"
    config = conf.calculate_pool_sizes(8 * GiB, 1)
    # 16,384 / 40,960 B per token, 64 x 4096 tokens, 8 GiB -> ratio 0.1878, pools 356,779 / 67,003
    assert conf._swa_full_tokens_ratio == 0.1878
    assert (config.full_max_total_num_tokens, config.swa_max_total_num_tokens) == (356_779, 67_003)
    # SGLang's own 0.8 on the same budget: cell 16,384 + 0.8 * 40,960 = 49,152 -> 174,762 / 139,809
    line = [r.getMessage() for r in caplog.records if "swa_full_tokens_ratio" in r.getMessage()]
    assert len(line) == 1, line
    assert "0.8 -> 0.1878" in line[0] and "full pool 174762 -> 356779 tokens" in line[0]
    assert "SWA pool 139809 -> 67003 tokens" in line[0] and "64 x 4096 tokens" in line[0]
    # the cap path on the same configurator keeps the planned ratio
    capped = conf.calculate_pool_sizes_from_max_tokens(100_000, 1)
    assert capped.swa_max_total_num_tokens == int(100_000 * 0.1878)
    # a later configurator in the same process reuses it (no re-planning on a new budget)
    later = _hooked_create(ns)(kvc)
    assert later._swa_full_tokens_ratio == 0.1878
    assert later.calculate_pool_sizes(6 * GiB, 1).full_max_total_num_tokens == swa.sglang_pool_sizes(
        6 * GiB, 0.1878, 16_384, 40_960)[0]


def test_default_workload_admits_as_many_as_fit(caplog):
    # no workload given: 8192-token requests (E4B's context is longer), as many as the budget holds
    ns = load_pool_configurator(0.8)
    kvc = kv_cache_configurator("31b", layer_info_for("31b"), server_args())
    caplog.set_level(logging.INFO, logger="gemma4_passes.sglang")
    config = _hooked_create(ns)(kvc).calculate_pool_sizes(40 * GiB, 1)
    plan = plan_pools(full_bytes_per_token=81_920, swa_bytes_per_token=819_200, window=1023,
                      budget_bytes=40 * GiB, requests=10**9, tokens_per_request=8192)
    assert plan.admitted == 18 and plan.swa_full_tokens_ratio == 0.2519  # test_swa's tight-budget case
    assert (config.full_max_total_num_tokens, config.swa_max_total_num_tokens) == (plan.full_tokens, plan.swa_tokens)
    assert any("planned for 18 x 8192 tokens" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("cli", [("--swa-full-tokens-ratio", "0.8"), ("--swa-full-tokens-ratio", "0.5")])
def test_user_ratio_is_never_overridden(cli, caplog):
    ratio = float(cli[1])
    ns = load_pool_configurator(ratio)
    kvc = kv_cache_configurator("26b-a4b", layer_info_for("26b-a4b"), server_args(*cli))
    caplog.set_level(logging.DEBUG, logger="gemma4_passes.sglang")
    hooked = _hooked_create(ns)(kvc).calculate_pool_sizes(40 * GiB, 1)
    plain = ns["create_memory_pool_configurator"](kvc).calculate_pool_sizes(40 * GiB, 1)
    assert hooked == plain
    assert any("--swa-full-tokens-ratio was given" in r.getMessage() for r in caplog.records)


def test_not_planned_outside_its_scope(monkeypatch):
    ns = load_pool_configurator(0.8)
    kvc = kv_cache_configurator("31b", layer_info_for("31b"), server_args())
    conf = ns["HybridSWAPoolConfigurator"](kvc)
    assert sglang_swa.why_not_planned(conf, kvc) is None
    other = kv_cache_configurator("31b", layer_info_for("31b"), server_args(), architecture="Gemma3ForCausalLM")
    assert sglang_swa.why_not_planned(conf, other) == "not a Gemma-4 model"
    capped = object.__new__(ns["SWARequestCapPoolConfigurator"])
    assert "sizes its pools itself" in sglang_swa.why_not_planned(capped, kvc)
    unified = load_pool_configurator(0.8, unified=True)["HybridSWAPoolConfigurator"](kvc)
    assert sglang_swa.why_not_planned(unified, kvc) == "unified memory pool"
    conf._draft_full_layers_num = 1
    assert "draft KV" in sglang_swa.why_not_planned(conf, kvc)
    monkeypatch.setenv(sglang_swa.ENV_PLAN, "0")
    assert sglang_swa.why_not_planned(ns["HybridSWAPoolConfigurator"](kvc), kvc) == f"{sglang_swa.ENV_PLAN}=0"


def test_budget_too_small_keeps_sglangs_ratio(monkeypatch, caplog):
    monkeypatch.setenv(sglang_swa.ENV_WORKLOAD, "1x131072")
    ns = load_pool_configurator(0.8)
    kvc = kv_cache_configurator("31b", layer_info_for("31b"), server_args())
    caplog.set_level(logging.WARNING, logger="gemma4_passes.sglang")
    hooked = _hooked_create(ns)(kvc).calculate_pool_sizes(20 * GiB, 1)
    assert hooked == ns["create_memory_pool_configurator"](kvc).calculate_pool_sizes(20 * GiB, 1)
    assert any("left SGLang's ratio 0.8 in place" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(sglang_swa.ENV_STRICT, "1")
    with pytest.raises(ValueError, match="too small for one request"):
        _hooked_create(ns)(kvc).calculate_pool_sizes(20 * GiB, 1)


def test_workload_env_is_validated(monkeypatch):
    kvc = kv_cache_configurator("e4b", layer_info_for("e4b"), server_args("--max-running-requests", "48"))
    assert sglang_swa.workload_for(kvc) == (48, 8192)
    monkeypatch.setenv(sglang_swa.ENV_WORKLOAD, "x2048")
    assert sglang_swa.workload_for(kvc) == (48, 2048)
    monkeypatch.setenv(sglang_swa.ENV_WORKLOAD, "lots")
    with pytest.raises(ValueError, match="REQUESTSxTOKENS"):
        sglang_swa.workload_for(kvc)


# ------------------------------------------------------------------------------------------------
# (2) KV-shared layers: no pool slots
# ------------------------------------------------------------------------------------------------
class _Radix(SimpleNamespace):
    pass


def sglang_like_model(name: str):
    """``Gemma4ForCausalLM``'s attention wiring (models/gemma4_causal.py): a KV-shared layer's
    RadixAttention carries its producer's layer id."""
    p = presets.resolve(name)
    layers = []
    for i in range(p.num_hidden_layers):
        shared = i in p.kv_shared_layers
        attn = SimpleNamespace(layer_id=i, is_kv_shared_layer=shared,
                               kv_shared_layer_index=p.kv_source(i) if shared else None,
                               attn=_Radix(layer_id=p.kv_source(i)))
        layers.append(SimpleNamespace(self_attn=attn))
    return SimpleNamespace(model=SimpleNamespace(layers=layers))


def test_gemma4_causal_wiring_is_what_the_check_reads():
    src = (SRT / "models" / "gemma4_causal.py").read_text()
    assert "self.kv_shared_layer_index if self.is_kv_shared_layer else self.layer_id" in src
    assert "save_kv_cache=not self.is_kv_shared_layer" in src
    # the pool takes every id of the runner's lists (mem_cache/swa_memory_pool.py)
    pool_src = (SRT / "mem_cache" / "swa_memory_pool.py").read_text()
    assert "layer_num=self.full_layer_nums" in pool_src and "layer_num=self.swa_layer_nums" in pool_src
    # and the lists are every layer by type (configs/model_config.py get_hybrid_layer_ids, Gemma-4 branch)
    cfg_src = (SRT / "configs" / "model_config.py").read_text()
    gemma_branch = cfg_src[cfg_src.index('or "Gemma4ForCausalLM" in model_architectures'):][:1200]
    assert 'i for i, x in enumerate(layer_types) if x == "sliding_attention"' in gemma_branch


@pytest.mark.parametrize("name,first_shared,full_left,swa_left", [("e4b", 24, 4, 20), ("e2b", 15, 3, 12)])
def test_kv_shared_slots_reclaimed_through_real_resolve_layer_indices(monkeypatch, caplog, name, first_shared,
                                                                      full_left, swa_left):
    monkeypatch.setattr(sglang_swa, "pool_layout_is_local", lambda: True)
    caplog.set_level(logging.INFO, logger="gemma4_passes.sglang")
    resolve = _wrap_fn(layer_setup.resolve_layer_indices, sglang_swa.after_resolve_layer_indices, HookType.AFTER)
    model, mc = sglang_like_model(name), sglang_model_config(name)
    info = resolve(model=model, model_config=mc, is_draft_worker=False, draft_model_idx=None)
    assert isinstance(info, layer_setup.ModelLayerInfo)
    assert info.full_attention_layer_ids == [i for i in mc.full_attention_layer_ids if i < first_shared]
    assert info.swa_attention_layer_ids == [i for i in mc.swa_attention_layer_ids if i < first_shared]
    assert (len(info.full_attention_layer_ids), len(info.swa_attention_layer_ids)) == (full_left, swa_left)
    p = presets.resolve(name)
    assert any(f"layers {first_shared}..{p.num_hidden_layers - 1} own no KV" in r.getMessage() for r in caplog.records)
    # SGLang's configurator then prices only the owners: the planner's owner bytes per token
    conf = load_pool_configurator()["HybridSWAPoolConfigurator"](kv_cache_configurator(name, info, server_args()))
    assert (conf._full_cell_bytes(), conf._swa_cell_bytes()) == swa.kv_layout(name).bytes_per_token("bf16")
    # every id a layer reads is still in the pool
    kept = set(info.full_attention_layer_ids) | set(info.swa_attention_layer_ids)
    assert {layer.self_attn.attn.layer_id for layer in model.model.layers} <= kept


def test_kv_shared_slots_kept_where_not_safe(monkeypatch):
    resolve = _wrap_fn(layer_setup.resolve_layer_indices, sglang_swa.after_resolve_layer_indices, HookType.AFTER)
    model, mc = sglang_like_model("e4b"), sglang_model_config("e4b")
    full_ids = list(mc.full_attention_layer_ids)

    def run(**kw):
        args = dict(model=model, model_config=mc, is_draft_worker=False, draft_model_idx=None)
        args.update(kw)
        return resolve(**args).full_attention_layer_ids

    # PD disaggregation / hierarchical cache, or unknown: a peer must agree on the layout
    monkeypatch.setattr(sglang_swa, "pool_layout_is_local", lambda: False)
    assert run() == full_ids
    monkeypatch.setattr(sglang_swa, "pool_layout_is_local", lambda: True)
    assert run(is_draft_worker=True) == full_ids
    assert run(model_config=sglang_model_config("e4b", architecture="Gemma3nForCausalLM")) == full_ids
    # a layer that still points at its own slot keeps it
    model.model.layers[41].self_attn.attn.layer_id = 41
    assert 41 in run()
    monkeypatch.setenv(sglang_swa.ENV_RECLAIM, "0")
    assert run() == full_ids
    # models without KV sharing are untouched
    monkeypatch.delenv(sglang_swa.ENV_RECLAIM)
    mc31 = sglang_model_config("31b")
    assert resolve(model=sglang_like_model("31b"), model_config=mc31, is_draft_worker=False,
                   draft_model_idx=None).full_attention_layer_ids == list(mc31.full_attention_layer_ids)


def test_pool_layout_unknown_counts_as_not_local():
    # the runtime config bags are not published in this process: reclaim stays off
    assert sglang_swa.pool_layout_is_local() is False


# ------------------------------------------------------------------------------------------------
# (3) the frozen-KV MTP views
# ------------------------------------------------------------------------------------------------
def load_frozen_views() -> dict:
    return _compile_from_source(
        SRT / "speculative" / "frozen_kv_mtp_utils.py", ["frozen_kv_target_view", "target_kv_pool_view"],
        dict(contextmanager=contextmanager),
    )


class SWAPool:
    def __init__(self):
        self.full_to_swa_index_mapping = object()
        self.layers_mapping = {}

    def translate_loc_from_full_to_swa(self, loc):
        return loc


def draft_backend():
    """A TritonAttnBackend built on the draft's own (non-SWA) pool."""
    return SimpleNamespace(token_to_kv_pool="draft-pool", use_sliding_window_kv_pool=False,
                           sliding_window_size=511, window_kv_indptr=object())


@pytest.mark.parametrize("view", ["frozen_kv_target_view", "target_kv_pool_view"])
def test_frozen_view_switches_swa_state_with_the_pool(view):
    original = load_frozen_views()[view]
    hooked = _wrap_fn(original, sglang_swa.around_frozen_kv_view, HookType.AROUND)
    target = SWAPool()
    fb = SimpleNamespace(spec_info="draft-spec")
    ctx = SimpleNamespace(target_token_to_kv_pool=target)
    backend = draft_backend()
    with hooked(fb, ctx, backend):
        assert backend.token_to_kv_pool is target and backend.use_sliding_window_kv_pool is True
    assert backend.token_to_kv_pool == "draft-pool" and backend.use_sliding_window_kv_pool is False
    assert fb.spec_info == "draft-spec"
    # without the hook SGLang swaps the pool alone: the flag keeps describing the draft pool
    with original(fb, ctx, backend):
        assert backend.token_to_kv_pool is target and backend.use_sliding_window_kv_pool is False


def test_frozen_view_restores_everything_on_exceptions():
    hooked = _wrap_fn(load_frozen_views()["frozen_kv_target_view"], sglang_swa.around_frozen_kv_view, HookType.AROUND)
    fb, backend = SimpleNamespace(spec_info="s"), draft_backend()
    with pytest.raises(RuntimeError, match="metadata failed"):
        with hooked(fb, SimpleNamespace(target_token_to_kv_pool=SWAPool()), backend):
            assert fb.spec_info is None
            raise RuntimeError("metadata failed")
    assert (backend.token_to_kv_pool, backend.use_sliding_window_kv_pool, fb.spec_info) == ("draft-pool", False, "s")
    # SGLang's own error for an unbound context comes through, nothing changed
    with pytest.raises(RuntimeError, match="before the model was bound"):
        with hooked(fb, None, backend):
            pass
    assert backend.token_to_kv_pool == "draft-pool"


def test_frozen_view_switch_off(monkeypatch):
    monkeypatch.setenv(sglang_swa.ENV_VIEW, "0")
    hooked = _wrap_fn(load_frozen_views()["target_kv_pool_view"], sglang_swa.around_frozen_kv_view, HookType.AROUND)
    backend = draft_backend()
    with hooked(SimpleNamespace(spec_info=None), SimpleNamespace(target_token_to_kv_pool=SWAPool()),
                draft_attn_backend=backend):
        assert backend.use_sliding_window_kv_pool is False


# ------------------------------------------------------------------------------------------------
# plugin discovery
# ------------------------------------------------------------------------------------------------
def test_hooks_are_in_the_plugin_list():
    hooks = sglang_plugin.all_hooks()
    for target, fn, kind in sglang_swa.SGLANG_HOOKS:
        assert (target, fn, kind) in hooks
        assert kind in HookType.__members__
    assert {t for t, _, _ in sglang_swa.SGLANG_HOOKS} == {
        sglang_swa.POOL_CONFIGURATOR_TARGET, sglang_swa.LAYER_INDICES_TARGET,
        sglang_swa.FROZEN_TARGET_VIEW_TARGET, sglang_swa.FROZEN_POOL_VIEW_TARGET,
    }
    # every target exists in the installed sglang source
    for target, _, _ in sglang_swa.SGLANG_HOOKS:
        module, name = target.rsplit(".", 1)
        path = SRT.parent / (module.removeprefix("sglang.").replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body), target


@pytest.mark.skipif(
    not any(ep.name == "gemma4_passes" for ep in entry_points(group="sglang.srt.plugins")),
    reason="gemma4-passes is not pip-installed (pip install -e . --no-deps)",
)
def test_load_plugins_registers_swa_hooks():
    body = textwrap.dedent(
        """
        import json, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from sglang.srt.plugins import load_plugins
        from sglang.srt.plugins.hook_registry import HookRegistry
        from gemma4_passes.integrations import sglang_swa
        load_plugins()
        from sglang.srt.model_executor.model_runner_components import layer_setup
        out = {}
        for target, fn, kind in sglang_swa.SGLANG_HOOKS:
            entries = [(e[0].name, e[1].__name__, e[2].plugin_name if e[2] else None)
                       for e in HookRegistry._hooks.get(target, ())]
            out[target] = dict(entries=entries, patched=target in HookRegistry._patched)
        out["layer_setup_wrapped"] = getattr(layer_setup.resolve_layer_indices, "__wrapped__", None) is not None
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMMA4_PASSES", "SGLANG_PLUGINS"))}
    proc = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for target, fn, kind in sglang_swa.SGLANG_HOOKS:
        assert [kind, fn.__name__, "gemma4_passes"] in out[target]["entries"], (target, proc.stderr[-3000:])
    # layer_setup imports on a CPU machine, so its hook is applied here for real
    assert out[sglang_swa.LAYER_INDICES_TARGET]["patched"] and out["layer_setup_wrapped"]
    assert "Executed general plugin: gemma4_passes" in proc.stderr

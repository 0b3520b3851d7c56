"""The public API: selection, install/chain/restore, cache key, report, clear errors."""

import pytest
import torch
import torch._inductor.config as inductor_config

import gemma4_passes
from gemma4_passes import compat, manager


@pytest.fixture(autouse=True)
def clean_slot():
    prev = inductor_config.post_grad_custom_pre_pass
    inductor_config.post_grad_custom_pre_pass = None
    yield
    inductor_config.post_grad_custom_pre_pass = prev


def test_available_fusions_and_unknown_name():
    names = gemma4_passes.available_fusions()
    assert names == ["kv_shared_dead_kv", "moe_input_norms", "post_attn_norm", "moe_branch_combine", "ffn_tail",
                     "ple_tail", "ple_gate", "qkv_norm", "moe_router", "moe_dispatch", "allreduce_norm"]
    with pytest.raises(ValueError) as e:
        gemma4_passes.enable(fusions=["post_attn_norm", "no_such_fusion"])
    assert "no_such_fusion" in str(e.value) and "qkv_norm" in str(e.value)
    assert inductor_config.post_grad_custom_pre_pass is None  # nothing installed on error


def test_default_set_and_all():
    # ple_gate does not beat Inductor (benchmarks/RESULTS.md): available by name, off by default
    off = ("ple_gate",)  # measured no faster than Inductor
    assert gemma4_passes.default_fusions() == [n for n in gemma4_passes.available_fusions() if n not in off]
    assert gemma4_passes.build_pass().fusions == tuple(gemma4_passes.default_fusions())
    assert gemma4_passes.build_pass("all").fusions == tuple(gemma4_passes.available_fusions())
    assert gemma4_passes.build_pass(["ple_gate"]).fusions == ("ple_gate",)


def test_selection_keeps_run_order():
    p = gemma4_passes.build_pass(["qkv_norm", "post_attn_norm"])
    assert p.fusions == ("post_attn_norm", "qkv_norm")
    assert [x.name for x in p.passes] == ["post_attn_norm", "qkv_norm"]


def test_enable_chains_and_disable_restores():
    calls = []

    def other_pass(graph):
        calls.append(graph)

    inductor_config.post_grad_custom_pre_pass = other_pass
    p = gemma4_passes.enable()
    assert inductor_config.post_grad_custom_pre_pass is p and p.chained is other_pass
    # enabling again replaces ours, still chaining the other package's pass (no double chain)
    p2 = gemma4_passes.enable(["ffn_tail"])
    assert p2.chained is other_pass and p2.fusions == ("ffn_tail",)
    p2(torch.fx.Graph())
    assert len(calls) == 1
    gemma4_passes.disable()
    assert inductor_config.post_grad_custom_pre_pass is other_pass


def test_enabled_context_restores_on_exception():
    sentinel = object()
    inductor_config.post_grad_custom_pre_pass = sentinel
    with pytest.raises(KeyError):
        with gemma4_passes.enabled(["qkv_norm"]) as p:
            assert inductor_config.post_grad_custom_pre_pass is p
            raise KeyError("boom")
    assert inductor_config.post_grad_custom_pre_pass is sentinel


def test_uuid_covers_selection_versions_sources_and_chain(monkeypatch):
    base = gemma4_passes.build_pass().uuid()
    assert base == gemma4_passes.build_pass().uuid()
    assert base != gemma4_passes.build_pass(["qkv_norm"]).uuid()
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert base != gemma4_passes.build_pass().uuid()
    monkeypatch.undo()
    manager.source_hash()
    monkeypatch.setattr(manager, "_SOURCE_HASH", "different-sources")
    assert base != gemma4_passes.build_pass().uuid()
    monkeypatch.undo()
    assert base == gemma4_passes.build_pass().uuid()
    monkeypatch.setenv("GEMMA4_PASSES_ONESHOT_AR", "0")  # changes what allreduce_norm emits
    assert base != gemma4_passes.build_pass().uuid()
    monkeypatch.undo()
    # a chained plain function has no cache key: our uuid must not claim one
    assert gemma4_passes.build_pass(chained=lambda g: None).uuid() is None


def test_source_hash_includes_kernels():
    manager._SOURCE_HASH = None
    files = sorted(p.name for p in manager._PACKAGE_DIR.rglob("*.py"))
    assert "norm_residual.py" in files and "qkv_norm_rope.py" in files
    assert len(manager.source_hash()) == 64


def test_unsupported_torch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.1")
    with pytest.raises(gemma4_passes.UnsupportedTorchError, match="torch >= 2.11"):
        gemma4_passes.enable()
    with pytest.raises(gemma4_passes.UnsupportedTorchError):
        gemma4_passes.build_pass()


def test_match_report_lists_every_fusion_and_resets():
    gemma4_passes.reset_match_report()
    rep = gemma4_passes.match_report()
    assert rep == {name: 0 for name in gemma4_passes.available_fusions()}


def test_failing_fusion_leaves_graph_and_logs(monkeypatch, caplog):
    monkeypatch.delenv("GEMMA4_PASSES_STRICT", raising=False)
    p = gemma4_passes.build_pass(["post_attn_norm"])

    def boom(graph):
        raise RuntimeError("matcher bug")

    monkeypatch.setattr(p.passes[0], "find", boom)
    g = torch.fx.Graph()
    with caplog.at_level("WARNING", logger="gemma4_passes"):
        p(g)
    assert "post_attn_norm failed" in caplog.text
    monkeypatch.setenv("GEMMA4_PASSES_STRICT", "1")
    strict = gemma4_passes.build_pass(["post_attn_norm"])
    monkeypatch.setattr(strict.passes[0], "find", boom)
    with pytest.raises(RuntimeError, match="matcher bug"):
        strict(g)


def test_compat_version_parse():
    assert compat.torch_version() >= (2, 11)

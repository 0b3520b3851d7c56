"""The SGLang plugin against the real sglang package (0.5.23).

Needs sglang importable (``pip install --no-deps sglang==0.5.23`` plus the light
packages in .ci/requirements-sglang.txt) and gemma4-passes pip-installed
(``pip install -e . --no-deps``) so that its ``sglang.srt.plugins`` entry point
is visible. SGLang's plugin loader and hook registry are process-global (and
patch module attributes), so every scenario runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

try:
    import sglang  # noqa: F401
    import sglang.srt.plugins  # noqa: F401
    import sglang.srt.plugins.hook_registry  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"sglang is not importable ({type(exc).__name__}: {exc}); install it with "
        "`pip install --no-deps sglang==0.5.23` plus .ci/requirements-sglang.txt",
        allow_module_level=True,
    )

from gemma4_passes.integrations import sglang_plugin

ENTRY_POINT = "gemma4_passes"
TARGETS = [sglang_plugin.CONFIG_STEP_TARGET, sglang_plugin.CONFIG_TAIL_TARGET]

# Shared prologue of every subprocess: quiet caches, INFO logs on stderr, a
# helper to print the result as the last stdout line.
PROLOGUE = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
import torch
import torch._inductor.config as inductor_config
inductor_config.force_disable_caches = True
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
OURS = ("gemma4_passes.integrations.sglang_plugin",)
TARGETS = __TARGETS__

def our_hooks(target):
    return [e for e in HookRegistry._hooks.get(target, ()) if getattr(e[1], "__module__", "") in OURS]

def config_step():
    from sglang.srt.compilation import torch_compile_decoration
    torch_compile_decoration.set_torch_compile_config()
    inductor_config.force_disable_caches = True  # the config step turns fx_graph_cache on

def done(**result):
    print(json.dumps(result))
""".replace("__TARGETS__", repr(TARGETS))


def _entry_point_installed() -> bool:
    return any(ep.name == ENTRY_POINT for ep in entry_points(group="sglang.srt.plugins"))


HEAVY = ("sglang.srt.compilation", "sglang.srt.model_executor", "sglang.srt.layers", "sglang.kernels")

needs_entry_point = pytest.mark.skipif(
    not _entry_point_installed(),
    reason="gemma4-passes is not pip-installed: run `pip install -e . --no-deps` so its "
    "sglang.srt.plugins entry point is visible",
)


def run_py(body: str, **env) -> tuple[dict, str]:
    """Run PROLOGUE + body in a fresh interpreter; return (last-line JSON, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMMA4_PASSES", "SGLANG_PLUGINS", "SGLANG_PLATFORM"))}
    full_env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", PROLOGUE + textwrap.dedent(body)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-8000:]}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1]), proc.stderr


@needs_entry_point
def test_load_plugins_discovers_and_applies_hooks():
    result, err = run_py(
        """
        import sys, types
        from gemma4_passes import manager

        # Modules that bound SGLang's functions with `from X import Y` BEFORE the
        # hooks were applied, as sglang's runners do: a GPU runner importing
        # set_torch_compile_config, and the CPU graph runner, whose own
        # set_torch_compile_config ends with monkey_patch_torch_compile().
        from sglang.srt.compilation.torch_compile_decoration import set_torch_compile_config as early_bound
        gpu_runner = types.ModuleType("fake_gpu_runner")
        gpu_runner.set_torch_compile_config = early_bound
        cpu_runner = types.ModuleType("fake_cpu_runner")
        exec(
            "from sglang.srt.utils.patch_torch import monkey_patch_torch_compile\\n"
            "def set_torch_compile_config():\\n"
            "    monkey_patch_torch_compile()\\n",
            cpu_runner.__dict__,
        )
        sys.modules["fake_gpu_runner"] = gpu_runner
        sys.modules["fake_cpu_runner"] = cpu_runner

        load_plugins()
        from sglang.srt.compilation import torch_compile_decoration
        from sglang.srt.utils import patch_torch
        result = dict(
            hooks={t: [(e[0].name, e[1].__name__, e[2].plugin_name if e[2] else None) for e in our_hooks(t)] for t in TARGETS},
            patched=[t for t in TARGETS if t in HookRegistry._patched],
            step_wrapped=hasattr(torch_compile_decoration.set_torch_compile_config, "__wrapped__"),
            tail_wrapped=hasattr(patch_torch.monkey_patch_torch_compile, "__wrapped__"),
            slot_before_config=repr(inductor_config.post_grad_custom_pre_pass),
            cpu_runner_imported="sglang.srt.model_executor.cpu_graph_runner" in sys.modules,
        )
        gpu_runner.set_torch_compile_config()
        result["gpu_runner_installs"] = manager.installed_pass() is not None
        manager.disable()
        cpu_runner.set_torch_compile_config()
        result["cpu_runner_installs"] = manager.installed_pass() is not None
        done(**result)
        """
    )
    for target in TARGETS:
        assert result["hooks"][target] == [["AFTER", sglang_plugin.HOOKS[target].__name__, ENTRY_POINT]], err
    assert sorted(result["patched"]) == sorted(TARGETS), err
    assert result["step_wrapped"] and result["tail_wrapped"]
    # nothing is installed before SGLang's config step runs
    assert result["slot_before_config"] == "None"
    # the CPU runner's copy is covered through the shared tail, without importing it
    assert not result["cpu_runner_imported"]
    assert result["gpu_runner_installs"], err
    assert result["cpu_runner_installs"], err
    assert "Executed general plugin: gemma4_passes" in err


@needs_entry_point
def test_config_step_installs_pass_that_runs_on_compiled_graph():
    result, err = run_py(
        """
        import gemma4_passes
        from gemma4_passes import manager, report
        load_plugins()
        assert inductor_config.post_grad_custom_pre_pass is None
        config_step()
        installed = manager.installed_pass()
        gemma4_passes.reset_match_report()

        def f(x, w):
            xf = x.float()
            y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
            return (y * w.float()).type_as(x) + 1

        with torch.no_grad():
            out = torch.compile(f)(torch.randn(4, 32), torch.randn(32))
        done(
            installed=installed is not None,
            fusions=list(installed.fusions) if installed else None,
            available=gemma4_passes.available_fusions(),
            default=gemma4_passes.default_fusions(),
            graphs_seen=report.graphs_seen(),
            report=gemma4_passes.match_report(),
            coordinate_descent_tuning=inductor_config.coordinate_descent_tuning,
        )
        """
    )
    assert result["installed"], err
    assert result["fusions"] == result["default"]
    # SGLang's own config step really ran (the hook wraps, not replaces, it)
    assert result["coordinate_descent_tuning"] is True
    # our pass ran on the post-grad graph of the compiled function
    assert result["graphs_seen"] >= 1, err
    assert set(result["report"]) == set(result["available"])
    assert err.count("gemma4_passes: installed fusions") == 1, err


@needs_entry_point
def test_existing_user_pass_is_chained_not_overwritten():
    result, err = run_py(
        """
        from gemma4_passes import manager, report
        calls = []
        class UserPass:
            def __call__(self, graph):
                calls.append(len(graph.nodes))
            def uuid(self):
                return "user-pass-v1"
        user = UserPass()
        inductor_config.post_grad_custom_pre_pass = user
        load_plugins()
        config_step()
        config_step()  # SGLang calls its config step more than once per process
        slot = inductor_config.post_grad_custom_pre_pass
        with torch.no_grad():
            torch.compile(lambda x: (x * 2).sum(-1))(torch.randn(8, 8))
        done(
            ours=isinstance(slot, manager.Gemma4PostGradPass),
            chained_is_user=getattr(slot, "chained", None) is user,
            user_calls=len(calls),
            graphs_seen=report.graphs_seen(),
        )
        """
    )
    assert result["ours"] and result["chained_is_user"], err
    assert result["graphs_seen"] >= 1 and result["user_calls"] >= 1, err
    # the user pass ran once per graph: not chained twice by the repeated config step
    assert result["user_calls"] == result["graphs_seen"]


@needs_entry_point
def test_fusion_selection_from_environment():
    result, err = run_py(
        """
        import gemma4_passes
        from gemma4_passes import manager
        load_plugins()
        config_step()
        done(fusions=list(manager.installed_pass().fusions), available=gemma4_passes.available_fusions())
        """,
        GEMMA4_PASSES_FUSIONS="ffn_tail",
    )
    if "ffn_tail" not in result["available"]:
        pytest.skip("fusion ffn_tail is not available in this build")
    assert result["fusions"] == ["ffn_tail"], err


@needs_entry_point
def test_unknown_fusion_fails_registration_and_installs_nothing():
    result, err = run_py(
        """
        load_plugins()
        config_step()
        done(hooks={t: len(our_hooks(t)) for t in TARGETS}, slot=repr(inductor_config.post_grad_custom_pre_pass))
        """,
        GEMMA4_PASSES_FUSIONS="no_such_fusion",
    )
    assert result["hooks"] == {t: 0 for t in TARGETS}
    assert result["slot"] == "None"
    assert "Failed to execute general plugin: gemma4_passes" in err and "no_such_fusion" in err


@needs_entry_point
@pytest.mark.parametrize("value", ["0"])
def test_switched_off_installs_nothing(value):
    result, err = run_py(
        """
        load_plugins()
        config_step()
        done(hooks={t: len(our_hooks(t)) for t in TARGETS}, slot=repr(inductor_config.post_grad_custom_pre_pass))
        """,
        GEMMA4_PASSES=value,
    )
    assert result["hooks"] == {t: 0 for t in TARGETS}
    assert result["slot"] == "None"
    assert err.count(f"GEMMA4_PASSES={value}, SGLang plugin disabled") == 1, err


@needs_entry_point
def test_sglang_plugins_filter_skips_us():
    result, err = run_py(
        """
        load_plugins()
        config_step()
        done(hooks={t: len(our_hooks(t)) for t in TARGETS}, slot=repr(inductor_config.post_grad_custom_pre_pass))
        """,
        SGLANG_PLUGINS="some_other_plugin",
    )
    assert result["hooks"] == {t: 0 for t in TARGETS}
    assert result["slot"] == "None"
    assert "Skipping plugin gemma4_passes (not in SGLANG_PLUGINS)" in err


@needs_entry_point
def test_sglang_plugins_filter_naming_us_loads_us():
    result, _ = run_py(
        """
        load_plugins()
        done(hooks={t: len(our_hooks(t)) for t in TARGETS})
        """,
        SGLANG_PLUGINS="other, gemma4_passes",
    )
    assert result["hooks"] == {t: 1 for t in TARGETS}


@needs_entry_point
def test_register_twice_installs_once():
    result, err = run_py(
        """
        import sys
        from gemma4_passes import manager
        before = set(sys.modules)
        from gemma4_passes.integrations.sglang_plugin import register
        register()
        register()
        # register() alone imports none of SGLang's compile/runtime modules:
        # SGLang imports the hook targets itself when it applies the hooks.
        new = sorted(m for m in set(sys.modules) - before if m.startswith("sglang"))
        load_plugins()  # calls register() a third time, then applies the hooks
        load_plugins()  # no-op in SGLang
        hooks = {t: len(our_hooks(t)) for t in TARGETS}
        config_step()
        config_step()
        slot = inductor_config.post_grad_custom_pre_pass
        done(
            hooks=hooks,
            ours=isinstance(slot, manager.Gemma4PostGradPass),
            chained=repr(slot.chained),
            new=new,
        )
        """
    )
    heavy = [m for m in result["new"] if m.startswith(HEAVY)]
    assert heavy == [], heavy
    assert result["hooks"] == {t: 1 for t in TARGETS}
    assert result["ours"] and result["chained"] == "None"
    assert err.count("gemma4_passes: installed fusions") == 1, err


@needs_entry_point
def test_post_attn_norm_block_is_rewritten():
    """Once the fusion and its kernel exist: a Gemma-style ``residual + rms(x)*w -> rms``
    compiled after SGLang's config step is rewritten, with unchanged results."""
    result, err = run_py(
        """
        import gemma4_passes
        avail = gemma4_passes.available_fusions()
        try:
            from gemma4_passes.kernels import ensure_registered  # noqa: F401
            kernels = True
        except Exception as exc:
            kernels = repr(exc)
        if "post_attn_norm" not in avail or kernels is not True:
            done(skip=f"post_attn_norm available={'post_attn_norm' in avail}, kernels={kernels}")
            raise SystemExit(0)
        load_plugins()
        config_step()
        gemma4_passes.reset_match_report()

        def rms(x, w):
            xf = x.float()
            y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
            return (y * w.float()).type_as(x)

        def block(attn, residual, w1, w2):
            r = residual + rms(attn, w1)
            return rms(r, w2), r

        torch.manual_seed(0)
        H = 64
        args = (torch.randn(8, H), torch.randn(8, H), torch.randn(H), torch.randn(H))
        with torch.no_grad():
            ref = block(*args)
            out = torch.compile(block)(*args)
        err_max = max((a - b).abs().max().item() for a, b in zip(ref, out))
        done(report=gemma4_passes.match_report(), err_max=err_max)
        """
    )
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["report"]["post_attn_norm"] >= 1, err
    assert result["err_max"] < 1e-4, result


@pytest.mark.parametrize(
    "value, off", [("0", True), ("off", True), ("False", True), (" no ", True), ("1", False), ("", False)]
)
def test_switch_values(monkeypatch, value, off):
    monkeypatch.setenv("GEMMA4_PASSES", value)
    assert sglang_plugin._switched_off() is off

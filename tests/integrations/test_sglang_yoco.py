"""YOCO's SGLang hook (``gemma4_passes.integrations.sglang_yoco``) against the real sglang 0.5.23.

SGLang's Gemma-4 model module does not import on a CPU machine (CUDA-only kernels), so:

* every fact the hook relies on is read from sglang's own source files (AST / text, no import):
  the hook target, ``Gemma4TextModel.forward``'s pipeline-stage branches, the ``ForwardBatch``
  fields, ``ForwardMode`` members, the logits processor's last-token rows, the attention backend
  entry points, the graph-scope flags;
* the core transformation runs the REAL ``Gemma4TextModel.forward`` (its source, compiled here)
  on stand-in layers, embeddings and a stand-in attention backend with a paged KV pool (extend and
  decode metadata, sliding windows, owner / KV-shared layers), with SGLang's real ``ForwardMode``,
  ``CaptureHiddenMode`` and ``PPProxyTensors`` classes;
* registration goes through sglang's real ``load_plugins`` / ``HookRegistry`` in a subprocess.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from enum import IntEnum, auto
from functools import total_ordering
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import pytest
import torch

spec = importlib.util.find_spec("sglang")
if spec is None or not spec.submodule_search_locations:  # pragma: no cover - environment
    pytest.skip("sglang is not installed (pip install --no-deps sglang==0.5.23)", allow_module_level=True)

from gemma4_passes.integrations import sglang_plugin, sglang_yoco  # noqa: E402

SRT = Path(list(spec.submodule_search_locations)[0]) / "srt"


def _src(rel: str) -> str:
    return (SRT / rel).read_text()


def _class(rel: str, name: str) -> ast.ClassDef:
    for node in ast.walk(ast.parse(_src(rel))):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"no class {name} in {rel}")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"no method {cls.name}.{name}")


def _exec_source(rel: str, node: ast.AST, namespace: dict) -> Any:
    code = textwrap.dedent(ast.get_source_segment(_src(rel), node))
    exec(compile(code, f"<sglang {rel}:{node.lineno}>", "exec"), namespace)
    return namespace[node.name]


MODEL_FILE = "models/gemma4_causal.py"
FBI_FILE = "model_executor/forward_batch_info.py"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for k in [k for k in os.environ if k.startswith("GEMMA4_PASSES")]:
        monkeypatch.delenv(k)
    sglang_yoco._logged.clear()


# ------------------------------------------------------------------------------------------------
# 1. what the hook relies on, read from sglang's source
# ------------------------------------------------------------------------------------------------
def test_hook_target_exists_with_the_expected_signature():
    module, cls_name, meth = sglang_yoco.TARGET.rsplit(".", 2)
    assert module == "sglang.srt.models.gemma4_causal"
    fn = _method(_class(MODEL_FILE, cls_name), meth)
    args = [a.arg for a in fn.args.args]
    assert args == ["self", "input_ids", "positions", "forward_batch", "input_embeds", "per_layer_inputs",
                    "pp_proxy_tensors"]
    assert fn.args.kwarg is not None and fn.args.kwarg.arg == "kwargs"
    assert fn.lineno == 1024  # the docstring's file:line


def test_forward_has_the_pipeline_stage_branches_the_hook_uses():
    fn = _method(_class(MODEL_FILE, "Gemma4TextModel"), "forward")
    code = ast.get_source_segment(_src(MODEL_FILE), fn)
    for needle in (
        "if self.pp_group.is_first_rank:",
        "self.layers[self.start_layer].attn_boundary.from_pp(",
        'pp_proxy_tensors.tensors.get("per_layer_inputs", None)',
        "for layer_idx in range(self.start_layer, self.end_layer):",
        "per_layer_inputs[:, layer_idx, :]",
        "if not self.pp_group.is_last_rank:",
        'proxy["per_layer_inputs"] = per_layer_inputs',
        "return PPProxyTensors(proxy)",
        "residual_batch.final_norm(",
    ):
        assert needle in code, needle
    lines = _src(MODEL_FILE).splitlines()
    assert "save_kv_cache=not self.is_kv_shared_layer" in lines[540 - 1]
    assert "self.kv_shared_layer_index if self.is_kv_shared_layer" in lines[433 - 1]


def test_forward_batch_fields_and_modes_exist():
    cls = _class(FBI_FILE, "ForwardBatch")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    missing = [f for f in sglang_yoco.BATCH_FIELDS + ("residual_stream",) if f not in fields]
    assert not missing, missing
    modes = {n.targets[0].id for n in _class(FBI_FILE, "ForwardMode").body if isinstance(n, ast.Assign)}
    assert {"EXTEND", "DECODE", "IDLE", "MIXED", "TARGET_VERIFY", "DRAFT_EXTEND_V2", "PREBUILT",
            "SPLIT_PREFILL", "DLLM_EXTEND"} <= modes
    _method(_class("speculative/spec_info.py", "SpeculativeAlgorithm"), "is_none")
    _method(_class(FBI_FILE, "CaptureHiddenMode"), "is_full")


def test_logits_processor_reads_the_last_token_rows():
    src = _src("layers/logits_processor.py")
    lines = src.splitlines()
    assert "last_index = torch.cumsum(logits_metadata.extend_seq_lens, dim=0) - 1" in lines[722 - 1]
    assert "pruned_states = hidden_states[last_index]" in lines[723 - 1]
    # input logprobs: return_logprob and some extend_len - start_len > 0 (what the guard mirrors)
    body = ast.get_source_segment(src, _method(_class("layers/logits_processor.py", "LogitsMetadata"),
                                                "from_forward_batch"))
    assert "if extend_len - start_len > 0:" in body and "forward_batch.return_logprob" in body


def test_attention_backend_entry_points_and_graph_flags_exist():
    src = _src("model_executor/forward_context.py")
    assert "def get_attn_backend() -> AttentionBackend:" in src.splitlines()[73 - 1]
    base = _class("layers/attention/base_attn_backend.py", "AttentionBackend")
    _method(base, "init_forward_metadata")
    fwd = ast.get_source_segment(_src("layers/attention/base_attn_backend.py"), _method(base, "forward"))
    assert "elif forward_batch.forward_mode.is_decode():" in fwd and "self.forward_decode(" in fwd
    for module, fn in sglang_yoco._GRAPH_SCOPE_CHECKS + (sglang_yoco._LAYERNORM_SP,):
        rel = module.removeprefix("sglang.srt.").replace(".", "/") + ".py"
        assert f"def {fn}(" in _src(rel), (module, fn)
    runner = _src("model_executor/runner/prefill_cuda_graph_runner.py")
    assert "self.layer_model = _resolve_transformer_layer_model(" in runner.splitlines()[676 - 1]


# ------------------------------------------------------------------------------------------------
# 2. the real Gemma4TextModel.forward on stand-in layers and a stand-in attention backend
# ------------------------------------------------------------------------------------------------
def _sglang_classes():
    ns: dict = dict(IntEnum=IntEnum, auto=auto, total_ordering=total_ordering, Dict=Dict, Union=Union,
                    torch=torch)
    fbi = {name: _exec_source(FBI_FILE, _class(FBI_FILE, name), ns)
           for name in ("ForwardMode", "CaptureHiddenMode", "PPProxyTensors")}
    return fbi


SG = _sglang_classes()
ForwardMode, CaptureHiddenMode, PPProxyTensors = SG["ForwardMode"], SG["CaptureHiddenMode"], SG["PPProxyTensors"]


class _AuxList(list):
    def capture(self, hidden, *, owned=False):
        self.append(hidden if owned else hidden.clone())


class _ResidualBatch:
    """Stand-in for ``layer_boundary.residual.batch``: the stream is the hidden state itself."""

    @staticmethod
    def start(fb):
        fb.residual_stream = "started"

    @staticmethod
    def to_pp(hidden, fb):
        assert fb.residual_stream == "started"
        fb.residual_stream = None
        return PPProxyTensors({"hidden_states": hidden})

    @staticmethod
    def final_norm(hidden, fb, norm):
        assert fb.residual_stream == "started"
        fb.residual_stream = None
        return norm(hidden)


def _real_forward():
    ns = dict(torch=torch, Optional=Optional, Union=Union, Tuple=Tuple, List=List, ForwardBatch=object,
              PPProxyTensors=PPProxyTensors, residual_batch=_ResidualBatch, AuxHiddenStateList=_AuxList)
    return _exec_source(MODEL_FILE, _method(_class(MODEL_FILE, "Gemma4TextModel"), "forward"), ns)


@dataclasses.dataclass
class FakeBatch:
    """The ForwardBatch fields the hook and the stand-ins read (names checked against sglang above)."""

    forward_mode: Any
    batch_size: int
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor
    seq_lens: torch.Tensor
    extend_seq_lens: torch.Tensor
    extend_seq_lens_cpu: list
    req_pool_indices: torch.Tensor
    extend_logprob_start_lens_cpu: Optional[list] = None
    return_logprob: bool = False
    spec_info: Any = None
    spec_algorithm: Any = None
    capture_hidden_mode: Any = CaptureHiddenMode.NULL
    return_hidden_states_before_norm: bool = False
    token_indices_to_pool: Any = None
    multi_item_delimiter_indices: Any = None
    is_prefill_only: bool = False
    global_num_tokens_cpu: Any = None
    tbo_split_seq_index: Any = None
    tbo_children: Any = None
    attn_tp_sequence_sharded: bool = False
    attn_cp_metadata: Any = None
    attn_dcp_metadata: Any = None
    lora_ids: Any = None
    residual_stream: Any = None


class FakeBackend:
    """A paged KV pool and the extend / decode attention of SGLang's backends, in plain torch.

    ``init_forward_metadata`` plans the queries of a batch: EXTEND, one per new token at positions
    prefix..seq_len-1; DECODE, one per request at seq_len-1. ``forward`` refuses a batch it did not
    plan, writes K/V at ``out_cache_loc`` when asked, and attends each query over its request's
    slots (causal, within the layer's sliding window).
    """

    def __init__(self, layers: int, slots: int, dim: int, req_to_token: torch.Tensor):
        self.k = torch.zeros(layers, slots, dim, dtype=torch.float64)
        self.v = torch.zeros(layers, slots, dim, dtype=torch.float64)
        self.req_to_token = req_to_token
        self.planned = None
        self.fail_decode = False

    def init_forward_metadata(self, fb):
        if fb.forward_mode == ForwardMode.DECODE:
            if self.fail_decode:
                raise RuntimeError("decode planning failed")
            self.queries = [(r, int(fb.seq_lens[r]) - 1) for r in range(fb.batch_size)]
        else:
            assert fb.forward_mode == ForwardMode.EXTEND
            self.queries = []
            for r in range(fb.batch_size):
                n, total = int(fb.extend_seq_lens[r]), int(fb.seq_lens[r])
                self.queries += [(r, p) for p in range(total - n, total)]
        self.planned = fb

    def forward(self, q, k, v, layer, fb, save_kv_cache=True):
        assert fb is self.planned, "attention called with a batch whose metadata was not planned"
        assert q.shape[0] == len(self.queries)
        if k is not None and save_kv_cache:
            self.k[layer.layer_id, fb.out_cache_loc] = k
            self.v[layer.layer_id, fb.out_cache_loc] = v
        out = []
        for i, (r, p) in enumerate(self.queries):
            lo = max(0, p - layer.sliding_window + 1) if layer.sliding_window > 0 else 0
            slots = self.req_to_token[fb.req_pool_indices[r], lo : p + 1]
            kk, vv = self.k[layer.layer_id, slots], self.v[layer.layer_id, slots]
            w = torch.softmax(kk @ q[i] / q.shape[-1] ** 0.5, dim=0)
            out.append(w @ vv)
        return torch.stack(out)


class FakeLayer(torch.nn.Module):
    """A decoder layer with the call signature of ``Gemma4DecoderLayer.forward``: RoPE-like position
    term, attention through the backend (owner layers write K/V; KV-shared ones read their owner's,
    as SGLang's RadixAttention does with ``layer_id = kv_shared_layer_index``), MLP, PLE."""

    def __init__(self, idx: int, owner: int, shared: bool, window: int, dim: int, ple: int, backend):
        super().__init__()
        g = torch.Generator().manual_seed(100 + idx)
        w = lambda o, i: torch.nn.Parameter(torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5)  # noqa: E731
        self.wq, self.wk, self.wv, self.wo = w(dim, dim), w(dim, dim), w(dim, dim), w(dim, dim)
        self.w1, self.w2, self.wp = w(2 * dim, dim), w(dim, 2 * dim), w(dim, ple)
        self.layer_id, self.is_shared, self.sliding_window = owner, shared, window
        self.backend = backend
        self.attn_boundary = types.SimpleNamespace(from_pp=self._from_pp)

    @staticmethod
    def _from_pp(proxy, fb):
        # like stage.from_pp: a new residual stream on the receiving batch
        fb.residual_stream = "started"
        return proxy["hidden_states"]

    def forward(self, positions, hidden_states, per_layer_input, forward_batch, capture_output=None, **kw):
        h = hidden_states
        rope = torch.sin(positions.double()[:, None] * torch.arange(1, h.shape[1] + 1, dtype=torch.float64) / 7)
        q = h @ self.wq.T + rope
        k, v = (None, None) if self.is_shared else (h @ self.wk.T + rope, h @ self.wv.T)
        a = self.backend.forward(q, k, v, self, forward_batch, save_kv_cache=not self.is_shared)
        h = h + a @ self.wo.T
        h = h + torch.tanh(h @ self.w1.T) @ self.w2.T + per_layer_input @ self.wp.T
        return h


class FakeGemma4TextModel(torch.nn.Module):
    forward = _real_forward()

    def __init__(self, backend, layers=6, shared=3, dim=8, ple=3, vocab=50, window=4):
        super().__init__()
        types_ = ["sliding", "sliding", "full", "sliding", "sliding", "full"][:layers]
        first = layers - shared
        owners = {t: max(i for i in range(first) if types_[i] == t) for t in set(types_)}
        self.config = types.SimpleNamespace(num_hidden_layers=layers, num_kv_shared_layers=shared)
        self.pp_group = types.SimpleNamespace(is_first_rank=True, is_last_rank=True, world_size=1)
        self.start_layer, self.end_layer = 0, layers
        self.layers_to_capture = []
        g = torch.Generator().manual_seed(0)
        self.embed = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.ple = torch.randn(vocab, layers * ple, generator=g, dtype=torch.float64)
        self.ple_proj = torch.randn(dim, layers * ple, generator=g, dtype=torch.float64) / dim
        self.nl, self.np = layers, ple
        self.layers = torch.nn.ModuleList(
            FakeLayer(i, owners[t] if i >= first else i, i >= first, window if t == "sliding" else 0, dim, ple, backend)
            for i, t in enumerate(types_)
        )

    def embed_tokens(self, ids):
        return self.embed[ids]

    def get_per_layer_inputs(self, ids):
        return self.ple[ids].view(ids.shape[0], self.nl, self.np)

    def project_per_layer_inputs(self, embeds, ple):
        return ple + (embeds @ self.ple_proj).view(embeds.shape[0], self.nl, self.np)

    def norm(self, h):
        return h / h.norm(dim=-1, keepdim=True)


PREFIX = [0, 4, 2]
EXTEND = [7, 1, 5]


def _world():
    """A model, its backend, and an EXTEND batch of 3 requests whose prefixes are already cached."""
    total = [p + e for p, e in zip(PREFIX, EXTEND)]
    req_to_token = torch.zeros(3, max(total), dtype=torch.long)
    slot = 1
    for r, n in enumerate(total):
        req_to_token[r, :n] = torch.arange(slot, slot + n)
        slot += n
    backend = FakeBackend(6, slot, 8, req_to_token)
    model = FakeGemma4TextModel(backend)
    g = torch.Generator().manual_seed(9)
    tokens = [torch.randint(0, 50, (n,), generator=g) for n in total]

    def batch(lens_from, lens_to, reqs):
        ids = torch.cat([tokens[r][lens_from[r] : lens_to[r]] for r in reqs])
        pos = torch.cat([torch.arange(lens_from[r], lens_to[r]) for r in reqs])
        loc = torch.cat([req_to_token[r, lens_from[r] : lens_to[r]] for r in reqs])
        ext = [lens_to[r] - lens_from[r] for r in reqs]
        return FakeBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=len(reqs), input_ids=ids, positions=pos,
            out_cache_loc=loc, seq_lens=torch.tensor([lens_to[r] for r in reqs]),
            extend_seq_lens=torch.tensor(ext), extend_seq_lens_cpu=ext, req_pool_indices=torch.tensor(reqs),
        )  # fmt: skip

    # cache the prefixes (requests 1 and 2) with an ordinary full forward
    pre = batch([0, 0, 0], PREFIX, [1, 2])
    backend.init_forward_metadata(pre)
    model(pre.input_ids, pre.positions, pre)
    main = batch(PREFIX, total, [0, 1, 2])
    return model, backend, main


def _run(model, backend, fb, hook: bool, monkeypatch):
    monkeypatch.setattr(sglang_yoco, "attention_backend", lambda: backend)
    backend.init_forward_metadata(fb)  # the runner plans the batch before the model runs
    original = type(model).forward
    with torch.no_grad():
        if hook:
            return sglang_yoco.yoco_text_model_forward(original, model, fb.input_ids, fb.positions, fb, None, None,
                                                       pp_proxy_tensors=None)
        return original(model, fb.input_ids, fb.positions, fb, None, None, pp_proxy_tensors=None)


def test_real_forward_with_yoco_gives_the_full_runs_last_token_rows_and_kv(monkeypatch):
    model, backend, fb = _world()
    k0, v0 = backend.k.clone(), backend.v.clone()
    full = _run(model, backend, fb, False, monkeypatch)
    k_full, v_full = backend.k.clone(), backend.v.clone()
    backend.k.copy_(k0), backend.v.copy_(v0)

    saved = (model.pp_group, model.start_layer, model.end_layer)
    mode, positions = fb.forward_mode, fb.positions
    fast = _run(model, backend, fb, True, monkeypatch)

    last = torch.cumsum(fb.extend_seq_lens, 0) - 1  # what LogitsProcessor reads
    assert fast.shape == full.shape == (sum(EXTEND), 8)
    assert torch.allclose(fast[last], full[last], rtol=0, atol=1e-12)
    others = torch.ones(sum(EXTEND), dtype=torch.bool)
    others[last] = False
    assert torch.equal(fast[others], torch.zeros_like(fast[others]))
    # the owner layers wrote the full run's KV; nothing else was written
    assert torch.equal(backend.k, k_full) and torch.equal(backend.v, v_full)
    # the shared layers were planned as a DECODE batch of one query per request
    assert backend.planned is not fb and backend.planned.forward_mode == ForwardMode.DECODE
    assert backend.planned.positions.tolist() == fb.positions[last].tolist()
    # the model and the caller's batch are as they were
    assert (model.pp_group, model.start_layer, model.end_layer) == saved
    assert fb.forward_mode is mode and fb.positions is positions


def test_decode_replan_failure_falls_back_to_every_row(monkeypatch, caplog):
    model, backend, fb = _world()
    full = _run(model, backend, fb, False, monkeypatch)
    backend.fail_decode = True
    with caplog.at_level(logging.INFO, logger="gemma4_passes.sglang.yoco"):
        fast = _run(model, backend, fb, True, monkeypatch)
    assert torch.allclose(fast, full, rtol=0, atol=1e-12)  # every row: the full run
    assert any("replan_failed" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


# ------------------------------------------------------------------------------------------------
# 3. guards: the original forward, untouched, one log line per reason
# ------------------------------------------------------------------------------------------------
class _NotNone:
    def is_none(self):
        return False


GUARDS = [
    ("env", lambda m, fb, mp: mp.setenv("GEMMA4_PASSES_YOCO", "0"), "GEMMA4_PASSES_YOCO"),
    ("verify", lambda m, fb, mp: setattr(fb, "forward_mode", ForwardMode.TARGET_VERIFY), "speculative"),
    ("draft_extend", lambda m, fb, mp: setattr(fb, "forward_mode", ForwardMode.DRAFT_EXTEND_V2), "speculative"),
    ("mixed", lambda m, fb, mp: setattr(fb, "forward_mode", ForwardMode.MIXED), "MIXED"),
    ("spec_info", lambda m, fb, mp: setattr(fb, "spec_info", object()), "speculative"),
    ("spec_algorithm", lambda m, fb, mp: setattr(fb, "spec_algorithm", _NotNone()), "speculative"),
    ("input_logprobs", lambda m, fb, mp: (setattr(fb, "return_logprob", True),
                                          setattr(fb, "extend_logprob_start_lens_cpu", [0, 1, 5])), "logprobs"),
    ("capture_full", lambda m, fb, mp: setattr(fb, "capture_hidden_mode", CaptureHiddenMode.FULL), "hidden"),
    ("aux_layers", lambda m, fb, mp: setattr(m, "layers_to_capture", [2]), "hidden"),
    ("before_norm", lambda m, fb, mp: setattr(fb, "return_hidden_states_before_norm", True), "hidden"),
    ("scoring", lambda m, fb, mp: setattr(fb, "token_indices_to_pool", [torch.tensor([0])]), "scoring"),
    ("prefill_only", lambda m, fb, mp: setattr(fb, "is_prefill_only", True), "scoring"),
    ("dp_attention", lambda m, fb, mp: setattr(fb, "global_num_tokens_cpu", [13, 13]), "DP attention"),
    ("tbo", lambda m, fb, mp: setattr(fb, "tbo_split_seq_index", 1), "two-batch"),
    ("seq_parallel", lambda m, fb, mp: setattr(fb, "attn_tp_sequence_sharded", True), "context-parallel"),
    ("context_parallel", lambda m, fb, mp: setattr(fb, "attn_cp_metadata", object()), "context-parallel"),
    ("lora", lambda m, fb, mp: setattr(fb, "lora_ids", ["adapter", None, None]), "LoRA"),
    ("pp_world", lambda m, fb, mp: setattr(m.pp_group, "world_size", 2), "pipeline"),
    ("pp_range", lambda m, fb, mp: setattr(m, "end_layer", 4), "pipeline"),
    ("no_shared", lambda m, fb, mp: setattr(m.config, "num_kv_shared_layers", 0), "no KV-shared"),
    ("prefill_graph", lambda m, fb, mp: mp.setitem(
        sys.modules, "sglang.srt.model_executor.runner_utils.prefill_graph",
        types.SimpleNamespace(is_in_prefill_graph_scope=lambda: True)), "prefill CUDA-graph"),
    ("breakable_graph", lambda m, fb, mp: mp.setitem(
        sys.modules, "sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context",
        types.SimpleNamespace(is_in_breakable_cuda_graph=lambda: True)), "prefill CUDA-graph"),
    ("layernorm_sp", lambda m, fb, mp: mp.setitem(
        sys.modules, "sglang.srt.layers.layernorm_sp", types.SimpleNamespace(layernorm_sp_enabled=lambda: True)),
     "LayerNorm"),
]


@pytest.mark.parametrize("name,setup,word", GUARDS, ids=[g[0] for g in GUARDS])
def test_guard_calls_the_original_forward_once_and_logs_once(monkeypatch, caplog, name, setup, word):
    model, _, fb = _world()
    setup(model, fb, monkeypatch)
    calls = []

    def original(*args, **kwargs):
        calls.append((args, kwargs))
        return "original result"

    with caplog.at_level(logging.INFO, logger="gemma4_passes.sglang.yoco"):
        for _ in range(2):
            out = sglang_yoco.yoco_text_model_forward(original, model, fb.input_ids, fb.positions, fb, None, None,
                                                      pp_proxy_tensors=None)
            assert out == "original result"
    assert len(calls) == 2
    args, kwargs = calls[0]
    assert args[0] is model and args[1] is fb.input_ids and args[2] is fb.positions and args[3] is fb
    assert kwargs == {"pp_proxy_tensors": None}
    lines = [r.getMessage() for r in caplog.records if r.name == "gemma4_passes.sglang.yoco"]
    assert len(lines) == 1 and word in lines[0], lines


def test_output_only_logprobs_keep_yoco_on(monkeypatch):
    model, _, fb = _world()
    fb.return_logprob, fb.extend_logprob_start_lens_cpu = True, list(EXTEND)  # no input-token logprobs
    assert sglang_yoco.fallback_reason(model, fb) is None


def test_decode_and_single_token_extends_pass_through_silently(monkeypatch, caplog):
    model, _, fb = _world()
    one = dataclasses.replace(fb, extend_seq_lens=torch.ones(3, dtype=torch.long), extend_seq_lens_cpu=[1, 1, 1])
    dec = dataclasses.replace(fb, forward_mode=ForwardMode.DECODE)
    with caplog.at_level(logging.INFO, logger="gemma4_passes.sglang.yoco"):
        assert sglang_yoco.fallback_reason(model, dec) == "decode"
        assert sglang_yoco.fallback_reason(model, one) == "nothing_to_prune"
        sglang_yoco.yoco_text_model_forward(lambda *a, **k: None, model, None, fb.positions, dec)
    assert not [r for r in caplog.records if r.name == "gemma4_passes.sglang.yoco"]
    assert sglang_yoco.fallback_reason(model, fb, pp_proxy_tensors=PPProxyTensors({})).startswith("pipeline")


# ------------------------------------------------------------------------------------------------
# 4. registration through sglang's plugin machinery
# ------------------------------------------------------------------------------------------------
def test_feature_module_is_listed_and_env_decides(monkeypatch):
    assert "sglang_yoco" in sglang_plugin.FEATURE_MODULES
    entry = (sglang_yoco.TARGET, sglang_yoco.yoco_text_model_forward, "AROUND")
    monkeypatch.setenv("GEMMA4_PASSES_YOCO", "1")
    assert entry in sglang_plugin.all_hooks()
    monkeypatch.setenv("GEMMA4_PASSES_YOCO", "0")
    assert entry not in sglang_plugin.all_hooks()
    monkeypatch.delenv("GEMMA4_PASSES_YOCO")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sglang_yoco.SGLANG_HOOKS == []  # CPU: sglang's Gemma-4 module cannot be resolved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sglang_yoco.SGLANG_HOOKS == [entry]


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "gemma4_passes" for ep in entry_points(group="sglang.srt.plugins"))


SUBPROCESS = r"""
import json, sys, types
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry, HookType
from gemma4_passes.integrations import sglang_yoco

# 1. load_plugins() registers the AROUND hook on the real target (applying is skipped: resolving the
#    target imports sglang's CUDA-only Gemma-4 module).
HookRegistry.apply_hooks = classmethod(lambda cls: None)
load_plugins()
ours = [(e[0].name, e[1].__name__, e[2].plugin_name if e[2] else None)
        for e in HookRegistry._hooks.get(sglang_yoco.TARGET, ())]

# 2. HookRegistry's real AROUND wrapper calls the hook as hook(original, self, ...): apply it to a
#    stand-in class at a stand-in path and call through it.
mod = types.ModuleType("fake_gemma4_causal")
class Model:
    def forward(self, input_ids, positions, forward_batch, input_embeds=None, per_layer_inputs=None,
                pp_proxy_tensors=None, **kwargs):
        return ("original", forward_batch)
mod.Model = Model
sys.modules["fake_gemma4_causal"] = mod
HookRegistry.register("fake_gemma4_causal.Model.forward", sglang_yoco.yoco_text_model_forward, HookType.AROUND)
del HookRegistry.apply_hooks
HookRegistry._apply_target("fake_gemma4_causal.Model.forward", HookRegistry._hooks["fake_gemma4_causal.Model.forward"])
seen = []
real_reason = sglang_yoco.fallback_reason
sglang_yoco.fallback_reason = lambda model, fb, pp=None: seen.append((type(model).__name__, fb)) or "decode"
out = Model().forward(None, None, "batch")
print(json.dumps(dict(ours=ours, out=list(out), seen=seen,
                      wrapped=hasattr(Model.forward, "__wrapped__"))))
"""


@pytest.mark.skipif(not _entry_point_installed(), reason="gemma4-passes is not pip-installed (pip install -e . --no-deps)")
def test_load_plugins_registers_the_around_hook_and_hook_registry_calls_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMMA4_PASSES", "SGLANG_PLUGINS"))}
    env["GEMMA4_PASSES_YOCO"] = "1"
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ours"] == [["AROUND", "yoco_text_model_forward", "gemma4_passes"]]
    assert result["wrapped"] and result["out"] == ["original", "batch"]
    assert result["seen"] == [["Model", "batch"]]

"""Helpers shared by the GPU checks and benchmarks in ``benchmarks/``.

Everything here works on a CPU too (the ``--smoke`` paths): on CUDA, timing uses CUDA-graph replay
timed with CUDA events (median of several repeats); on CPU it falls back to ``time.perf_counter``
and the CUDA-only parts (graphs, profiler kernel counts, copy bandwidth) return ``None``.

The scripts are run from the repository root as ``PYTHONPATH=. python benchmarks/<script>.py``;
importing this module also puts the repository root on ``sys.path`` so that running them without
``PYTHONPATH`` works too.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

# ------------------------------------------------------------------------------------------------
# arguments, device, seeds, output
# ------------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few iterations (runs on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (every check/case derives its own)")
    parser.add_argument(
        "--out",
        default=None,
        help="directory for the JSON results (default: $OUT if set, else no JSON file)",
    )
    parser.add_argument("--json", default=None, help="explicit path of the JSON result file")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def sync(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def json_path(args: argparse.Namespace, default_name: str) -> Path | None:
    """Where to write the JSON: ``--json``, else ``--out``/$OUT + default name, else None."""
    if getattr(args, "json", None):
        return Path(args.json)
    out = getattr(args, "out", None) or os.environ.get("OUT")
    if out:
        return Path(out) / default_name
    return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    return obj


def write_json(path: Path | None, data: Any) -> None:
    """Write ``data`` atomically (a partial run keeps the last complete file)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1, sort_keys=False))
    os.replace(tmp, path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001 - no git on the machine is fine
        pass
    return None


def env_info(device: torch.device) -> dict:
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "git": git_commit(),
        "device": str(device),
    }
    for mod in ("triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    if is_cuda(device):
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            gpu_mem_gib=round(p.total_memory / 2**30, 1),
            l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        )
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def print_env(info: dict) -> None:
    keys = ("date_utc", "git", "torch", "cuda_runtime", "triton", "transformers", "gpu", "capability", "sms",
            "l2_mib", "gpu_mem_gib", "cpu", "threads")
    print("# " + "  ".join(f"{k}={info[k]}" for k in keys if k in info and info[k] is not None), flush=True)


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; ``None`` limit means unlimited."""

    def __init__(self, limit_s: float | None):
        self.start = time.perf_counter()
        self.limit = limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def allows(self, cost_s: float) -> bool:
        return self.left() >= cost_s


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    us: float  # median microseconds per call
    spread: float  # (max - min) / median over the repeats
    method: str  # "cuda-graph", "cuda-events" (no graph), "cpu"
    iters: int  # timed replays (or calls) per repeat
    repeats: int
    calls_per_iter: int = 1
    note: str = ""


def capture_graph(fn: Callable[[], Any], warmup: int = 2):
    """Warm ``fn`` up on a side stream, then capture one call into a CUDA graph.

    Returns ``(graph, outputs)``: ``outputs`` are the tensors the captured call produced; every
    replay rewrites them in place.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def _pick_iters(one_call_s: float, target_s: float, lo: int, hi: int) -> int:
    if one_call_s <= 0:
        return hi
    return int(max(lo, min(hi, math.ceil(target_s / one_call_s))))


def time_graph(
    graph: "torch.cuda.CUDAGraph",
    *,
    calls_per_replay: int = 1,
    repeats: int = 7,
    target_ms: float = 5.0,
    max_iters: int = 1000,
    min_iters: int = 3,
) -> Timing:
    """Median time of one call inside a captured graph (replay time / calls captured in it)."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    iters = _pick_iters(start.elapsed_time(end) / 1e3, target_ms / 1e3, min_iters, max_iters)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (iters * calls_per_replay))
    med = statistics.median(samples)
    return Timing(med, (max(samples) - min(samples)) / med if med else 0.0, "cuda-graph", iters, repeats,
                  calls_per_replay)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    calls_per_fn: int = 1,
    repeats: int = 7,
    target_ms: float = 5.0,
    max_iters: int = 1000,
    min_iters: int = 3,
    warmup: int = 3,
) -> Timing:
    """Time plain calls: CUDA events on a GPU (launch overhead included), perf_counter on CPU."""
    cuda = is_cuda(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run(n: int) -> float:
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:

        def run(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - t0

    iters = _pick_iters(run(1), target_ms / 1e3, min_iters, max_iters)
    samples = [run(iters) * 1e6 / (iters * calls_per_fn) for _ in range(repeats)]
    med = statistics.median(samples)
    return Timing(med, (max(samples) - min(samples)) / med if med else 0.0, "cuda-events" if cuda else "cpu",
                  iters, repeats, calls_per_fn)


def bench(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    calls_per_fn: int = 1,
    use_graph: bool = True,
    repeats: int = 7,
    target_ms: float = 5.0,
) -> tuple[Timing, Any]:
    """Time ``fn`` (which makes ``calls_per_fn`` calls of the thing measured).

    CUDA: capture ``fn`` once in a CUDA graph and time its replays; if capture fails, time plain
    calls with CUDA events and say so in ``Timing.note``. CPU: perf_counter.
    Returns ``(timing, outputs)`` where outputs are those of the captured call (or of a plain call).
    """
    if is_cuda(device) and use_graph:
        try:
            g, out = capture_graph(fn)
        except Exception as e:  # noqa: BLE001 - fall back, but say why
            torch.cuda.synchronize()
            t = time_calls(fn, device, calls_per_fn=calls_per_fn, repeats=repeats, target_ms=target_ms)
            t.note = f"graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            return t, fn()
        t = time_graph(g, calls_per_replay=calls_per_fn, repeats=repeats, target_ms=target_ms)
        t._graph = g  # keep the graph (and its memory pool) alive as long as the outputs are used
        return t, out
    t = time_calls(fn, device, calls_per_fn=calls_per_fn, repeats=repeats, target_ms=target_ms)
    return t, fn()


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 7) -> float | None:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + bytes written."""
    if not is_cuda(device):
        return None
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(5):
            dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / 5)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 4 / statistics.median(samples)


# ------------------------------------------------------------------------------------------------
# kernel counting (torch.profiler)
# ------------------------------------------------------------------------------------------------

_GEMM_RE = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitkreduce|matmul|_mm_|wgmma|hgmma|grouped_mm|^sm\d+_",
                      re.IGNORECASE)
_ATTN_RE = re.compile(r"flash|fmha|attention|attn|sdpa|cudnn", re.IGNORECASE)


def classify_kernel(name: str) -> str:
    low = name.lower()
    if low.startswith("memcpy"):
        return "memcpy"
    if low.startswith("memset"):
        return "memset"
    if _ATTN_RE.search(name) and not name.startswith("triton_"):
        return "attention"
    if _GEMM_RE.search(name) and not name.startswith("triton_"):
        return "gemm"
    return "other"


def count_kernels(fn: Callable[[], Any], device: torch.device, calls_per_fn: int = 1) -> dict | None:
    """Kernels launched by one call of ``fn`` (profiled after a warm-up call), by class.

    Returns ``{"total", "gemm", "attention", "other", "memcpy", "memset", "non_gemm", "names"}``
    (counts divided by ``calls_per_fn``; ``total`` excludes memcpy/memset, ``non_gemm`` =
    total - gemm), or None on CPU or when the profiler records no device events.
    """
    if not is_cuda(device):
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    names = [evt.name for evt in prof.events() if _is_device_event(evt)]
    if not names:
        return None
    return _tally(names, calls_per_fn)


def _is_device_event(evt) -> bool:
    dt = getattr(evt, "device_type", None)
    return dt is not None and "CUDA" in str(dt)


def _tally(names: list[str], calls_per_fn: int = 1) -> dict:
    counts = {"gemm": 0, "attention": 0, "other": 0, "memcpy": 0, "memset": 0}
    for n in names:
        counts[classify_kernel(n)] += 1
    total = counts["gemm"] + counts["attention"] + counts["other"]
    per = {k: v / calls_per_fn for k, v in counts.items()}
    per["total"] = total / calls_per_fn
    per["non_gemm"] = (total - counts["gemm"]) / calls_per_fn
    uniq: dict[str, int] = {}
    for n in names:
        uniq[n] = uniq.get(n, 0) + 1
    per["names"] = uniq
    return per


def count_kernels_multi(fns: dict, device: torch.device, *, event_filter=None, gap_s: float = 0.002) -> dict | None:
    """``count_kernels`` for several callables in ONE profiler session (profiler start-up is slow).

    Each callable runs inside its own ``record_function`` range, synchronized, with ``gap_s`` idle
    time around it; device events are attributed to the range whose (gap-widened) time span holds
    their start. Returns ``{name: counts}`` (see ``count_kernels``), or None on CPU.
    ``event_filter`` (tests only) selects which events count as "kernels" instead of CUDA events.
    """
    if event_filter is None:
        if not is_cuda(device):
            return None
        event_filter = _is_device_event
    from torch.profiler import ProfilerActivity, profile, record_function

    for fn in fns.values():
        fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(device) else [])
    tags = {name: f"__bench_range_{i}" for i, name in enumerate(fns)}
    try:
        with profile(activities=acts) as prof:
            for name, fn in fns.items():
                sync(device)
                time.sleep(gap_s)
                with record_function(tags[name]):
                    fn()
                    sync(device)
                time.sleep(gap_s)
    except Exception as e:  # noqa: BLE001
        return {name: {"error": f"{type(e).__name__}: {e}"[:200]} for name in fns}
    events = list(prof.events())
    spans = {}
    for evt in events:
        for name, tag in tags.items():
            if evt.name == tag:
                spans[name] = (evt.time_range.start, evt.time_range.end)
    if len(spans) != len(fns):
        return None
    margin = gap_s * 1e6 / 2  # microseconds
    names: dict[str, list[str]] = {name: [] for name in fns}
    for evt in events:
        if evt.name in tags.values() or not event_filter(evt):
            continue
        t = evt.time_range.start
        for name, (a, b) in spans.items():
            if a - margin <= t <= b + margin:
                names[name].append(evt.name)
                break
    if not any(names.values()):
        return None
    return {name: _tally(ns) for name, ns in names.items()}


def fmt_count(c: dict | None, key: str = "total") -> str:
    if not c or key not in c:
        return "-"
    v = c[key]
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


# ------------------------------------------------------------------------------------------------
# numerics
# ------------------------------------------------------------------------------------------------

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
MIN_NORMAL_EXP = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}


def ulp_of(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (float64 result; subnormal spacing near 0)."""
    a = x.double().abs()
    _, e = torch.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    e = torch.clamp(e.double() - 1, min=MIN_NORMAL_EXP[dtype])
    return torch.pow(2.0, e - MANTISSA_BITS[dtype])


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of last place between two same-dtype float tensors (int64)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    if a.dtype in (torch.bfloat16, torch.float16):
        ia, ib = a.view(torch.int16).to(torch.int64), b.view(torch.int16).to(torch.int64)
        sign = 0x7FFF
    elif a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).to(torch.int64), b.view(torch.int32).to(torch.int64)
        sign = 0x7FFFFFFF
    else:
        raise TypeError(a.dtype)
    oa = torch.where(ia < 0, -(ia & sign), ia)
    ob = torch.where(ib < 0, -(ib & sign), ib)
    return (oa - ob).abs()


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64, r64 = a.double(), ref.double()
    den = torch.linalg.vector_norm(r64).item()
    num = torch.linalg.vector_norm(a64 - r64).item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_us(t: float | None) -> str:
    if t is None or not math.isfinite(t):
        return "-"
    return f"{t:.1f}" if t < 100 else f"{t:.0f}"


def fmt_x(r: float | None) -> str:
    return "-" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def fmt_e(v: float | None) -> str:
    return "-" if v is None else (f"{v:.2e}" if v else "0")

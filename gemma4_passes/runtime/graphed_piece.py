"""A compiled piece replayed from CUDA graphs, one per token-count bucket.

On the first call at a bucket the piece is captured: token-sized inputs are copied into
bucket-sized static buffers (rows past the real count are zero padding; see
:mod:`.piece_shapes` for why that is sound), the compiled piece is warmed up and captured, and
the parity guard compares the first replay with an uncaptured run.  Later calls copy their rows
in, replay, and return the static outputs sliced to the real count.

What keeps this safe by construction:
* a piece whose shapes cannot be padded, a size above the largest bucket, a capture that raises
  (a CPU sync, a capture-unsafe op), or a size the parity guard rejected runs the compiled piece
  uncaptured, with one log line per piece and reason;
* every tensor input that is not token-sized (weights, buffers) is read by the graph at its
  captured address and checked on every call: an input found at another address is from then
  on copied into a static buffer (the activations of a static piece, e.g. the B=1 decode graph)
  and the piece recaptured once; past ``_MAX_COPIED`` such inputs the piece runs uncaptured
  (never the stale memory);
* a token-sized input that is a strided slice gets a bucket-sized buffer in the layout the piece
  was compiled for (its symbolic strides at the bucket), or runs uncaptured when that layout is
  not known;
* outputs that leave the compiled model are cloned (static buffers are overwritten by the next
  replay); outputs that feed the next piece are not, and a next piece captured at the same bucket
  reads them in place with no copy.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .parity_guard import ParityGuard, first_mismatch
from .piece_shapes import PieceShape

log = logging.getLogger("gemma4_passes")

#: decode batch sizes captured by default (the tokens of one decode step)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class CudaGraphCapture:
    """Captures with ``torch.cuda.CUDAGraph``; every graph of one model shares one memory pool."""

    def __init__(self) -> None:
        self.pool = None

    def capture(self, fn: Callable, args: list) -> tuple[Sequence, Callable[[], None]]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles/autotunes outside the capture
            fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outs = fn(*args)
        return _as_list(outs), graph.replay


class EmulatedCapture:
    """Stands in for CUDA graphs where there are none (CPU tests): a 'replay' recomputes into
    the static outputs, so the bucketing, static buffers and the parity guard run unchanged."""

    def capture(self, fn: Callable, args: list) -> tuple[Sequence, Callable[[], None]]:
        outs = _as_list(fn(*args))

        def replay() -> None:
            for o, new in zip(outs, _as_list(fn(*args))):
                if isinstance(o, torch.Tensor):
                    o.copy_(new)

        return outs, replay


@dataclass
class CaptureShared:
    """State shared by the pieces of one compiled model."""

    capturer: Any
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    guard: ParityGuard = field(default_factory=ParityGuard)
    #: (piece name, bucket) -> True: corrupt that capture's replays (tests of the guard)
    fault_injection: Callable[[str, int | None], bool] | None = None
    disabled_reason: str | None = None
    #: data_ptr -> full bucket-sized static output, for in-place reads by the next piece
    static_outputs: dict = field(default_factory=dict)
    captures: int = 0
    rejected: list = field(default_factory=list)

    def bucket_for(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None


@dataclass
class _Captured:
    static_args: list
    outs: list
    replay: Callable[[], None]
    fixed_ptrs: dict  # arg position -> data_ptr the graph reads


_FALLBACK = object()
#: a piece with more moving non-token inputs than this runs uncaptured (weights are not copied per call)
_MAX_COPIED = 16


class GraphedPiece:
    """Callable that replays ``compiled`` from per-bucket CUDA graphs (see the module doc)."""

    def __init__(self, name: str, compiled: Callable, shape: PieceShape, shared: CaptureShared,
                 returned: frozenset[int] = frozenset(), single: bool = False,
                 mutated: frozenset[int] = frozenset()):
        self.name = name
        self.single = single  # the piece returns one value, not a tuple
        self.compiled = compiled
        self.shape = shape
        self.shared = shared
        self.returned = returned  # output positions that leave the compiled model
        self.graphs: dict = {}
        self._said: set = set()
        #: inputs that are not token-sized but changed address between calls (activations of a
        #: static piece, e.g. the B=1 decode graph): copied into a static buffer, like token inputs
        self.copied: set[int] = set()
        self.mutated = mutated  # inputs the piece writes in place: never swapped for a static copy
        written = sorted(mutated.intersection(i for i, _ in shape.token_inputs))
        if written and shape.capturable:
            self.shape = shape = dataclasses.replace(
                shape, reason=f"it writes its token-sized inputs {written} in place")
        if not shape.capturable:
            self._say("shape", f"gemma4_passes: piece {name} runs uncaptured: {shape.reason}")

    # -- helpers ---------------------------------------------------------------------------------
    def _say(self, key: str, msg: str, level: int = logging.INFO) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, msg)

    def _run_uncaptured(self, args) -> Any:
        return self.compiled(*args)

    # -- call ------------------------------------------------------------------------------------
    def __call__(self, *args):
        if self.shared.disabled_reason is not None or not self.shape.capturable:
            return self._run_uncaptured(args)
        n = self.shape.runtime_size(args)
        bucket = None if n is None else self.shared.bucket_for(n)
        if n is not None and bucket is None:
            self._say(f"big{n}", f"gemma4_passes: piece {self.name}: {n} tokens is above the largest "
                                 f"captured size {self.shared.buckets[-1]}; runs uncaptured")
            return self._run_uncaptured(args)
        entry = self.graphs.get(bucket)
        if entry is None:
            return self._capture(bucket, n, args)
        if entry is _FALLBACK:
            return self._run_uncaptured(args)
        moved = [i for i, ptr in entry.fixed_ptrs.items() if args[i].data_ptr() != ptr]
        if moved:
            if self.mutated.intersection(moved):
                self._say(f"wmoved{moved}", f"gemma4_passes: piece {self.name}: inputs {moved} changed address "
                                            "and are written in place by the piece; this call runs uncaptured")
                return self._run_uncaptured(args)
            if len(self.copied.union(moved)) > _MAX_COPIED:
                self._say("moving", f"gemma4_passes: piece {self.name}: more than {_MAX_COPIED} inputs that are "
                                    "not token-sized change address between calls; runs uncaptured")
                return self._run_uncaptured(args)
            # first time: copy these inputs in from now on; the captures read the old addresses
            self._say(f"moved{moved}", f"gemma4_passes: piece {self.name}: inputs {moved} are not token-sized "
                                       "and changed address since capture; copied into static buffers from now on")
            self.copied.update(moved)
            self._drop_captures()
            return self._capture(bucket, n, args)
        self._copy_in(entry.static_args, args, n)
        entry.replay()
        return self._outputs(entry.outs, n)

    def _copy_in(self, static_args: list, args: Sequence, n: int | None) -> None:
        for i in self.copied:
            if args[i].data_ptr() != static_args[i].data_ptr():
                static_args[i].copy_(args[i])
        for i, d in self.shape.token_inputs:
            dst, src = static_args[i], args[i]
            if src.data_ptr() == dst.data_ptr() and src.stride() == dst.stride():
                continue  # the previous piece's static output, read in place
            dst.narrow(d, 0, n).copy_(src)

    def _outputs(self, outs: list, n: int | None):
        res = list(outs)
        if n is not None:
            for i, d in self.shape.token_outputs:
                res[i] = res[i].narrow(d, 0, n)
            for i in self.shape.symint_outputs:
                res[i] = n
        for i in self.returned:
            if isinstance(res[i], torch.Tensor):
                res[i] = res[i].clone()
        return res[0] if self.single else tuple(res)

    # -- capture ---------------------------------------------------------------------------------
    def _static_args(self, args: Sequence, n: int | None, bucket: int | None) -> tuple[list, dict]:
        """(the capture's inputs, {position: address} of those read in place); a static piece has
        no token inputs, so only the copied ones get buffers."""
        static = list(args)
        token_positions = {i for i, _ in self.shape.token_inputs}
        for k, (i, d) in enumerate(self.shape.token_inputs):
            src = args[i]
            full = self.shared.static_outputs.get(src.data_ptr())
            if full is not None and full.shape[d] == bucket and full.stride() == src.stride():
                static[i] = full  # produced by a piece captured at this bucket: read in place
                continue
            size = list(src.shape)
            size[d] = bucket
            # the layout the piece was compiled for, at the bucket (a strided slice stays strided)
            strides = self.shape.strides_at(k, bucket) if not src.is_contiguous() else None
            buf = (torch.empty_strided(size, strides, dtype=src.dtype, device=src.device).zero_()
                   if strides is not None else torch.zeros(size, dtype=src.dtype, device=src.device))
            buf.narrow(d, 0, n).copy_(src)
            static[i] = buf
        for i in self.shape.symint_inputs:
            static[i] = bucket
        self._copy_static(static, args)
        fixed = {i: a.data_ptr() for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and i not in token_positions and i not in self.copied}
        return static, fixed

    def _copy_static(self, static: list, args: Sequence) -> None:
        """Static buffers (same shape and strides) for the inputs in ``self.copied``."""
        for i in self.copied:
            src = args[i]
            static[i] = torch.empty_strided(src.shape, src.stride(), dtype=src.dtype, device=src.device)
            static[i].copy_(src)

    def _capture(self, bucket: int | None, n: int | None, args: Sequence):
        if n is not None:
            bad = [i for k, (i, _) in enumerate(self.shape.token_inputs)
                   if not args[i].is_contiguous() and not self._layout_known(k, args[i])]
            if bad:
                self._say("layout", f"gemma4_passes: piece {self.name}: token-sized inputs {bad} are not "
                                    "contiguous and their layout at another size is not known; runs uncaptured")
                self.graphs[bucket] = _FALLBACK
                return self._run_uncaptured(args)
        static, fixed = self._static_args(args, n, bucket)
        try:
            outs, replay = self.shared.capturer.capture(self.compiled, static)
        except Exception as e:  # a capture-unsafe piece: run it uncaptured, say why once
            self._say("capture", f"gemma4_passes: piece {self.name} could not be captured at {bucket} "
                                 f"tokens ({type(e).__name__}: {e}); runs uncaptured", logging.WARNING)
            self.graphs[bucket] = _FALLBACK
            return self._run_uncaptured(args)
        inject = self.shared.fault_injection
        if inject is not None and inject(self.name, bucket):
            replay = _corrupting(replay, outs)
        self.shared.captures += 1
        entry = _Captured(static, outs, replay, fixed)
        if self.shared.guard.enabled:
            replay()
            replayed = [o.clone() if isinstance(o, torch.Tensor) else o for o in outs]
            reference = _as_list(self.compiled(*static))
            problem = first_mismatch(self._rows(replayed, n), self._rows(reference, n), self.shared.guard)
            if problem is not None:
                self._reject(bucket, problem)
                return self._outputs(reference, n)
        else:
            replay()  # a CUDA-graph capture runs nothing: fill the outputs
        self.graphs[bucket] = entry
        for o in outs:
            if isinstance(o, torch.Tensor) and o.numel():
                self.shared.static_outputs[o.data_ptr()] = o
        return self._outputs(outs, n)

    def _drop_captures(self) -> None:
        """Forget this piece's captures (their static inputs are stale); sizes the parity guard
        rejected stay rejected."""
        for entry in self.graphs.values():
            if entry is not _FALLBACK:
                for o in entry.outs:
                    if isinstance(o, torch.Tensor) and self.shared.static_outputs.get(o.data_ptr()) is o:
                        del self.shared.static_outputs[o.data_ptr()]
        self.graphs = {b: e for b, e in self.graphs.items() if e is _FALLBACK}

    def _layout_known(self, k: int, src: torch.Tensor) -> bool:
        """True when the compiled strides of token input ``k``, evaluated at this call's size, are
        the input's own (dims of size 1 aside): then a bucket-sized buffer can copy the layout."""
        _, d = self.shape.token_inputs[k]
        want = self.shape.strides_at(k, src.shape[d])
        return want is not None and all(w == s or n == 1 for w, s, n in zip(want, src.stride(), src.shape))

    def _rows(self, outs: list, n: int | None) -> list:
        if n is None:
            return list(outs)
        res = list(outs)
        for i, d in self.shape.token_outputs:
            res[i] = res[i].narrow(d, 0, n)
        return res

    def _reject(self, bucket: int | None, problem: str) -> None:
        where = "this size" if self.shared.guard.on_mismatch == "size" else "the whole model"
        log.warning("gemma4_passes: parity guard: piece %s captured at %s tokens does not match its "
                    "uncaptured run (%s); %s runs uncaptured", self.name, bucket, problem, where)
        self.shared.rejected.append((self.name, bucket, problem))
        self.graphs[bucket] = _FALLBACK
        if self.shared.guard.on_mismatch == "model":
            self.shared.disabled_reason = f"parity guard rejected {self.name} at {bucket} tokens"


def _corrupting(replay: Callable[[], None], outs: Sequence) -> Callable[[], None]:
    target = next(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())

    def corrupted() -> None:
        replay()
        target.mul_(1.5).add_(1.0)

    return corrupted


def _as_list(outs: Any) -> list:
    return list(outs) if isinstance(outs, (tuple, list)) else [outs]

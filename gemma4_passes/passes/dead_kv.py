"""KV-shared layers: shrink a merged QKV GEMM whose K and V columns nobody reads.

What SGLang 0.5.23 runs in a KV-shared layer (``sglang/srt/models/gemma4_causal.py``,
``Gemma4Attention.forward``, under ``--enable-torch-compile``, where every ``BaseFusedOp``
runs its ``forward_native``):

  448  qkv, _ = self.qkv_proj(hidden_states)        QKVParallelLinear -> F.linear(x, W[q+2kv, H], bias)
  449  q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
  456  is_kv_shared = self.is_kv_shared_layer and self.kv_shared_layer_index is not None
  459  can_fuse_qkv_norm = (q.is_cuda or q.is_xpu) and scale_shift == 0 and not v_norm.with_scale
  467  (CUDA/XPU) gemma_qkv_rmsnorm(q, None, None, q_norm.weight, None, ...): a user Triton
       kernel normalising q in place, reading q's row stride ``q.stride(0)`` (= q+2kv) as an int;
       478  k = v = None
  499  (otherwise) q = q.unflatten(-1, (heads, D)); q = self.q_norm(q)  (Gemma4RMSNorm.forward_native:
       x.float(), x * pow(x.pow(2).mean(-1, keepdim) + eps, -0.5), * (w.float() + scale_shift),
       type_as); q = q.flatten(-2, -1); 503  k = v = None  (k_norm/v_norm are NOT called)
  531  dummy_k = torch.zeros_like(q[:, :kv_size])
  532  q, _ = self.rotary_emb(positions, q, dummy_k)   RotaryEmbedding.forward_native (Gemma4RotaryEmbedding
       on full layers: same forward, other inv_freq): index_select(cos_sin_cache, positions), chunk(2),
       per tensor view(T, -1, D), [..., :rotary_dim], apply_rotary_emb (chunk x1/x2,
       x1*cos - x2*sin, x2*cos + x1*sin, cat), cat with the pass-through part, reshape;
       done for q AND for the dummy zeros, whose result is dropped
  534  q = q.unflatten(-1, (heads, D)); 535  self.attn(q, None, None, save_kv_cache=False)
  544  output, _ = self.o_proj(attn_output)

(forward_native sources: ``layers/layernorm.py:1421``, ``layers/rotary_embedding/base.py:321``,
``rotary_embedding/utils.py:36``, ``rotary_embedding/rope_variant.py:895``; the switch to them:
``sglang/kernels/fused_op.py:598`` ``enter_torch_compile``, called by
``srt/compilation/torch_compile_decoration.py:37``.)

So the K and V columns of the GEMM are computed and thrown away, and a zero K is rotated
and thrown away. The dummy rotation reads no K (only q's static shape and cos/sin): it is an
independent dead branch, and AOTAutograd's own dead-code elimination removes it (and the unused
k/v ``getitem``s) before any post-grad pass runs (torch 2.13 ``_aot_autograd/graph_capture.py``,
``fw_module.graph.eliminate_dead_code()``; the Dynamo graph still holds it). What is left in the
post-grad graph is the wide GEMM itself::

    permute(W, [1, 0]) -> mm | addmm(b, ., .) -> [reshape] -> split_with_sizes([q, kv, kv], -1)
                                                            -> getitem 0 only

This pass rewrites it to ``mm(x, permute(W[:q]))`` (``addmm(b[:q], ...)`` with a bias; a row
slice of W is a contiguous view) and reroutes q's users to its output (q as ``qkv[..., :q]``
slices instead of a split is matched too). Where a graph still holds work on the K/V columns
whose results reach nothing (no DCE ran), that work is erased with the split, with the producers
only it read. The dummy-K branch is not searched for: it reads neither the GEMM nor K, and no
torch.compile flow hands it to a post-grad pass.

transformers 5.23 (``Gemma4TextAttention``) builds no k_proj/v_proj/k_norm/v_norm in KV-shared
layers and reads K/V from ``shared_kv_states``: there is nothing dead to remove, and this pass
matches 0 times on transformers graphs.

It does not match when a K/V-derived value is live (reaches the graph output or a side effect:
a cache write, a mutating custom op, a higher-order op), when the GEMM output has another live
user, when the split sizes do not add up to the GEMM's columns, or when an alias of q reaches an
op that reads memory layout (``as_strided``, user Triton kernels that bake ``q.stride(0)`` as an
int, as SGLang's CUDA ``gemma_qkv_rmsnorm`` does): shrinking the GEMM changes q's row stride.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch._ops import HigherOrderOperator, OpOverload
from torch.fx import Graph, Node

from .base import FusionPass, GraphEditor, fake_call, log
from .graph_match import is_op, val

aten = torch.ops.aten

_GEMMS = (aten.mm.default, aten.addmm.default)
# views that only regroup the leading (token) dims of the GEMM output
_ROW_VIEWS = (aten.reshape.default, aten.view.default)
# ops through which a tensor keeps aliasing q's memory
_ALIAS_VIEWS = (
    aten.reshape.default, aten.view.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.default, aten.permute.default, aten.slice.Tensor, aten.select.int,
    aten.expand.default, aten.split.Tensor, aten.split_with_sizes.default, aten.alias.default,
    aten.t.default, aten.transpose.int,
)
# ops whose result depends on the input's strides, not only its values
_LAYOUT_READERS = (aten.as_strided.default, aten.as_strided_scatter.default, aten.as_strided_.default)


# --------------------------------------------------------------------------------------------
# liveness
# --------------------------------------------------------------------------------------------


def _is_root(node: Node) -> bool:
    """A node whose effect is observable even without users."""
    if node.op == "output":
        return True
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, HigherOrderOperator):
        return True  # auto_functionalized, triton wrappers, with_effects: assume they matter
    if not isinstance(t, OpOverload) and getattr(t, "__module__", None) not in ("_operator", "operator"):
        return True  # an unknown Python callable: assume it matters
    return node.is_impure()


def live_nodes(graph: Graph) -> set[Node]:
    """Nodes that reach the graph output or a side-effecting node."""
    live: set[Node] = set()
    for node in reversed(graph.nodes):
        if _is_root(node) or any(u in live for u in node.users):
            live.add(node)
    return live


def downstream(start: Node) -> set[Node]:
    """``start`` and every node that reads it, transitively."""
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


# --------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------


@dataclass
class DeadKvGemm:
    """A QKV GEMM of which only the first ``q_size`` columns are live."""

    gemm: Node
    row_views: list  # reshape/view nodes from the GEMM to the split, in order
    split: Node | None  # split_with_sizes (None for the slice form)
    q_out: Node  # the live q chunk: getitem 0 of the split, or a [0, q) slice
    q_size: int
    n_cols: int
    dead: set = field(default_factory=set)  # the dead chunks and everything reading them


def _is_last_dim(node: Node, dim) -> bool:
    v = val(node)
    return v is not None and dim in (-1, v.dim() - 1)


def _gemm_cols(gemm: Node) -> int | None:
    v = val(gemm)
    return int(v.shape[-1]) if v is not None and v.dim() == 2 else None


def _through_row_views(gemm: Node, n_cols: int, live: set) -> tuple[Node, list]:
    """Follow the GEMM output's only live user through reshapes that keep the last dim."""
    node, views = gemm, []
    while True:
        users = [u for u in node.users if u in live]
        if len(users) != 1 or not is_op(users[0], *_ROW_VIEWS):
            return node, views
        v = val(users[0])
        if v is None or v.shape[-1] != n_cols:
            return node, views
        node = users[0]
        views.append(node)


def _q_chunk_of_split(split: Node, n_cols: int, live: set) -> tuple[Node, int] | None:
    """``split_with_sizes(x, sizes, -1)`` with only chunk 0 live: (getitem 0, sizes[0])."""
    sizes = split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not _is_last_dim(split.args[0], dim) or not isinstance(sizes, (list, tuple)) or len(sizes) < 2:
        return None
    if not all(isinstance(s, int) for s in sizes) or sum(sizes) != n_cols:
        log.debug("kv_shared_dead_kv: split sizes %s do not add up to %d columns", sizes, n_cols)
        return None
    if any(not is_op(u, operator.getitem) for u in split.users):
        return None
    live_items = [u for u in split.users if u in live]
    if len(live_items) != 1 or live_items[0].args[1] != 0:
        return None  # a K or V chunk is live (or q is not)
    return live_items[0], sizes[0]


def _prefix_slice_end(node: Node, x: Node) -> int | None:
    """``x[..., :q]`` as ``aten.slice.Tensor(x, -1, 0, q)``: return q."""
    if not is_op(node, aten.slice.Tensor) or node.args[0] is not x:
        return None
    defaults = (x, 0, None, None, 1)  # slice.Tensor(self, dim=0, start=None, end=None, step=1)
    _, dim, start, end, step = tuple(node.args) + defaults[len(node.args):]
    if not _is_last_dim(x, dim) or start not in (0, None) or step != 1 or not isinstance(end, int):
        return None
    return end


def _find_q_chunk(out: Node, n_cols: int, live: set) -> tuple[Node | None, Node, int] | None:
    """(split, q chunk, q size) of the row-viewed GEMM output, in split or slice form."""
    live_users = [u for u in out.users if u in live]
    if len(live_users) != 1:
        return None  # the GEMM output is used elsewhere
    user = live_users[0]
    if is_op(user, aten.split_with_sizes.default):
        chunk = _q_chunk_of_split(user, n_cols, live)
        return None if chunk is None else (user, *chunk)
    end = _prefix_slice_end(user, out)
    return None if end is None else (None, user, end)


def _layout_sensitive(q_out: Node) -> bool:
    """An alias of q reaches an op that reads its strides (shrinking the GEMM changes them)."""
    aliases, stack = set(), [q_out]
    while stack:
        n = stack.pop()
        if n in aliases:
            continue
        aliases.add(n)
        for u in n.users:
            t = u.target if u.op == "call_function" else None
            if t in _LAYOUT_READERS or isinstance(t, HigherOrderOperator):
                return True
            if t in _ALIAS_VIEWS or t is operator.getitem:
                stack.append(u)
    return False


def find_dead_kv_gemms(graph: Graph) -> list[DeadKvGemm]:
    live = live_nodes(graph)
    found = []
    for gemm in graph.nodes:
        if not is_op(gemm, *_GEMMS) or gemm not in live:
            continue
        n_cols = _gemm_cols(gemm)
        if n_cols is None:
            continue
        out, views = _through_row_views(gemm, n_cols, live)
        chunk = _find_q_chunk(out, n_cols, live)
        if chunk is None:
            continue
        split, q_out, q_size = chunk
        if not 0 < q_size < n_cols:
            continue
        if _layout_sensitive(q_out):
            log.debug("kv_shared_dead_kv: q of %s reaches a layout-reading op", gemm)
            continue
        # every live path from the GEMM runs through q_out (checked above), so whatever else
        # reads the GEMM is dead: the K/V chunks and any work still done on them
        dead = downstream(gemm) - live
        found.append(DeadKvGemm(gemm, views, split, q_out, q_size, n_cols, dead))
    return found


# --------------------------------------------------------------------------------------------
# replacement
# --------------------------------------------------------------------------------------------


def _insert(ed: GraphEditor, anchor: Node, op, args, kwargs=None) -> Node:
    """``op(*args, **kwargs)`` before ``anchor``, with its fake value."""
    kwargs = kwargs or {}
    value = fake_call(lambda *xs: op(*xs, **kwargs), args)
    with ed.graph.inserting_before(anchor):
        node = ed.graph.call_function(op, tuple(args), dict(kwargs))
    node.meta["val"] = value
    if "stack_trace" in anchor.meta:
        node.meta["stack_trace"] = anchor.meta["stack_trace"]
    return node


def _q_operand(ed: GraphEditor, m: DeadKvGemm, b: Node) -> Node:
    """The GEMM's right operand cut to the q columns: ``permute(W[:q])`` when it is a
    transposed weight (rows of W: a contiguous view), else a column slice of the operand."""
    if (is_op(b, aten.permute.default) and list(b.args[1]) == [1, 0]) or is_op(b, aten.t.default):
        w_q = _insert(ed, m.gemm, aten.slice.Tensor, [b.args[0], 0, 0, m.q_size])
        return _insert(ed, m.gemm, aten.permute.default, [w_q, [1, 0]])
    return _insert(ed, m.gemm, aten.slice.Tensor, [b, 1, 0, m.q_size])


def _q_gemm(ed: GraphEditor, m: DeadKvGemm) -> Node:
    g = m.gemm
    if is_op(g, aten.mm.default):
        a, b = g.args
        return _insert(ed, g, aten.mm.default, [a, _q_operand(ed, m, b)])
    bias, a, b = g.args
    bv = val(bias)
    if bv is not None and bv.dim() >= 1 and bv.shape[-1] == m.n_cols:  # not a broadcast bias
        bias = _insert(ed, g, aten.slice.Tensor, [bias, -1, 0, m.q_size])
    return _insert(ed, g, aten.addmm.default, [bias, a, _q_operand(ed, m, b)], g.kwargs)


def shrink_gemm(graph: Graph, m: DeadKvGemm) -> None:
    """GEMM on the q columns only; q's users read it; the split and dead K/V work go."""
    ed = GraphEditor(graph)
    out = _q_gemm(ed, m)
    for view in m.row_views:  # the same leading-dim regrouping, q columns instead of all
        shape = list(view.args[1])
        shape[-1] = m.q_size
        out = _insert(ed, m.gemm, view.target, [out, shape])
    m.q_out.replace_all_uses_with(out)
    old = {m.q_out, m.gemm, *m.row_views, *m.dead}
    if m.split is not None:
        old.add(m.split)
    erase_with_dead_producers(graph, old)


def erase_with_dead_producers(graph: Graph, nodes: set) -> None:
    """Erase ``nodes`` (users first), then every producer left without users that has no side
    effect: the old weight transpose, a K norm's weight cast, work only the K/V branch read."""
    present = {n for n in graph.nodes}
    nodes = {n for n in nodes if n in present}  # another match may have erased shared dead work
    producers = [i for n in nodes for i in n.all_input_nodes if i not in nodes]
    ed = GraphEditor(graph)
    ed.erase_dead(nodes)
    while producers:
        n = producers.pop()
        if n.op == "call_function" and not n.users and not _is_root(n) and n in ed.order:
            producers.extend(n.all_input_nodes)
            graph.erase_node(n)
            del ed.order[n]


class KvSharedDeadKv(FusionPass):
    name = "kv_shared_dead_kv"
    description = "KV-shared layers: QKV GEMM cut to its q columns when K/V are never read"

    def find(self, graph: Graph) -> list[DeadKvGemm]:
        return find_dead_kv_gemms(graph)

    def rewrite(self, graph: Graph, match: DeadKvGemm) -> None:
        shrink_gemm(graph, match)

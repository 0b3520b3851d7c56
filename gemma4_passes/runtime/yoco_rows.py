"""Which rows of a prefill batch YOCO keeps, and gathering them.

A row is one (batch row, position) of a ``[B, T]`` batch. The KV-shared layers only have to run on
the rows whose output somebody reads: the rows whose logits are returned. This module turns the
caller's request into a ``[B, K]`` LongTensor of positions (the same K for every batch row) and
gathers tensors along the sequence dimension with it.

Forms of the request (``logits_to_keep``):

* ``int n >= 1``: the last ``n`` columns of every row, as transformers does (``[B, n]``).
* a 1-D LongTensor of positions: those columns of every row, as transformers does.
* a 2-D LongTensor ``[B, K]``: per batch row its own positions (an extension of transformers' API).
* ``"last"``: the last real token of every request:

  - padded batch (a 2-D ``attention_mask``, left or right padding; with a cache the mask also covers
    the cached tokens, as in transformers): per row the last new position whose mask is 1 -> ``[B, 1]``;
  - packed batch (no ``attention_mask``; ``position_ids`` restart at every request boundary): the
    end of every packed request -> ``[B, S]`` with S requests per row (every row must hold the same
    number of requests);
  - otherwise the last column -> ``[B, 1]``.

``0`` (every position, e.g. prompt logprobs) is not a row selection: YOCO does not apply.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["LAST", "RowRequest", "RowSelectionError", "needed_rows", "gather_rows", "packed_ends"]

#: ``logits_to_keep`` value asking for the last real token of every request.
LAST = "last"

RowRequest = Union[int, str, torch.Tensor]


class RowSelectionError(ValueError):
    """The request does not name a usable set of rows (YOCO falls back to the full run)."""


def packed_ends(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Per row the positions where a packed request ends, ``[B, S]``; None if nothing is packed.

    A request ends where the next position id is not this one + 1 (transformers' own packing rule,
    ``masking_utils.find_packed_sequence_indices``), and at the last column.
    """
    if position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    step_ok = position_ids[:, 1:] == position_ids[:, :-1] + 1
    if bool(step_ok.all()):
        return None
    is_end = torch.cat([~step_ok, torch.ones_like(step_ok[:, :1])], dim=1)
    counts = is_end.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise RowSelectionError(
            f"packed rows hold different numbers of requests ({counts.tolist()}); YOCO needs the same "
            "number in every row"
        )
    b = position_ids.shape[0]
    return is_end.nonzero()[:, 1].view(b, int(counts[0]))


def _last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, 1]``: per row the last position whose mask is nonzero (left or right padding)."""
    t = attention_mask.shape[1]
    real = attention_mask.ne(0)
    if bool((~real.any(dim=1)).any()):
        raise RowSelectionError("a row of the attention mask has no real token")
    # Position of the last True: T - 1 - (index of the first True in the flipped row).
    last = t - 1 - real.flip(1).to(torch.int8).argmax(dim=1)
    return last.unsqueeze(1)


def needed_rows(
    request: RowRequest,
    *,
    batch: int,
    seq_len: int,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The ``[batch, K]`` LongTensor of kept positions for ``request`` (see the module docstring).

    Raises ``RowSelectionError`` for ``0`` (every position), an out-of-range position, or a
    request this module does not understand.
    """
    if isinstance(request, str):
        if request != LAST:
            raise RowSelectionError(f"unknown row request {request!r} (use an int, a LongTensor or {LAST!r})")
        if attention_mask is not None and attention_mask.dim() == 2:
            # transformers' 2-D mask covers the cached tokens too: its last seq_len columns are ours
            return _last_real_token(attention_mask[:, -seq_len:]).to(device=device, dtype=torch.long)
        if attention_mask is None and position_ids is not None:
            pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
            ends = packed_ends(pos)
            if ends is not None:
                return ends.to(device=device, dtype=torch.long)
        return torch.full((batch, 1), seq_len - 1, device=device, dtype=torch.long)

    if isinstance(request, bool):  # bool is an int: refuse it rather than keep 0 or 1 columns
        raise RowSelectionError(f"logits_to_keep={request!r} is not a row request")
    if isinstance(request, int):
        if request <= 0:
            raise RowSelectionError("logits_to_keep=0 asks for every position")
        n = min(request, seq_len)
        cols = torch.arange(seq_len - n, seq_len, device=device, dtype=torch.long)
        return cols.unsqueeze(0).expand(batch, n)

    if isinstance(request, torch.Tensor):
        if request.dtype in (torch.bool, torch.uint8) or request.is_floating_point():
            raise RowSelectionError(f"logits_to_keep of dtype {request.dtype} is not a set of positions")
        idx = request.to(device=device, dtype=torch.long)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(batch, idx.shape[0])
        elif idx.dim() != 2 or idx.shape[0] != batch:
            raise RowSelectionError(f"logits_to_keep of shape {tuple(request.shape)} for a batch of {batch}")
        idx = torch.where(idx < 0, idx + seq_len, idx)  # transformers' tensors may count from the end
        if idx.numel() == 0:
            raise RowSelectionError("logits_to_keep selects no position")
        if bool(((idx < 0) | (idx >= seq_len)).any()):
            raise RowSelectionError(f"logits_to_keep holds positions outside [0, {seq_len})")
        return idx

    raise RowSelectionError(f"logits_to_keep of type {type(request).__name__} is not a row request")


def gather_rows(x: torch.Tensor, rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x`` restricted to ``rows`` ([B, K]) along ``dim``; dim 0 is the batch (size B or 1).

    Works on any tensor laid out ``[B, ..., T, ...]`` with the batch first and T at ``dim``; a
    batch of 1 (e.g. shared RoPE tables or masks) is broadcast first.
    """
    b, k = rows.shape
    if x.shape[0] != b:
        x = x.expand(b, *x.shape[1:])
    shape = [b] + [1] * (x.dim() - 1)
    shape[dim] = k
    index = rows.view(shape)
    expand = list(x.shape)
    expand[dim] = k
    return torch.gather(x, dim, index.expand(expand))

"""Token bitmasks: fill them for a step's constrained rows, apply them to logits.

Layout (llguidance's): int32 words [R, ceil(V / 32)]; bit t % 32 of word
t // 32 set = token t allowed. `rows` [R] names the logits row each mask row
constrains, so only constrained rows are touched.

`BitmaskFiller.start(rows)` fills the masks on a helper thread (the backend
releases the GIL) while the forward pass runs; `result()` joins, and raises
`RequestFault` for a sequence whose grammar is in error or allows nothing, so
the step guard fails that request alone. `apply_bitmask_torch` is the
reference (and the CPU path); on CUDA the Triton kernel in
`kernels/bitmask.py` does the same in place.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.errors import RequestFault
from engine.structured.backend import GrammarError, GrammarMatcher, bitmask_width


@dataclass(frozen=True)
class GrammarBitmask:
    bitmask: Tensor  # [R, W] int32 on the logits' device
    rows: Tensor  # [R] int64: the logits row of each mask row


def unpack_bitmask(bitmask: Tensor, vocab_size: int) -> Tensor:
    """[R, W] int32 -> [R, V] bool allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    return bits.flatten(1)[:, :vocab_size].bool()


def apply_bitmask_torch(logits: Tensor, bitmask: Tensor, rows: Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] is clear."""
    allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, V]
    sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))  # [R, V]
    logits.index_copy_(0, rows, sub)


def apply_bitmask(logits: Tensor, mask: GrammarBitmask) -> None:
    if logits.is_cuda:
        from kernels.bitmask import apply_bitmask_triton
        apply_bitmask_triton(logits, mask.bitmask, mask.rows)
    else:
        apply_bitmask_torch(logits, mask.bitmask, mask.rows)


def constrain(logits: Tensor, mask: GrammarBitmask, before: Tensor | None) -> None:
    """Apply the grammar last. A row left with nothing allowed (min_tokens banned the
    EOS the grammar requires) falls back to its pre-penalty logits `before` [R, V], a
    tensor the caller hands over, under the grammar: the grammar wins."""
    apply_bitmask(logits, mask)
    if before is None:
        return
    sub = logits.index_select(0, mask.rows)  # [R, V]
    dead = torch.isneginf(sub).all(dim=-1, keepdim=True)  # [R, 1]
    # `before` is the caller's own copy (index_select): masked in place, not cloned.
    apply_bitmask(before, GrammarBitmask(mask.bitmask, torch.arange(len(mask.rows), device=before.device)))
    logits.index_copy_(0, mask.rows, torch.where(dead, before, sub))


class BitmaskFiller:
    """Fills a step's masks on one helper thread while the forward pass runs."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.width = bitmask_width(vocab_size)
        self.device = device
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitmask")

    def start(self, matchers: Sequence[GrammarMatcher | None], request_ids: Sequence[str],
              drafts: Sequence[Sequence[int]] = ()) -> concurrent.futures.Future | None:
        """matchers[i] constrains sampled row i (None: unconstrained). A speculating request
        has the same matcher on its 1 + k rows and `drafts[i]` (its k drafts) on the first:
        row i + j is masked after the grammar consumed drafts[:j]. None if no row is constrained."""
        index = [i for i, m in enumerate(matchers) if m is not None]
        if not index:
            return None
        drafts = list(drafts) or [()] * len(matchers)
        return self._pool.submit(self._fill, list(matchers), list(request_ids), drafts, index)

    def _fill(self, matchers: list, ids: list[str], drafts: list, index: list[int]) -> GrammarBitmask:
        for i in index:
            err = matchers[i].error()
            if err is not None:
                raise RequestFault(ids[i], GrammarError(err))
        bitmask = torch.empty((len(index), self.width), dtype=torch.int32)  # CPU: the backend writes it
        plain, j = [], 0
        while j < len(index):
            row = index[j]
            k = len(drafts[row])
            if k:  # rows j..j+k: one matcher stepped through the drafts (then rolled back)
                matchers[row].fill_bitmask(bitmask[j:j + 1 + k], drafts[row])
            else:
                plain.append(j)
            j += 1 + k
        if plain:
            rows = bitmask if len(plain) == len(index) else torch.empty((len(plain), self.width), dtype=torch.int32)
            type(matchers[index[plain[0]]]).fill_many([matchers[index[j]] for j in plain], rows)
            if rows is not bitmask:
                bitmask[torch.tensor(plain)] = rows
        empty = (bitmask == 0).all(dim=1)  # host-side CPU tensor: no device sync
        if bool(empty.any()):
            i = index[int(empty.nonzero()[0])]
            raise RequestFault(ids[i], GrammarError(matchers[i].error() or "the grammar allows no token here"))
        return GrammarBitmask(bitmask.to(self.device, non_blocking=True),
                              torch.tensor(index, dtype=torch.long, device=self.device))

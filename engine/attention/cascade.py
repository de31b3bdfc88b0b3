"""Shared-prefix (Hydragen-style) attention: which levels to decompose, and the exact merge.

A request's attention over its KV splits into disjoint key sets: the pages of each
shared level it belongs to, and its own pages after the deepest of them. Attention
over each set returns (output, log-sum-exp) and the parts merge exactly:
    lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i.
A level's pages precede every query of every member (they are full, computed
blocks), so its part is non-causal: all the group's queries against the level's
KV at once, which is read once per group instead of once per member.

`plan_cascade` picks the levels to decompose (policy "on": all; "auto": those whose
saved KV reads pay for the extra attention call and merge, by a cost model owned
by the backend). A level left out hands its pages to its nested levels, so each
request's own keys stay one contiguous page range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHARED_PREFIX_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PrefixLevel:
    """Rows `rows` of the layout share pages [first_page, first_page + num_pages) of
    their page lists (the same physical pages), all before their query tokens."""
    first_page: int
    num_pages: int
    rows: tuple[int, ...]


@dataclass(frozen=True)
class CascadeCost:
    """auto decomposes a level when (members - 1) * prefix tokens, the KV rows it saves
    reading per layer, reach `min_saved_tokens` (measured with
    loadtest/shared_prefix_bench.py --attention-only on this CPU)."""
    min_saved_tokens: int = 2048

    def pays(self, members: int, prefix_tokens: int) -> bool:
        return (members - 1) * prefix_tokens >= self.min_saved_tokens


@dataclass(frozen=True)
class CascadePlan:
    levels: tuple[PrefixLevel, ...]  # the decomposed levels, parents first
    own_first_page: tuple[int, ...]  # per layout row: first page of its own keys

    @property
    def active(self) -> bool:
        return bool(self.levels)

    def shared_tokens(self, page_size: int) -> int:
        """Member x prefix tokens attended through a shared read this step."""
        return sum(len(lv.rows) * lv.num_pages * page_size for lv in self.levels)


def plan_cascade(levels: tuple[PrefixLevel, ...], num_rows: int, page_size: int, mode: str,
                 cost: CascadeCost = CascadeCost()) -> CascadePlan:
    """Choose the levels to decompose (levels come parents first, nested ones starting
    where their parent ends)."""
    if mode not in SHARED_PREFIX_MODES:
        raise ValueError(f"shared_prefix_attention must be one of {SHARED_PREFIX_MODES}, got {mode!r}")
    own = [0] * num_rows
    taken: list[PrefixLevel] = []
    if mode == "off":
        return CascadePlan((), tuple(own))
    # start[row]: where the row's next level would begin (after its deepest taken level).
    start = [0] * num_rows
    for lv in levels:
        first = min(start[r] for r in lv.rows)  # a left-out parent's pages join this level
        end = lv.first_page + lv.num_pages
        if mode == "on" or cost.pays(len(lv.rows), (end - first) * page_size):
            taken.append(PrefixLevel(first, end - first, lv.rows))
            for r in lv.rows:
                start[r] = own[r] = end
    return CascadePlan(tuple(taken), tuple(own))


def merge_lse_(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
               index: torch.Tensor | None, need_lse: bool = True) -> None:
    """In place: rows `index` (None: all rows, in order) of (out [T, H, D], lse [T, H] fp32)
    merged with the part (part_out [N, H, D], part_lse [N, H]) computed over a disjoint
    key set: out = o1 + (o2 - o1) * sigmoid(l2 - l1) is (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2).
    need_lse=False skips the merged lse (the last part merged)."""
    o1 = out if index is None else out[index]
    l1 = lse if index is None else lse[index]
    w2 = torch.sigmoid(part_lse - l1)[..., None]  # [N, H, 1] the part's share
    merged = o1.add_(part_out.sub(o1).mul_(w2)) if index is None else o1 + (part_out - o1) * w2
    if index is not None:
        out[index] = merged.to(out.dtype)
    if need_lse:
        if index is None:
            torch.logaddexp(lse, part_lse, out=lse)
        else:
            lse[index] = torch.logaddexp(l1, part_lse)

"""The messages between the scheduler and the model runner (frozen, one writer each)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.request import Request

TokenLogprobs = tuple[list[float], list[int], list[list[int]], list[list[float]]]


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: tokens [start, start + num_tokens) of
    `request.token_ids` are computed; a token is sampled when `sample` is set
    (the step brings num_computed_tokens up to num_tokens). The runner only
    reads `request` (params, token ids, seed).

    Speculative step: the last `len(draft_token_ids)` of the `num_tokens` are
    the drafts (they follow the request's one uncomputed committed token), and
    the runner samples at all 1 + k positions. `draft_parents` (empty for a chain)
    makes the drafts a tree (engine/spec/tree.py); any prefix of a tree's drafts is a tree."""
    request: Request
    start: int
    num_tokens: int
    block_ids: tuple[int, ...]
    sample: bool
    draft_token_ids: tuple[int, ...] = ()
    draft_parents: tuple[int, ...] = ()

    @property
    def num_draft_tokens(self) -> int:
        return len(self.draft_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass(frozen=True)
class PrefixGroup:
    """One level of the step's shared-prefix forest: the scheduled requests at `rows`
    (indices into `SchedulerOutput.scheduled`) all hold the same physical blocks
    block_ids[first_block:first_block + num_blocks]; they are full and computed, so
    they precede every query token of every member. Levels come parents first; a
    nested level starts where its parent ends."""
    first_block: int
    num_blocks: int
    rows: tuple[int, ...]


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    num_batched_tokens: int
    preempted_ids: tuple[str, ...] = ()
    num_prefill_tokens: int = 0  # tokens of prompts computed this step (metrics)
    prefix_cache_queries: int = 0  # tokens looked up at admission this step
    prefix_cache_hits: int = 0
    prefix_groups: tuple[PrefixGroup, ...] = ()  # empty when shared-prefix attention is off

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def without(self, request_ids: set[str]) -> SchedulerOutput:
        """This step minus the given requests (the step guard drops culprits): prefix
        groups are renumbered to the surviving rows, and a level left with fewer than
        two members is dropped (a nested level's members are a subset of its parent's,
        so its parent survives whenever it does)."""
        keep = [i for i, s in enumerate(self.scheduled) if s.request_id not in request_ids]
        new_row = {old: new for new, old in enumerate(keep)}
        groups = []
        for g in self.prefix_groups:
            rows = tuple(new_row[r] for r in g.rows if r in new_row)
            if len(rows) >= 2:
                groups.append(PrefixGroup(g.first_block, g.num_blocks, rows))
        return replace(self, scheduled=tuple(self.scheduled[i] for i in keep),
                       prefix_groups=tuple(groups))


@dataclass(frozen=True)
class ModelRunnerOutput:
    """Per scheduled request that sampled, in `SchedulerOutput.scheduled` order
    restricted to `sample=True`: the token ids it produced this step (a list: a
    speculative step emits its accepted drafts plus one) and, when asked, their
    logprobs."""
    request_ids: tuple[str, ...]
    sampled_token_ids: tuple[list[int], ...]
    # Per request, None when not asked, else parallel per-token lists in the form
    # `make_logprob_dicts` takes: (sampled logprobs, sampled ranks, top-n ids, top-n logprobs).
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    # A model drafter's passes this step (engine.spec.model_drafter.DraftPass: tokens, seconds, rows).
    draft_passes: tuple = ()
    # When the runner's logit_topk > 0: (input token of each sampled row [S], its logits'
    # top ids [S, K]) on the host, for a drafter that learns from the target's logits.
    logit_topk: tuple | None = None
    # Shared-prefix attention this step: (levels decomposed, levels offered, member x prefix
    # tokens attended through a shared read).
    shared_prefix: tuple[int, int, int] = (0, 0, 0)

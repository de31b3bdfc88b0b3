"""Scheduler: pure-CPU policy deciding how many tokens each request computes per step.

One rule: every step each scheduled request advances `num_computed_tokens`
toward `num_tokens` by some count (a prefill chunk, one decode token, later
1 + k speculative tokens), under `max_num_batched_tokens` and `max_num_seqs`.
Running requests go first (in admission order), then waiting ones by
(priority, arrival). When blocks run out the newest running request is
preempted by recompute: its blocks are freed, num_computed_tokens reset to 0,
and it returns to the waiting queue in (priority, arrival) order, near the
front (its output tokens are kept).
"""
from __future__ import annotations

import time

from engine.config import SchedulerConfig
from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sched.output import ModelRunnerOutput, PrefixGroup, ScheduledRequest, SchedulerOutput
from engine.sched.waiting import WaitingQueue


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # cumulative

    # ---- intake ----------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        """Waiting is ordered by (priority, arrival): FCFS within a priority; a
        preempted request keeps its arrival time, so it returns near the front."""
        self.waiting.push(req)

    def finish_request(self, request_id: str, reason: str, stop_reason: int | str | None = None) -> Request | None:
        """Finish (stop, length) or abort a request; frees its blocks at once."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        self.kv.free(req)
        return req

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def next_admitted(self) -> list[Request]:
        """The waiting requests the next schedules admit first, in service order: as many as
        there are free seats (`max_num_seqs`) and, after what the running prompts still need,
        free KV blocks for their prompts and first decodes (the head of the line blocks the
        rest, as in admission). The token budget aside: a long prompt joins a few steps later."""
        free = self.kv.num_free_blocks - sum(self.kv.blocks_to_decode(r) for r in self.running
                                             if r.num_computed_tokens + 1 < r.num_tokens)
        admitted = []
        for req in self.waiting.first(self.config.max_num_seqs - len(self.running)):
            free -= self.kv.blocks_to_decode(req)
            if free < 0:
                break
            admitted.append(req)
        return admitted

    # ---- scheduling --------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        queried, hits = self.kv.queried_tokens, self.kv.hit_tokens
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or budget == 0:
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            drafts = self._drafts(req, num_new, budget)
            if drafts and not self.kv.allocate(req, num_new + len(drafts)):
                drafts = ()  # no room to speculate: decode plainly rather than preempt anyone
            if not self._allocate_or_preempt(req, num_new + len(drafts), preempted):
                continue
            scheduled.append(self._entry(req, num_new, drafts))
            budget -= num_new + len(drafts)
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        num_batched = self.config.max_num_batched_tokens - budget
        prefill = sum(min(s.num_tokens, max(0, s.request.num_prompt_tokens - s.start)) for s in scheduled)
        return SchedulerOutput(tuple(scheduled), num_batched, tuple(preempted), prefill,
                               self.kv.queried_tokens - queried, self.kv.hit_tokens - hits,
                               self._prefix_groups(scheduled))

    def _prefix_groups(self, scheduled: list[ScheduledRequest]) -> tuple[PrefixGroup, ...]:
        """The KV manager's shared-prefix forest restricted to this step's requests."""
        if not self.config.shared_prefix_groups or len(scheduled) < 2:
            return ()
        ids = [s.request_id for s in scheduled]
        row = {rid: i for i, rid in enumerate(ids)}
        return tuple(PrefixGroup(p.start, len(p.block_ids) - p.start, tuple(row[r] for r in p.request_ids))
                     for p in self.kv.shared_prefixes(ids))

    def _drafts(self, req: Request, num_new: int, budget: int) -> tuple[int, ...]:
        """The request's drafts that fit: decoding only, within the token budget, and never
        past max_model_len or max_tokens (a fully accepted run commits k + 1 tokens)."""
        if not req.draft_token_ids or num_new != 1 or req.num_computed_tokens + 1 != req.num_tokens:
            return ()
        k = min(len(req.draft_token_ids), budget - 1, self.config.max_model_len - req.num_tokens - 1)
        if req.budget_left is not None:
            k = min(k, req.budget_left - 1)
        return tuple(req.draft_token_ids[:max(k, 0)])

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: list[str]) -> bool:
        while not self.kv.allocate(req, num_new):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        """Admit in (priority, arrival) order until budget, seats or blocks run out. An
        n > 1 sibling whose leader's prompt is not cached yet, or a request whose next
        prompt block a running request (admitted this step or before) is computing, is
        skipped, not a barrier: it is admitted once that block is cached, and shares it."""
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.pop()
            if self._must_wait_for_leader(req):
                skipped.append(req)
                continue
            cached = self.kv.find_cached_prefix(req)
            if self.kv.should_wait(req, len(cached)):  # a running request computes our next block
                skipped.append(req)
                continue
            num_computed = len(cached) * self.kv.block_size
            num_new = min(req.num_tokens - num_computed, budget)
            if not self.kv.allocate(req, num_new, cached):
                skipped.append(req)
                break
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_computed
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._entry(req, num_new))
            budget -= num_new
        for req in skipped:
            self.waiting.push(req)
        return budget

    def _must_wait_for_leader(self, req: Request) -> bool:
        """n > 1 siblings wait until the leader's prompt blocks are cached, then share them."""
        leader = req.prefix_leader
        if leader is None or not self.kv.enable_prefix_caching or leader.is_finished:
            return False
        if leader.status is RequestStatus.RUNNING and leader.num_computed_tokens < leader.num_prompt_tokens:
            return True
        return False

    def _entry(self, req: Request, num_new: int, drafts: tuple[int, ...] = ()) -> ScheduledRequest:
        start = req.num_computed_tokens
        parents = tuple(req.draft_parents[:len(drafts)]) if drafts else ()
        return ScheduledRequest(req, start, num_new + len(drafts),
                                tuple(self.kv.block_table(req.request_id)),
                                sample=start + num_new == req.num_tokens, draft_token_ids=drafts,
                                draft_parents=parents)

    # ---- results -------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[tuple[Request, list[int]]]:
        """Advance computed counts, append sampled tokens, register full blocks.
        Returns (request, new token ids) for requests that got tokens this step.

        Speculative entries: of the 1 + k computed positions, the committed token's and
        the a accepted drafts' KV is kept (a = produced - 1); the k - a rejected slots
        are rolled back (overwritten later) and blocks holding only them are released."""
        sampled = dict(zip(result.request_ids, result.sampled_token_ids))
        produced: list[tuple[Request, list[int]]] = []
        for entry in sched.scheduled:
            req = entry.request
            if req.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            new_ids = sampled.get(req.request_id)
            k = entry.num_draft_tokens
            accepted = max(len(new_ids) - 1, 0) if k and new_ids else 0
            req.num_computed_tokens += entry.num_tokens - k + accepted
            if new_ids:
                req.append_output(new_ids)  # before hashing: accepted drafts are in full blocks
                produced.append((req, new_ids))
            self.kv.cache_full_blocks(req)
            if k:
                self.kv.truncate(req)
        return produced

    def stats(self) -> tuple[int, int, float]:
        return len(self.running), len(self.waiting), self.kv.usage()

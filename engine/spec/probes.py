"""Start-up probes of the adaptive controller's cost model: timed model steps and draft
passes on scratch KV blocks (engine/setup.py times them through engine/spec/decoder.py).

Every probe row decodes its token plus per_row - 1 drafts after one shared ~128-token
context (like a prefix-cache hit), so a probe owns the context's blocks plus one block
per row, and every token samples, like a verification. A model drafter's passes are
probed the same way (one-token rows after the context: probes of rows at positions
0 .. B-1 of one request priced a 16-row pass at 13 ms where real ones took 19-20), and
its catch-up by one pass feeding the whole context.

The shared context is read once for all rows (shared-prefix attention), so those probes
price rows as if their context were free. What a row's own context costs
(`ContextCost`) is probed apart: CONTEXT_ROWS rows, each with its own context of
CONTEXT_TOKENS and of 3 x CONTEXT_TOKENS, at 1 and 1 + max_k tokens a row (and one
draft pass of those rows), the slowdown per context token being the rate.

Probes must leave the KV cache as a fresh one for the engine's speed afterwards:
  - The context is never computed, only read, so its blocks are zero-filled once first.
    Reading a never-written page maps the kernel's shared zero page there; the first real
    write to such a page then costs a copy-on-write fault with a TLB shootdown. Probes
    that read fresh context blocks each time left a B = 64 decode step 7% slower for the
    engine's whole run (90 -> 96 ms; 17% with every KV page read before written).
  - Blocks are freed with `reuse_first`, so each probe takes the blocks the last one
    used: the probes touch the pages of their largest shape only (the first requests
    take those same blocks), not pages all over the cache, and the pool's free order is
    as it was.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch

from engine.kv.manager import cdiv
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.sched.output import ScheduledRequest, SchedulerOutput
from engine.spec.decoder import best_time, measure_latency
from engine.spec.latency import ContextCost, LatencyModel

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 128  # each probe row's context, rounded up to whole blocks
DRAFT_PASS_ROWS = (1, 4, 16, 48)  # a model drafter's pass probes, whatever the batch size
CONTEXT_ROWS = 16  # rows of the context-cost probes (at most the engine's batch size)
LONG_CONTEXT = 3  # the context-cost probes' longer context, in CONTEXT_TOKENS


class ProbeScratch:
    """Scratch requests for the probes of one engine; use as a context manager (the
    shared context's blocks are held from enter to exit)."""

    def __init__(self, scheduler: Any, runner: Any):
        self.kv, self.runner = scheduler.kv, runner
        bs = self.kv.block_size
        self.context = bs * cdiv(CONTEXT_TOKENS, bs)  # whole blocks: each row's tokens start its own block
        self.tokens = self._tokens(self.context)
        self._shared: Request | None = None
        self._prefix: tuple[int, ...] = ()
        self._zeroed: set[int] = set()  # blocks zero-filled for an own-context probe

    def __enter__(self) -> "ProbeScratch":
        shared = Request("__latency_probe_context__", self.tokens[:self.context], SamplingParams(max_tokens=1))
        if self.kv.allocate(shared, self.context):
            self._shared = shared
            self._prefix = tuple(self.kv.block_table(shared.request_id))
            for memory in self._kv_memories():
                memory.zero_blocks(self._prefix)
        return self

    def _kv_memories(self) -> list:
        """The target's KV and a draft model's own (layerskip reads the target's)."""
        own = getattr(self.runner.model_drafter, "kv_memory", None)
        return [self.runner.kv_memory] + ([own] if own is not None else [])

    def __exit__(self, *exc) -> None:
        if self._shared is not None:
            self.kv.free(self._shared, reuse_first=True)
            self._shared = None

    def step(self, rows: int, per_row: int, temperature: float = 0.0, context: int = 0) -> bool:
        """One model step of `rows` rows of per_row tokens (greedy, or sampled at
        `temperature`) after the shared context, or each after its own `context`
        tokens; False when the KV pool has no room for it."""
        params = SamplingParams(max_tokens=1, temperature=temperature)
        start, tokens = (context, self._tokens(context)) if context else (self.context, self.tokens)
        reqs = [Request(f"__latency_probe_{i}__", tokens, params) for i in range(rows)]
        try:
            tables = self._own_blocks(reqs, per_row, context)  # blocks for positions start .. + per_row
            if tables is None:
                return False
            entries = tuple(ScheduledRequest(req, start, per_row, table, True,
                                             draft_token_ids=(7,) * (per_row - 1))
                            for req, table in zip(reqs, tables))
            self.runner.execute(SchedulerOutput(entries, rows * per_row))
            return True
        finally:
            self._release(reqs)

    def draft_pass(self, drafter: Any, num_rows: int, context: int = 0) -> bool:
        """One draft pass of `num_rows` one-token rows, each after the shared context or
        its own `context` tokens (a decode pass as the drafter runs it mid-generation);
        False without KV room."""
        return self._draft_rows(drafter, num_rows, lambda table: (table, context or self.context, 1), context)

    def catchup_pass(self, drafter: Any) -> bool:
        """One draft pass of one row feeding the whole context (a pass 0 catching up on a
        `context`-token backlog)."""
        return self._draft_rows(drafter, 1, lambda table: (table, 0, self.context))

    def _draft_rows(self, drafter: Any, num_rows: int, row, context: int = 0) -> bool:
        from engine.spec.model_drafter import decode_layout

        tokens = self._tokens(context) if context else self.tokens
        reqs = [Request(f"__draft_probe_{i}__", tokens, SamplingParams(max_tokens=1)) for i in range(num_rows)]
        try:
            tables = self._own_blocks(reqs, 1, context)
            if tables is None:
                return False
            cfg = self.runner.cfg
            layout, pos = decode_layout([row(t) for t in tables], cfg.cache.block_size, cfg.device)
            ids = torch.tensor([t % 1000 for t in range(len(pos))], device=cfg.device)
            with torch.inference_mode():
                drafter.forward(ids, pos, layout, torch.arange(num_rows, device=cfg.device))
            return True
        finally:
            self._release(reqs)

    @staticmethod
    def _tokens(context: int) -> list[int]:
        return [j % 1000 for j in range(context + 1)]

    def _own_blocks(self, reqs: list[Request], tokens: int, context: int = 0) -> list[tuple[int, ...]] | None:
        """Each request's block table: the shared context's blocks then its own block for
        `tokens` tokens, or (context > 0) its own blocks for `context` + `tokens` tokens, the
        context's zero-filled the first time (never read unwritten: see the module doc);
        None when the pool has no room (or the shared context did not fit)."""
        if self._shared is None:
            return None
        tables = []
        for req in reqs:
            if not self.kv.allocate(req, context + tokens):
                return None
            own = tuple(self.kv.block_table(req.request_id))
            if context:
                fresh = [b for b in own[:context // self.kv.block_size] if b not in self._zeroed]
                for memory in self._kv_memories():
                    memory.zero_blocks(fresh)
                self._zeroed.update(fresh)
            tables.append(own if context else self._prefix + own)
        return tables

    def _release(self, reqs: list[Request]) -> None:
        for req in reversed(reqs):  # the first request's blocks come back first (none: no-op)
            self.kv.free(req, reuse_first=True)
            if self.runner.model_drafter is not None:
                self.runner.model_drafter.forget(req.request_id)


def measure_draft_costs(scratch: ProbeScratch, drafter: Any, repeats: int = 4) -> tuple[LatencyModel, float | None]:
    """A model drafter's pass line D(B) over B one-token rows and its catch-up rate:
    seconds per backlog token a pass 0 feeds beyond its rows (None for a drafter on the
    target's KV: it never catches up). Rows go up to 48 whatever the engine's batch size
    (`DRAFT_PASS_ROWS`): the probes pin the line's slope (engine/spec/latency.py)."""
    line = measure_latency(lambda n: scratch.draft_pass(drafter, n), DRAFT_PASS_ROWS, repeats, what="draft pass")
    if not drafter.keeps_kv:
        return line, None
    seconds = best_time(lambda: scratch.catchup_pass(drafter), repeats)
    if seconds is None:
        rate = line.per_token
    elif seconds > line.predict(1):
        rate = (seconds - line.predict(1)) / (scratch.context - 1)
    else:  # the line's one-row pass caught an interruption: the whole pass per token, never free
        rate = seconds / scratch.context
    log.info("draft catch-up: %.3f ms per backlog token (a %d-token pass 0)", 1e3 * rate, scratch.context)
    return line, rate


def measure_context_cost(scratch: ProbeScratch, rows: int, queries: int, max_positions: int,
                         drafter: Any = None, repeats: int = 3) -> ContextCost:
    """What each row's own context adds (engine/spec/latency.py `ContextCost`): `rows`
    rows of 1 and of `queries` tokens, and a draft pass of `rows` rows with a model
    drafter, each row after its own CONTEXT_TOKENS and LONG_CONTEXT x CONTEXT_TOKENS
    context (whole blocks, within `max_positions`). A zero cost when the KV pool has no
    room for the probes or the model no positions for the longer context."""
    short, bs = scratch.context, scratch.kv.block_size
    extra = min(LONG_CONTEXT * short, bs * ((max_positions - queries) // bs)) - short
    if extra <= 0:
        log.info("context cost: no positions beyond %d for a longer context; priced at 0", short)
        return ContextCost()

    def slowdown(run) -> float | None:
        # Interleaved (short, long, short, ...), the best of each: all short probes and then
        # all long ones measured the VM's drift between the two (a suite run priced 0).
        best = [float("inf"), float("inf")]
        for _ in range(repeats):
            for i, c in enumerate((short, short + extra)):
                t = best_time(lambda: run(c), 1)
                if t is None:
                    return None
                best[i] = min(best[i], t)
        return best[1] - best[0]

    one = slowdown(lambda c: scratch.step(rows, 1, context=c))
    many = slowdown(lambda c: scratch.step(rows, queries, context=c))
    if one is None or many is None:
        log.info("context cost: no KV room for %d rows of %d tokens; priced at 0", rows, short + extra)
        return ContextCost()
    cost = ContextCost.fit(rows, extra, queries, (one, many))
    if drafter is not None:
        passed = slowdown(lambda c: scratch.draft_pass(drafter, rows, context=c))
        cost = replace(cost, draft_per_token=max(passed or 0.0, 0.0) / (rows * extra))
    log.info("context cost per own context token of a row: %.2f us + %.2f us x its query tokens; "
             "%.2f us in a draft pass (%d rows, contexts %d and %d)", 1e6 * cost.per_token,
             1e6 * cost.per_query_token, 1e6 * cost.draft_per_token, rows, short, short + extra)
    return cost

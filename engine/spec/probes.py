"""Start-up probes of the adaptive controller's cost model: timed model steps and draft
passes on scratch KV blocks (engine/setup.py times them through engine/spec/decoder.py).

Every probe row decodes its token plus per_row - 1 drafts after one shared ~128-token
context (like a prefix-cache hit), so a probe owns the context's blocks plus one block
per row, and every token samples, like a verification.

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

from typing import Any

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.sched.output import ScheduledRequest, SchedulerOutput

CONTEXT_TOKENS = 128  # each probe row's context, rounded up to whole blocks


class ProbeScratch:
    """Scratch requests for the probes of one engine; use as a context manager (the
    shared context's blocks are held from enter to exit)."""

    def __init__(self, scheduler: Any, runner: Any):
        self.kv, self.runner = scheduler.kv, runner
        bs = self.kv.block_size
        self.context = bs * -(-CONTEXT_TOKENS // bs)  # whole blocks: each row's tokens start its own block
        self.tokens = [j % 1000 for j in range(self.context + 1)]
        self._shared: Request | None = None
        self._prefix: tuple[int, ...] = ()

    def __enter__(self) -> "ProbeScratch":
        shared = Request("__latency_probe_context__", self.tokens[:self.context], SamplingParams(max_tokens=1))
        if self.kv.allocate(shared, self.context):
            self._shared = shared
            self._prefix = tuple(self.kv.block_table(shared.request_id))
            self.runner.kv_memory.zero_blocks(self._prefix)
        return self

    def __exit__(self, *exc) -> None:
        if self._shared is not None:
            self.kv.free(self._shared, reuse_first=True)
            self._shared = None

    def step(self, rows: int, per_row: int, temperature: float = 0.0) -> bool:
        """One model step of `rows` rows of per_row tokens (greedy, or sampled at
        `temperature`); False when the KV pool has no room for it."""
        if self._shared is None:
            return False
        params = SamplingParams(max_tokens=1, temperature=temperature)
        reqs = [Request(f"__latency_probe_{i}__", self.tokens, params) for i in range(rows)]
        allocated: list[Request] = []
        try:
            entries = []
            for req in reqs:
                if not self.kv.allocate(req, per_row):  # blocks for positions context .. + per_row
                    return False
                allocated.append(req)
                entries.append(ScheduledRequest(req, self.context, per_row,
                                                self._prefix + tuple(self.kv.block_table(req.request_id)),
                                                True, draft_token_ids=(7,) * (per_row - 1)))
            self.runner.execute(SchedulerOutput(tuple(entries), rows * per_row))
            return True
        finally:
            for req in reversed(allocated):  # the first row's blocks come back first
                self.kv.free(req, reuse_first=True)
                if self.runner.model_drafter is not None:
                    self.runner.model_drafter.forget(req.request_id)

    def draft_pass(self, drafter: Any, num_rows: int) -> None:
        """One draft pass of `num_rows` one-token rows at positions 0 .. num_rows - 1 of one
        request (each row writes its slot before any row reads it)."""
        from engine.spec.model_drafter import decode_layout

        req = Request("__draft_probe__", [i % 1000 for i in range(num_rows)], SamplingParams(max_tokens=1))
        if not self.kv.allocate(req, num_rows):
            return
        try:
            blocks = tuple(self.kv.block_table(req.request_id))
            cfg = drafter.runner.cfg
            layout, pos = decode_layout([(blocks, i, 1) for i in range(num_rows)], cfg.cache.block_size, cfg.device)
            with torch.inference_mode():
                drafter.forward(torch.tensor(req.token_ids, device=cfg.device), pos, layout)
        finally:
            self.kv.free(req, reuse_first=True)

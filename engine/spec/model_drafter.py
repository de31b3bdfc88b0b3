"""Drafters that run a model inside the step: `layerskip` (the target with layers skipped)
and `draft` (a separate model with the same tokenizer).

Before scheduling they propose k PENDING placeholders per decoding request (the
controller picks k, the scheduler budgets and allocates 1 + k slots as for any
drafter). At the start of the runner's step, `draft()` replaces the
placeholders: pass 0 feeds each drafting request's last committed token, pass
j its draft j - 1, each a one-token-per-request decode through the draft model
writing its KV into the slots the scheduler allocated for this step; draft j
is the argmax of pass j's logits (q one-hot, so verification is the exact match
of `engine.spec.verify`, lossless whatever the draft model computes), except for
unseeded sampled requests, whose drafts are drawn from q (the draft logits under
the request's sampling parameters) and verified by rejection sampling
(`engine.spec.rejection`) against the target's p. The
drafted ids come to the host once, after the last pass (the verify batch needs
them for its penalties): the step's one extra sync with a model drafter.

layerskip: the draft reads and writes the target's own KV in the layers it
keeps; the verify pass then rewrites every drafted slot in every layer, so
nothing the draft wrote survives. draft: the draft model has its own KV
tensors, indexed by the target's block ids (one allocation covers both). Its
KV must cover every committed token, so pass 0 also catches up on the tokens
it has not seen yet (the prompt, and the last accepted draft after a step that
accepted all k): `_computed[request]` is where the draft model's valid KV ends.
Stale draft KV only lowers acceptance, never changes outputs. With `shared_kv`
(the target's own checkpoint as its draft, e.g. on q8 activations) the draft
model reads and writes the target's KV as layerskip does: it attends over the
target's KV of every committed token, so it never catches up, and what it
writes into this step's slots the verify pass rewrites.
"""
from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine.attention import AttentionShape, BatchLayout, build_layout, create_backend
from engine.runner.kv_memory import KVMemory
from engine.sample import Sampler, SamplingRow, build_sampling_metadata
from engine.sched.output import ScheduledRequest, SchedulerOutput
from engine.spec.base import Drafter, register_drafter

PENDING = -1  # a draft the runner's draft model fills in this step


@dataclass(frozen=True)
class DraftPass:
    num_tokens: int
    seconds: float
    rows: int  # requests in the pass (num_tokens > rows: pass 0 fed a backlog)
    context: int = 0  # the rows' context tokens before their first token, summed


def decode_layout(rows: Sequence[tuple[tuple[int, ...], int, int]], page: int, device: torch.device
                  ) -> tuple[BatchLayout, torch.Tensor]:
    """rows: (block ids, first position, num tokens) per request, the tokens at positions
    [first, first + n) attending causally to everything before -> (layout, positions)."""
    q_lens = [n for _, _, n in rows]
    kv_lens = [first + n for _, first, n in rows]
    kvp, indices = [0], []
    for (blocks, _, _), kv_len in zip(rows, kv_lens):
        pages = -(-kv_len // page)
        indices.extend(blocks[:pages])
        kvp.append(kvp[-1] + pages)
    return build_layout(q_lens, kv_lens, kvp, indices, page, device)


class ModelDrafter(Drafter):
    """Base of the in-step drafters; `attach(runner)` binds it to the target's runner."""
    needs_runner = True

    def __init__(self) -> None:
        self.runner = None
        self._q: dict[int, list[torch.Tensor]] = {}  # this draft() call: entry -> q of each pass

    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        return [PENDING] * k

    def attach(self, runner) -> None:
        self.runner = runner

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One draft pass: ids/positions [n] -> fp32 logits [n, vocab], or [len(logit_rows),
        vocab] of those rows only (pass 0: a catch-up's tokens need KV, not logits)."""

    def first_rows(self, entries: Sequence[ScheduledRequest]) -> list[tuple[int, int]]:
        """Per drafting request, (first position, num tokens) of pass 0: its last committed token."""
        return [(e.start, 1) for e in entries]

    def committed(self, entry: ScheduledRequest, accepted: int) -> None:
        """After verification: `accepted` of the entry's drafts were kept."""

    def scheduled(self, entries: Sequence[ScheduledRequest]) -> None:
        """Sees every scheduled request of every step, drafting or not."""

    @staticmethod
    def stochastic(req) -> bool:
        """Drafts drawn from q (verified by rejection sampling): unseeded sampled requests
        without logprobs. The rest take the argmax (q one-hot, exact-match verification),
        so seeded requests give the same tokens for every k."""
        return not req.params.greedy and req.seed is None and req.params.logprobs is None

    @torch.inference_mode()
    def draft(self, sched: SchedulerOutput) -> tuple[SchedulerOutput, tuple[DraftPass, ...], dict]:
        """sched with every PENDING draft replaced by the draft model's tokens, the passes'
        timings and, per stochastic request id, q of its drafts [k, vocab]."""
        self.scheduled(sched.scheduled)
        idx = [i for i, e in enumerate(sched.scheduled) if e.draft_token_ids[:1] == (PENDING,)]
        if not idx:
            return sched, (), {}
        entries = [sched.scheduled[i] for i in idx]
        self._q = {r: [] for r, e in enumerate(entries) if self.stochastic(e.request)}
        ks = torch.tensor([e.num_draft_tokens for e in entries])  # [R]
        page, dev = self.runner.cfg.cache.block_size, self.runner.cfg.device
        drafts = torch.zeros(len(entries), int(ks.max()), dtype=torch.long, device=dev)  # [R, K]
        passes = []
        rows0 = self.first_rows(entries)
        ids0 = torch.tensor([t for e, (first, n) in zip(entries, rows0)
                             for t in e.request.token_ids[first:first + n]], dtype=torch.long, device=dev)
        last0 = torch.tensor(rows0)[:, 1].cumsum(0) - 1  # [R] row of each request's last pass-0 token
        t0 = time.perf_counter()
        layout, pos = decode_layout([(e.block_ids, f, n) for e, (f, n) in zip(entries, rows0)], page, dev)
        drafts[:, 0] = self._pick(self.forward(ids0, pos, layout, last0.to(dev)), entries, range(len(entries)))
        passes.append(DraftPass(len(ids0), time.perf_counter() - t0, len(entries), sum(f for f, _ in rows0)))
        for j in range(1, drafts.shape[1]):
            t0 = time.perf_counter()
            active = (ks > j).nonzero().flatten().tolist()  # host: ks is a host tensor
            rows = [(entries[r].block_ids, entries[r].start + j, 1) for r in active]
            layout, pos = decode_layout(rows, page, dev)
            sel = torch.tensor(active, device=dev)
            drafts[sel, j] = self._pick(self.forward(drafts[sel, j - 1], pos, layout), entries, active)
            passes.append(DraftPass(len(active), time.perf_counter() - t0, len(active),
                                    sum(entries[r].start + j for r in active)))
        host = drafts.tolist()  # the model drafter's sync: drafted ids to the host
        scheduled = list(sched.scheduled)
        for i, e, row in zip(idx, entries, host):
            scheduled[i] = replace(e, draft_token_ids=tuple(row[:e.num_draft_tokens]))
        q = {entries[r].request_id: torch.stack(rows) for r, rows in self._q.items()}
        return replace(sched, scheduled=tuple(scheduled)), tuple(passes), q

    def _pick(self, logits: torch.Tensor, entries: Sequence[ScheduledRequest], rows: Sequence[int]
              ) -> torch.Tensor:
        """The next draft of each entry in `rows` from its pass logits [n, vocab]: the argmax,
        or for a stochastic request a draw from q = its sampling distribution (temperature,
        top-k/top-p/min-p, penalties over its committed output) of the draft logits, q kept."""
        ids = logits.argmax(-1)  # [n]
        sel = [i for i, r in enumerate(rows) if r in self._q]
        if not sel:
            return ids
        reqs = [entries[rows[i]].request for i in sel]
        meta = build_sampling_metadata([SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids,
                                                    None, r.eos_token_ids, r.request_id) for r in reqs],
                                       logits.shape[-1], logits.device)
        q = Sampler.probs(logits[sel], meta)  # [s, vocab]
        ids[sel] = (q / torch.empty_like(q).exponential_()).argmax(-1)  # a draw from q
        for i, row_q in zip(sel, q):
            self._q[rows[i]].append(row_q)
        return ids


def _run_layers(model, layer_ids: Sequence[int], input_ids, positions, attn, caches,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
    x = model.embed_tokens(input_ids)
    rope = model.rotary.lookup(positions, x.dtype)
    for i in layer_ids:
        x = model.layers[i](x, rope, attn, caches[i])
    return model.compute_logits(x if logit_rows is None else x[logit_rows])


def kept_layers(num_layers: int, keep: float) -> list[int]:
    """`keep` of the layers, evenly spread, always the first and the last."""
    n = max(2, min(num_layers, round(num_layers * keep)))
    if n >= num_layers:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


@register_drafter("layerskip")
class LayerSkipDrafter(ModelDrafter):
    """The target with a subset of its layers (SWIFT-style self-speculation, no extra weights)."""

    def __init__(self, keep: float = 0.5):
        super().__init__()
        self.keep = keep
        self.layers: list[int] = []

    def attach(self, runner) -> None:
        super().attach(runner)
        self.layers = kept_layers(len(runner.kv_caches), self.keep)

    def forward(self, input_ids, positions, layout, logit_rows=None):
        self.runner.attn.plan(layout)
        return _run_layers(self.runner.model, self.layers, input_ids, positions, self.runner.attn,
                           self.runner.kv_caches, logit_rows)


@register_drafter("draft")
class DraftModelDrafter(ModelDrafter):
    """A separate draft model (same tokenizer); its KV tensors use the target's block ids, or
    are the target's (`shared_kv`: no KV of its own, nothing to catch up on)."""

    def __init__(self, model=None, model_config=None, attention_backend: str | None = None,
                 shared_kv: bool = False):
        super().__init__()
        self.model, self.model_config = model, model_config
        self.attention_backend = attention_backend  # None: the target runner's
        self.shared_kv = shared_kv
        self.kv_memory: KVMemory | None = None  # own KV only
        self.kv_caches: list[torch.Tensor] = []
        self.attn = None
        self._computed: dict[str, int] = {}  # request id -> tokens with valid draft KV (own KV)

    @property
    def keeps_kv(self) -> bool:
        return not self.shared_kv  # own KV: it must catch up on every committed token

    def attach(self, runner) -> None:
        super().attach(runner)
        m, c = self.model_config, runner.cfg.cache
        if self.shared_kv:
            self.kv_caches = runner.kv_caches
        else:
            self.kv_memory = KVMemory(m.num_layers, (c.num_blocks, 2, c.block_size, m.num_kv_heads, m.head_dim),
                                      runner.cfg.dtype, runner.cfg.device)
            self.kv_caches = self.kv_memory.layers
        shape = AttentionShape(m.num_heads, m.num_kv_heads, m.head_dim, m.head_dim ** -0.5,
                               runner.cfg.dtype, runner.cfg.device)
        self.attn = create_backend(self.attention_backend or runner.cfg.attention_backend, shape)

    def first_rows(self, entries):
        # Pass 0 catches up on the backlog, then feeds the last committed token.
        return [(e.start - b, b + 1) for e in entries for b in (self.backlog(e.request_id, e.start),)]

    def backlog(self, request_id: str, num_computed_tokens: int) -> int:
        # Tokens from where this request's draft KV ends up to its last committed token
        # (never past the target's start: after a preemption the target recomputes, and
        # so does the draft). Shared KV: the target's covers them all.
        if self.shared_kv:
            return 0
        return num_computed_tokens - min(self._computed.get(request_id, 0), num_computed_tokens)

    def forward(self, input_ids, positions, layout, logit_rows=None):
        self.attn.plan(layout)
        return _run_layers(self.model, range(len(self.kv_caches)), input_ids, positions, self.attn,
                           self.kv_caches, logit_rows)

    def scheduled(self, entries) -> None:
        # The target recomputing below our mark (after a preemption, into fresh blocks)
        # invalidates the draft KV from there on.
        if self.shared_kv:
            return
        for e in entries:
            mark = self._computed.get(e.request_id)
            if mark is not None and e.start < mark:
                self._computed[e.request_id] = e.start

    def committed(self, entry: ScheduledRequest, accepted: int) -> None:
        # Pass j wrote position start + j (j < k); the accepted ones hold committed tokens.
        if self.shared_kv:
            return  # the verify pass rewrote them in the target's KV
        self._computed[entry.request_id] = entry.start + 1 + min(accepted, entry.num_draft_tokens - 1)

    def forget(self, request_id: str) -> None:
        self._computed.pop(request_id, None)

    def preempted(self, request_id: str) -> None:
        # While the request waits, where the target will restart (its prefix-cache hit) is
        # unknown; a kept mark would price its catch-up as if our KV survived. From 0, as a
        # new request with a prefix hit catches up.
        self._computed.pop(request_id, None)

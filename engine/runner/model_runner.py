"""Model runner: SchedulerOutput -> one flattened, unpadded batch -> forward -> sample.

Per step: build input ids, positions, slot mapping and the CSR page table once;
`plan()` the attention backend once; run every layer; compute logits only at
rows that sample; sample on the device. The one host sync of the step is the
`.tolist()` of sampled ids (and their logprobs) at the end of `execute()`;
speculative requests (1 + k sampled rows each) are verified there, on the
host, by `accept_drafts` (a loop over at most k + 1 ids per request). A model
drafter (`engine.spec.model_drafter`) first runs its draft passes and brings
the drafted ids to the host (its own documented sync) before the batch is built.
"""
from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttentionShape, BatchLayout, build_layout, create_backend
from engine.config import CacheConfig, ModelConfig
from engine.errors import RequestFault
from engine.sample import Sampler, SamplingRow, build_sampling_metadata, position_seed
from engine.sched.output import ModelRunnerOutput, SchedulerOutput
from engine.spec.verify import accept_drafts
from engine.structured.bitmask import BitmaskFiller


@dataclass(frozen=True)
class RunnerConfig:
    model: ModelConfig
    cache: CacheConfig
    dtype: torch.dtype
    device: torch.device
    attention_backend: str = "auto"


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    layout: BatchLayout
    sample_index: torch.Tensor  # [num_sampled] row of the flattened batch whose logits are sampled
    rows: list[SamplingRow]
    sampled_ids: list[str]  # per sampling request
    matchers: list  # GrammarMatcher or None per sampled row
    row_drafts: list  # per sampled row: the request's drafts on its first row, else ()
    drafts: list[tuple[int, ...]]  # per sampling request; it owns 1 + len(drafts) rows


class _WithDrafts(Sequence):
    """output ids + the drafts before a position, without copying the output (penalties
    at draft position i count the i drafts before it)."""

    def __init__(self, base: Sequence[int], extra: Sequence[int]):
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        n = len(self.base)
        if i < 0:
            i += len(self)
        return self.base[i] if i < n else self.extra[i - n]

    def __iter__(self):
        yield from self.base
        yield from self.extra


def noise_seed(req, offset: int) -> int | None:
    """The noise key of the request's output token `num_output_tokens + offset`."""
    return None if req.seed is None else position_seed(req.seed, req.num_output_tokens + offset)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: RunnerConfig):
        self.model = model
        self.cfg = cfg
        m, c = cfg.model, cfg.cache
        # Per layer [num_blocks, 2, block_size, num_kv_heads, head_dim] (NHD), shared by all backends.
        self.kv_caches = [torch.zeros(c.num_blocks, 2, c.block_size, m.num_kv_heads, m.head_dim,
                                      dtype=cfg.dtype, device=cfg.device) for _ in range(m.num_layers)]
        shape = AttentionShape(m.num_heads, m.num_kv_heads, m.head_dim, m.head_dim ** -0.5, cfg.dtype, cfg.device)
        self.attn = create_backend(cfg.attention_backend, shape)
        self.sampler = Sampler()
        self.bitmasks = BitmaskFiller(m.vocab_size, cfg.device)
        self.model_drafter = None  # engine.spec.model_drafter.ModelDrafter, set by attach()

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run the step and return fp32 logits at every scheduled token [num_tokens, vocab]
        (no sampling; tests and prompt logprobs)."""
        batch = self._prepare(sched)
        return self.model.compute_logits(self._forward(batch))

    def _forward(self, batch: "_Batch") -> torch.Tensor:
        self.attn.plan(batch.layout)
        return self.model(batch.input_ids, batch.positions, self.attn, self.kv_caches)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        draft_passes = ()
        if self.model_drafter is not None:  # fill the PENDING drafts first
            sched, draft_passes = self.model_drafter.draft(sched)
        batch = self._prepare(sched)
        # Grammar masks are filled on a helper thread while the forward pass runs.
        pending = self.bitmasks.start(batch.matchers, [r.request_id for r in batch.rows], batch.row_drafts)
        try:
            hidden = self._forward(batch)
        except BaseException:
            if pending is not None:  # the matchers must be idle before anyone touches them again
                concurrent.futures.wait([pending])
            raise
        grammar = pending.result() if pending is not None else None  # RequestFault: that request
        if not batch.rows:
            return ModelRunnerOutput((), ())
        logits = self.model.compute_logits(hidden[batch.sample_index])  # [num_sampled, vocab] fp32
        meta = build_sampling_metadata(batch.rows, logits.shape[-1], logits.device)
        out = self.sampler(logits, meta, grammar)
        # The step's single host sync: sampled ids (and logprobs) come back here.
        ids = out.sampled_token_ids.tolist()
        logprobs = self._logprobs_to_host(out, batch.rows)
        produced, per_request_lp, row = [], [], 0
        for drafts, lp in zip(batch.drafts, self._group_logprobs(logprobs, batch.drafts)):
            kept = accept_drafts(drafts, ids[row:row + len(drafts) + 1]) if drafts else [ids[row]]
            produced.append(kept)
            per_request_lp.append(None if lp is None else tuple(x[:len(kept)] for x in lp))
            row += len(drafts) + 1
        if self.model_drafter is not None:
            sampled = [e for e in sched.scheduled if e.sample]
            for entry, kept in zip(sampled, produced):
                if entry.num_draft_tokens:
                    self.model_drafter.committed(entry, len(kept) - 1)
        return ModelRunnerOutput(tuple(batch.sampled_ids), tuple(produced),
                                 tuple(per_request_lp) if logprobs else (), draft_passes)

    def _prepare(self, sched: SchedulerOutput) -> _Batch:
        """Per-request scalars are gathered in Python; per-token arrays are built with
        tensor ops (no per-token Python loop)."""
        page = self.cfg.cache.block_size
        tokens: list[int] = []
        q_lens, kv_lens, kvp, indices = [], [], [0], []
        sample_index, rows, sampled_ids, matchers, all_drafts, row_drafts = [], [], [], [], [], []
        for s in sched.scheduled:
            req, start, n = s.request, s.start, s.num_tokens
            num_pages = -(-(start + n) // page)
            if len(s.block_ids) < num_pages or start + n - s.num_draft_tokens > req.num_tokens:
                raise RequestFault(req.request_id, ValueError(
                    f"scheduled tokens [{start}, {start + n}) exceed its {req.num_tokens} tokens "
                    f"or {len(s.block_ids)} blocks"))
            drafts = s.draft_token_ids
            tokens.extend(req.token_ids[start:start + n - len(drafts)])
            tokens.extend(drafts)
            indices.extend(s.block_ids[:num_pages])
            kvp.append(kvp[-1] + num_pages)
            q_lens.append(n)
            kv_lens.append(start + n)
            if s.sample:
                k = len(drafts)
                for i in range(k + 1):  # the committed token's position, then each draft's
                    sample_index.append(len(tokens) - 1 - k + i)
                    out_ids = _WithDrafts(req.output_token_ids, drafts[:i]) if i else req.output_token_ids
                    rows.append(SamplingRow(req.params, req.prompt_token_ids, out_ids,
                                            noise_seed(req, i), req.eos_token_ids, req.request_id))
                    matchers.append(req.matcher)  # drafted: row i masked after drafts[:i]
                    row_drafts.append(drafts if i == 0 else ())
                sampled_ids.append(req.request_id)
                all_drafts.append(drafts)
        dev = self.cfg.device
        layout, positions = build_layout(q_lens, kv_lens, kvp, indices, page, dev)
        return _Batch(torch.tensor(tokens, dtype=torch.long, device=dev), positions, layout,
                      torch.tensor(sample_index, dtype=torch.long, device=dev), rows, sampled_ids, matchers,
                      row_drafts, all_drafts)

    @staticmethod
    def _group_logprobs(per_row: tuple, drafts: list[tuple[int, ...]]) -> list:
        """Per-row logprob tuples -> per request: the 1 + k rows' lists concatenated."""
        if not per_row:
            return [None] * len(drafts)
        grouped, row = [], 0
        for d in drafts:
            rows = per_row[row:row + len(d) + 1]
            row += len(d) + 1
            grouped.append(None if rows[0] is None else
                           tuple(sum((list(r[j]) for r in rows), []) for j in range(4)))
        return grouped

    @staticmethod
    def _logprobs_to_host(out, rows: list[SamplingRow]):
        if out.logprobs is None:
            return ()
        lp, ranks = out.logprobs.tolist(), out.sampled_ranks.tolist()
        top_ids, top_lp = out.topk_token_ids.tolist(), out.topk_logprobs.tolist()
        result = []
        for i, row in enumerate(rows):
            k = row.params.logprobs
            if k is None:
                result.append(None)
                continue
            result.append(([lp[i]], [ranks[i]], [top_ids[i][:k]], [top_lp[i][:k]]))
        return tuple(result)

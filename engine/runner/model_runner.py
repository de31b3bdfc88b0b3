"""Model runner: SchedulerOutput -> one flattened, unpadded batch -> forward -> sample.

Per step: build input ids, positions, slot mapping and the CSR page table once;
`plan()` the attention backend once; run every layer; compute logits only at
rows that sample; sample on the device. The one host sync of the step is the
`.tolist()` of sampled ids (and their logprobs) at the end of `execute()`;
speculative requests (1 + k sampled rows each) are verified there, on the
host, by `accept_tree` (a walk over at most k + 1 ids per request; a chain is
the one-child tree), and a tree's accepted path has its KV moved into place;
drafts a model drafter drew from a distribution q are verified by rejection
sampling against the target's p instead (`engine.spec.rejection`).
When a drafter learns from the logits (`logit_topk` > 0: Token Recycling), each
sampled row's top ids come back with the same sync. A model
drafter (`engine.spec.model_drafter`) first runs its draft passes and brings
the drafted ids to the host (its own documented sync) before the batch is built.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttentionShape, BatchLayout, build_layout, create_backend
from engine.attention.cascade import PrefixLevel
from engine.config import CacheConfig, ModelConfig
from engine.errors import RequestFault
from engine.runner.kv_memory import KVMemory
from engine.sample import Sampler, SamplingRow, build_sampling_metadata, position_seed
from engine.sched.output import ModelRunnerOutput, SchedulerOutput
from engine.spec.rejection import DraftBatch, rejection_sample_torch
from engine.spec.tree import accept_tree, depths, is_chain, path_to, query_parents
from engine.structured.bitmask import BitmaskFiller


@dataclass(frozen=True)
class RunnerConfig:
    model: ModelConfig
    cache: CacheConfig
    dtype: torch.dtype
    device: torch.device
    attention_backend: str = "auto"
    shared_prefix_attention: str = "auto"  # engine.attention.cascade modes


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
    parents: list[tuple[int, ...]]  # per sampling request: its drafts' tree (() = chain)
    q_starts: list[int]  # per sampling request: its first row in the flattened batch


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
        self.kv_memory = KVMemory(m.num_layers, (c.num_blocks, 2, c.block_size, m.num_kv_heads, m.head_dim),
                                  cfg.dtype, cfg.device)
        self.kv_caches = self.kv_memory.layers
        shape = AttentionShape(m.num_heads, m.num_kv_heads, m.head_dim, m.head_dim ** -0.5, cfg.dtype, cfg.device)
        self.attn = create_backend(cfg.attention_backend, shape, cfg.shared_prefix_attention)
        self.sampler = Sampler()
        self.bitmasks = BitmaskFiller(m.vocab_size, cfg.device)
        self.model_drafter = None  # engine.spec.model_drafter.ModelDrafter, set by attach()
        self.logit_topk = 0  # > 0: return each sampled row's top ids (a drafter learns from them)

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
        draft_passes, draft_q = (), {}
        if self.model_drafter is not None:  # fill the PENDING drafts first
            sched, draft_passes, draft_q = self.model_drafter.draft(sched)
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
        shared = (len(self.attn.cascade.levels), len(batch.layout.prefix_levels),
                  self.attn.cascade.shared_tokens(batch.layout.page_size))
        if not batch.rows:
            return ModelRunnerOutput((), (), shared_prefix=shared)
        logits = self.model.compute_logits(hidden[batch.sample_index])  # [num_sampled, vocab] fp32
        top = logits.topk(self.logit_topk, dim=-1).indices if self.logit_topk else None  # [S, K]
        rejection = self._rejection_batch(batch, logits, draft_q) if draft_q else None
        meta = build_sampling_metadata(batch.rows, logits.shape[-1], logits.device)
        out = self.sampler(logits, meta, grammar)
        # The step's single host sync: sampled ids (and logprobs, top ids, the rejection
        # sampler's tokens) come back here.
        ids = out.sampled_token_ids.tolist()
        logprobs = self._logprobs_to_host(out, batch.rows)
        seen = None if top is None else (batch.input_ids[batch.sample_index].cpu(), top.cpu())
        stochastic = self._rejection_sample(rejection) if rejection is not None else {}
        produced, used_rows = self._verify(batch, ids, stochastic)
        per_request_lp = self._group_logprobs(logprobs, used_rows)
        if self.model_drafter is not None:
            sampled = [e for e in sched.scheduled if e.sample]
            for entry, kept in zip(sampled, produced):
                if entry.num_draft_tokens:
                    self.model_drafter.committed(entry, len(kept) - 1)
        return ModelRunnerOutput(tuple(batch.sampled_ids), tuple(produced), per_request_lp,
                                 draft_passes, seen, shared)

    def _verify(self, batch: "_Batch", ids: list[int], stochastic: dict[str, list[int]]
                ) -> tuple[list[list[int]], list[list[int]]]:
        """Per sampling request: the tokens it commits and the sampled rows they came from.
        Exact-match verification along the draft chain or tree (rejection-sampled requests
        come in `stochastic`); a tree's accepted path has its KV moved into place."""
        produced, used_rows, moves, row = [], [], [], 0
        for rid, drafts, parents, q_start in zip(batch.sampled_ids, batch.drafts, batch.parents, batch.q_starts):
            if rid in stochastic:
                kept, used = stochastic[rid], list(range(len(stochastic[rid])))
            else:
                kept, used = accept_tree(drafts, parents, ids[row:row + len(drafts) + 1])
            produced.append(kept)
            used_rows.append([row + u for u in used])
            moves.extend((q_start + u, q_start + depth) for depth, u in enumerate(used[1:], 1) if u != depth)
            row += len(drafts) + 1
        if moves:
            self._move_kv(batch.layout, moves)
        return produced, used_rows

    def _rejection_batch(self, batch: "_Batch", logits: torch.Tensor, draft_q: dict) -> tuple:
        """The DraftBatch of the requests whose drafts were drawn from q: the target's p at
        their 1 + k rows (the distribution plain sampling would use), their drafts and q."""
        rows, ids, qs, ks, row = [], [], [], [], 0
        for rid, drafts in zip(batch.sampled_ids, batch.drafts):
            if rid in draft_q:
                rows.extend(range(row, row + len(drafts) + 1))
                ids.extend(drafts)
                qs.append(draft_q[rid])
                ks.append(len(drafts))
            row += len(drafts) + 1
        dev = logits.device
        meta = build_sampling_metadata([batch.rows[r] for r in rows], logits.shape[-1], dev)
        p = self.sampler.probs(logits[rows], meta)  # [T, vocab]; logits[rows] is a copy
        draft_batch = DraftBatch(p, torch.cat(qs), torch.tensor(ids, dtype=torch.long, device=dev),
                                 torch.tensor(ks, dtype=torch.long, device=dev),
                                 torch.rand(len(ids), device=dev), torch.empty_like(p).exponential_())
        return [rid for rid in batch.sampled_ids if rid in draft_q], draft_batch

    @staticmethod
    def _rejection_sample(rejection: tuple) -> dict[str, list[int]]:
        """request id -> the tokens rejection sampling commits (accepted drafts + one)."""
        rids, draft_batch = rejection
        tokens, num_acc = rejection_sample_torch(draft_batch)
        tokens, num_acc = tokens.tolist(), num_acc.tolist()  # part of the step's sync
        return {rid: t[:a + 1] for rid, t, a in zip(rids, tokens, num_acc)}

    def _move_kv(self, layout: BatchLayout, moves: list[tuple[int, int]]) -> None:
        """Copy the KV of flattened rows src to the slots of rows dst, in every layer (a
        tree's accepted path into the slots a chain would have used). Every source is
        read before any destination is written (one gather, then one scatter), so a
        move's source may be another move's destination."""
        index = torch.tensor(moves, dtype=torch.long, device=layout.slot_mapping.device)  # [M, 2]
        slots = layout.slot_mapping[index]  # [M, 2]
        page = layout.page_size
        k_rows = self.attn.slot_k_rows(slots, page)
        src, dst = k_rows[:, 0], k_rows[:, 1]
        for cache in self.kv_caches:
            flat = self.attn.flat_rows(cache)
            flat[dst] = flat[src]  # K
            flat[dst + page] = flat[src + page]  # V

    def _prepare(self, sched: SchedulerOutput) -> _Batch:
        """Per-request scalars are gathered in Python; per-token arrays are built with
        tensor ops (no per-token Python loop)."""
        page = self.cfg.cache.block_size
        tokens: list[int] = []
        q_lens, kv_lens, kvp, indices = [], [], [0], []
        sample_index, rows, sampled_ids, matchers, all_drafts, row_drafts = [], [], [], [], [], []
        all_parents, q_starts, trees = [], [], {}
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
            parents = s.draft_parents if drafts and not is_chain(s.draft_parents) else ()
            if parents:
                trees[len(q_lens) - 1] = query_parents(parents, len(drafts))
            if s.sample:
                q_starts.append(len(tokens) - 1 - len(drafts))
                self._sampling_rows(req, drafts, parents, rows, matchers, row_drafts)
                sample_index.extend(range(q_starts[-1], len(tokens)))  # the root, then each draft
                sampled_ids.append(req.request_id)
                all_drafts.append(drafts)
                all_parents.append(parents)
        dev = self.cfg.device
        layout, positions = build_layout(q_lens, kv_lens, kvp, indices, page, dev, trees)
        if sched.prefix_groups:  # rows of the layout are the scheduled requests, in order
            layout = dataclasses.replace(layout, prefix_levels=tuple(
                PrefixLevel(g.first_block, g.num_blocks, g.rows) for g in sched.prefix_groups))
        return _Batch(torch.tensor(tokens, dtype=torch.long, device=dev), positions, layout,
                      torch.tensor(sample_index, dtype=torch.long, device=dev), rows, sampled_ids, matchers,
                      row_drafts, all_drafts, all_parents, q_starts)

    @staticmethod
    def _sampling_rows(req, drafts, parents, rows, matchers, row_drafts) -> None:
        """The request's 1 + k sampling rows: row i samples after the drafts on the path to
        query i (penalties count them; seeded noise is keyed by the output position)."""
        qparents = query_parents(parents, len(drafts))
        for i, depth in enumerate(depths(qparents)):
            path = [drafts[j - 1] for j in path_to(qparents, i)]
            out_ids = _WithDrafts(req.output_token_ids, path) if i else req.output_token_ids
            rows.append(SamplingRow(req.params, req.prompt_token_ids, out_ids,
                                    noise_seed(req, depth), req.eos_token_ids, req.request_id))
            matchers.append(req.matcher)  # drafted (chains only): row i masked after drafts[:i]
            row_drafts.append(drafts if i == 0 else ())

    @staticmethod
    def _group_logprobs(per_row: tuple, used_rows: list[list[int]]) -> tuple:
        """Per-row logprob tuples -> per request: the lists of the rows whose samples it
        committed, concatenated (() when no row asked)."""
        if not per_row:
            return ()
        grouped = []
        for used in used_rows:
            rows = [per_row[r] for r in used]
            grouped.append(None if rows[0] is None else
                           tuple(sum((list(r[j]) for r in rows), []) for j in range(4)))
        return tuple(grouped)

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

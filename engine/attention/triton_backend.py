"""Triton attention backend (CUDA): paged attention with log-sum-exp and the shared-prefix
cascade, on the kernels of `kernels/cascade_attention.py`.

Same contract as the torch reference (engine/attention/torch_ref.py). Per step, `plan()`
lists each request's own keys (all its KV, or the pages after its deepest decomposed
shared level) as a CSR over flat cache rows with their slot positions, each token's
request and slot, and the draft-tree masks; per decomposed level, its members' query
tokens and the level's key rows. `forward()` writes the new KV, runs the paged kernel
over the own keys, then per level the prefix kernel (the group's queries against the
level's KV, read once) and the exact LSE merge. Chosen by `--attention-backend triton`
or `auto` on CUDA; tested on CPU under TRITON_INTERPRET=1 against the torch backend
(tests/unit/test_triton_backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend, BatchLayout, register_backend


@dataclass(frozen=True)
class _OwnKeys:
    token_req: torch.Tensor  # [T] int32 request row of each token
    token_slot: torch.Tensor  # [T] int32 KV slot of each token
    key_indptr: torch.Tensor  # [R + 1] int32
    key_rows: torch.Tensor  # [K] int32 flat K row of each own key (V row = + page)
    key_slot: torch.Tensor  # [K] int32 slot position of each own key
    tree_start: torch.Tensor | None  # [R] int32 first query slot of a tree request, -1 otherwise
    tree_mask: torch.Tensor | None  # [T, max_q] int8 a tree token's ancestor row


@register_backend("triton")
class TritonBackend(AttentionBackend):
    def plan(self, layout: BatchLayout) -> None:
        page, dev = layout.page_size, self.shape.device
        self.write_rows = self.slot_k_rows(layout.slot_mapping, page)
        cascade = self.plan_levels(layout)
        own = cascade.own_first_page if cascade.active else (0,) * len(layout.q_lens)
        self.own = self._own_keys(layout, own, dev)
        qo = layout.qo_indptr.tolist()
        kv_ptr, pages = layout.kv_indptr.tolist(), layout.kv_indices.tolist()
        self.levels = []
        for lv in cascade.levels:
            q_index, rows = self.level_rows(lv, qo, kv_ptr, pages, page)
            self.levels.append((q_index.to(dev, torch.int32), rows.to(dev, torch.int32)))

    def _own_keys(self, layout: BatchLayout, own: tuple[int, ...], dev) -> _OwnKeys:
        page = layout.page_size
        q_lens = torch.tensor(layout.q_lens, dtype=torch.long)
        kv_lens = torch.tensor(layout.kv_lens, dtype=torch.long)
        rows = torch.arange(len(layout.q_lens))
        token_req = torch.repeat_interleave(rows, q_lens)  # [T]
        qo = layout.qo_indptr.to("cpu", torch.long)
        token_slot = torch.arange(int(qo[-1])) - qo[token_req] + (kv_lens - q_lens)[token_req]
        first = torch.tensor(own, dtype=torch.long) * page  # [R] first own slot
        counts = kv_lens - first
        key_indptr = torch.zeros(len(own) + 1, dtype=torch.long)
        key_indptr[1:] = counts.cumsum(0)
        key_req = torch.repeat_interleave(rows, counts)
        key_slot = torch.arange(int(key_indptr[-1])) - key_indptr[key_req] + first[key_req]
        kv_ptr = layout.kv_indptr.to("cpu", torch.long)
        blocks = layout.kv_indices.to("cpu", torch.long)[kv_ptr[key_req] + key_slot // page]
        key_rows = self.k_rows(blocks, key_slot % page, page)
        tree_start = tree_mask = None
        if layout.tree_masks:
            tree_start = torch.full((len(own),), -1, dtype=torch.long)
            tree_mask = torch.zeros(int(qo[-1]), max(m.shape[0] for _, m in layout.tree_masks), dtype=torch.int8)
            for i, mask in layout.tree_masks:
                tree_start[i] = layout.kv_lens[i] - layout.q_lens[i]
                tree_mask[int(qo[i]):int(qo[i + 1]), :mask.shape[1]] = mask.to(torch.int8)
            tree_start, tree_mask = tree_start.to(dev, torch.int32), tree_mask.to(dev)
        i32 = dict(device=dev, dtype=torch.int32)
        return _OwnKeys(token_req.to(**i32), token_slot.to(**i32), key_indptr.to(**i32),
                        key_rows.to(**i32), key_slot.to(**i32), tree_start, tree_mask)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        from kernels.cascade_attention import merge_lse_, paged_attention_lse, prefix_attention_lse

        self.write_kv(kv_cache, k, v, self.write_rows)
        o = self.own
        out, lse = paged_attention_lse(q, kv_cache, self.shape.scale, o.token_req, o.token_slot, o.key_indptr,
                                       o.key_rows, o.key_slot, o.tree_start, o.tree_mask)
        for q_index, key_rows in self.levels:
            part_out, part_lse = prefix_attention_lse(q, kv_cache, self.shape.scale, q_index, key_rows)
            merge_lse_(out, lse, part_out, part_lse, q_index)
        return out

"""Torch reference attention backend: the CPU path and the oracle for GPU backends.

Exact for any mix of prefill chunks and decodes: each request's queries attend
causally (aligned to the end of its KV sequence) to its cached prefix and to
the new tokens (a draft tree's queries to their ancestors only, by the
layout's tree mask). Requests are grouped by query length class (powers of
two: decodes, q_len == 1, then 2, 3-4, 5-8, ...) and each group runs as one
padded SDPA call over KV gathered from the pages, so queries pad at most 2x
(a verification of 1 + k queries never pads to a prefill chunk) and a step
costs one attention call per class present per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, BatchLayout, register_backend


@dataclass(frozen=True)
class _Group:
    q_index: torch.Tensor  # [n, max_q] flattened token index per padded query (0 for padding)
    q_valid: torch.Tensor  # [n, max_q] bool
    k_rows: torch.Tensor  # [n * max_kv] flat cache row of each padded key (V row = + page)
    mask: torch.Tensor  # [n, 1, max_q, max_kv] bool: True = attend


@register_backend("torch")
class TorchReferenceBackend(AttentionBackend):
    def plan(self, layout: BatchLayout) -> None:
        device = self.shape.device
        page = layout.page_size
        self.write_rows = self.slot_k_rows(layout.slot_mapping, page)
        qo = layout.qo_indptr.tolist()  # host tensors at plan time; not a device sync on CPU
        kv_ptr = layout.kv_indptr.tolist()
        pages = layout.kv_indices.tolist()
        # Rows grouped by query-length class (1, 2, 3-4, 5-8, ...): a group pads its queries
        # to its longest, so a verification (1 + k queries) never pads to a prefill chunk.
        classes: dict[int, list[int]] = {}
        for i, q in enumerate(layout.q_lens):
            classes.setdefault((q - 1).bit_length(), []).append(i)
        trees = dict(layout.tree_masks)
        self.groups = [self._group(rows, layout, qo, kv_ptr, pages, trees, device)
                       for _, rows in sorted(classes.items())]

    @staticmethod
    def _group(rows, layout, qo, kv_ptr, pages, trees, device) -> _Group:
        page = layout.page_size
        max_q = max(layout.q_lens[i] for i in rows)
        max_kv = max(layout.kv_lens[i] for i in rows)
        n = len(rows)
        q_index = torch.zeros(n, max_q, dtype=torch.long)
        q_valid = torch.zeros(n, max_q, dtype=torch.bool)
        kv_block = torch.zeros(n, max_kv, dtype=torch.long)
        kv_offset = torch.zeros(n, max_kv, dtype=torch.long)
        mask = torch.zeros(n, max_q, max_kv, dtype=torch.bool)
        for r, i in enumerate(rows):
            q_len, kv_len = layout.q_lens[i], layout.kv_lens[i]
            q_index[r, :q_len] = torch.arange(qo[i], qo[i] + q_len)
            q_valid[r, :q_len] = True
            pos = torch.arange(kv_len)
            req_pages = torch.tensor(pages[kv_ptr[i]:kv_ptr[i + 1]], dtype=torch.long)
            kv_block[r, :kv_len] = req_pages[pos // page]
            kv_offset[r, :kv_len] = pos % page
            q_pos = torch.arange(kv_len - q_len, kv_len)
            mask[r, :q_len, :kv_len] = pos[None, :] <= q_pos[:, None]
            if i in trees:  # a draft tree: ancestors only among the query tokens
                mask[r, :q_len, kv_len - q_len:kv_len] = trees[i]
            mask[r, q_len:, 0] = True  # padded queries attend to one key: no NaN rows
        k_rows = AttentionBackend.k_rows(kv_block, kv_offset, page).view(-1)
        return _Group(q_index.to(device), q_valid.to(device),
                      k_rows.to(device), mask[:, None].to(device))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        self.write_kv(kv_cache, k, v, self.write_rows)
        flat, page = self.flat_rows(kv_cache), kv_cache.shape[2]
        out = torch.empty_like(q)  # [num_tokens, num_heads, head_dim]
        for g in self.groups:
            n = g.q_index.shape[0]
            qg = q[g.q_index].transpose(1, 2)  # [n, heads, max_q, d]
            kv_shape = (n, -1, flat.shape[1], flat.shape[2])
            kg = flat.index_select(0, g.k_rows).view(kv_shape).transpose(1, 2)  # [n, kv_heads, max_kv, d]
            vg = flat.index_select(0, g.k_rows + page).view(kv_shape).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=self.shape.scale,
                                                enable_gqa=self.shape.num_heads != self.shape.num_kv_heads)
            og = og.transpose(1, 2)  # [n, max_q, heads, d]
            out[g.q_index[g.q_valid]] = og[g.q_valid]
        return out

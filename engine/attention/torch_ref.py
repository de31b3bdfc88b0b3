"""Torch reference attention backend: the CPU path and the oracle for GPU backends.

Exact for any mix of prefill chunks and decodes: each request's queries attend
causally (aligned to the end of its KV sequence) to its cached prefix and to
the new tokens (a draft tree's queries to their ancestors only, by the
layout's tree mask). Requests are grouped by query length class (powers of
two: decodes, q_len == 1, then 2, 3-4, 5-8, ...) and each group runs as one
padded SDPA call over KV gathered from the pages, so queries pad at most 2x
(a verification of 1 + k queries never pads to a prefill chunk) and a step
costs one attention call per class present per layer.

Shared prefixes (engine/attention/cascade.py): for each decomposed level, the
level's KV is gathered once and all its members' queries attend to it in one
non-causal call, batched per KV head (the g query heads of a KV head and every
query token of the group are the rows of one [rows, d] x [d, prefix] product);
the padded groups then cover each request's own pages only, return their
log-sum-exp too, and the parts merge exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, BatchLayout, register_backend
from engine.attention.cascade import merge_lse_


@dataclass(frozen=True)
class _Group:
    q_index: torch.Tensor  # [n, max_q] flattened token index per padded query (0 for padding)
    q_valid: torch.Tensor  # [n, max_q] bool
    k_rows: torch.Tensor  # [n * max_kv] flat cache row of each padded key (V row = + page)
    mask: torch.Tensor  # [n, 1, max_q, max_kv] bool: True = attend
    # The group is the whole batch, unpadded, in token order (decodes of equal length,
    # e.g. batch 1): its output is the step's output, no gather or scatter of queries.
    whole_batch: bool = False
    sdpa_mask: torch.Tensor | None = None  # `mask`, or None when it allows every key


@dataclass(frozen=True)
class _Level:
    q_index: torch.Tensor  # [N] flattened token index of every member query
    k_rows: torch.Tensor  # [P] flat cache rows of the level's keys, read once
    all_tokens: bool  # q_index is every token of the batch, in order


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, hkv, L, d] (the g query heads of a KV head folded into L), k/v [n, hkv, S, d],
    mask [n, 1, L, S] additive float or None -> (out [n, hkv, L, d], lse [n, hkv, L] fp32)."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [n, hkv, L, S]
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()).to(q.dtype), lse


@register_backend("torch")
class TorchReferenceBackend(AttentionBackend):
    def plan(self, layout: BatchLayout) -> None:
        self.plan_torch(layout, self.plan_levels(layout), range(len(layout.q_lens)))

    def plan_torch(self, layout: BatchLayout, cascade, rows) -> None:
        """Padded SDPA groups for the request `rows` (ascending) and the decomposed levels."""
        if not rows and not cascade.levels:  # nothing for torch this step (the cpu backend's decodes)
            self.write_rows, self.groups, self.levels, self.lse_masks = None, [], [], []
            return
        device = self.shape.device
        page = layout.page_size
        self.write_rows = self.slot_k_rows(layout.slot_mapping, page)
        qo = layout.qo_indptr.tolist()  # host tensors at plan time; not a device sync on CPU
        kv_ptr = layout.kv_indptr.tolist()
        pages = layout.kv_indices.tolist()
        own = cascade.own_first_page if cascade.active else (0,) * len(layout.q_lens)
        # Rows grouped by query-length class (1, 2, 3-4, 5-8, ...): a group pads its queries
        # to its longest, so a verification (1 + k queries) never pads to a prefill chunk.
        classes: dict[int, list[int]] = {}
        for i in rows:
            classes.setdefault((layout.q_lens[i] - 1).bit_length(), []).append(i)
        trees = dict(layout.tree_masks)
        self.groups = [self._group(group, layout, (qo, kv_ptr, pages, own), trees, device)
                       for _, group in sorted(classes.items())]
        self.levels = [self._level(lv, layout, qo, kv_ptr, pages, device) for lv in cascade.levels]
        # With levels to merge, the own-key groups return their LSE too: additive masks with
        # each token's row repeated for the g query heads of a KV head.
        g_heads = self.shape.num_heads // self.shape.num_kv_heads
        self.lse_masks = [torch.zeros(g.mask.shape, dtype=self.shape.dtype, device=device)
                          .masked_fill_(~g.mask, float("-inf")).repeat_interleave(g_heads, dim=2)
                          for g in self.groups] if self.levels else []

    @staticmethod
    def _group(rows, layout, host, trees, device) -> _Group:
        qo, kv_ptr, pages, own = host
        page = layout.page_size
        max_q = max(layout.q_lens[i] for i in rows)
        max_kv = max(layout.kv_lens[i] - own[i] * page for i in rows)
        n = len(rows)
        q_index = torch.zeros(n, max_q, dtype=torch.long)
        q_valid = torch.zeros(n, max_q, dtype=torch.bool)
        kv_block = torch.zeros(n, max_kv, dtype=torch.long)
        kv_offset = torch.zeros(n, max_kv, dtype=torch.long)
        mask = torch.zeros(n, max_q, max_kv, dtype=torch.bool)
        for r, i in enumerate(rows):
            q_len, kv_len, first = layout.q_lens[i], layout.kv_lens[i], own[i] * page
            n_kv = kv_len - first
            q_index[r, :q_len] = torch.arange(qo[i], qo[i] + q_len)
            q_valid[r, :q_len] = True
            pos = torch.arange(first, kv_len)  # the request's own keys
            req_pages = torch.tensor(pages[kv_ptr[i]:kv_ptr[i + 1]], dtype=torch.long)
            kv_block[r, :n_kv] = req_pages[pos // page]
            kv_offset[r, :n_kv] = pos % page
            q_pos = torch.arange(kv_len - q_len, kv_len)
            mask[r, :q_len, :n_kv] = pos[None, :] <= q_pos[:, None]
            if i in trees:  # a draft tree: ancestors only among the query tokens
                mask[r, :q_len, n_kv - q_len:n_kv] = trees[i]
            mask[r, q_len:, 0] = True  # padded queries attend to one key: no NaN rows
        k_rows = AttentionBackend.k_rows(kv_block, kv_offset, page).view(-1)
        # rows ascend (plan groups them in row order): with every row here and none padded,
        # the group's queries are the step's tokens in order.
        whole = n == len(layout.q_lens) and all(layout.q_lens[i] == max_q for i in rows)
        every_key = bool(mask.all())  # on the host: no device sync at plan time
        mask = mask[:, None].to(device)
        return _Group(q_index.to(device), q_valid.to(device), k_rows.to(device), mask, whole,
                      None if every_key else mask)

    @staticmethod
    def _level(lv, layout, qo, kv_ptr, pages, device) -> _Level:
        q_index, k_rows = AttentionBackend.level_rows(lv, qo, kv_ptr, pages, layout.page_size)
        all_tokens = len(q_index) == qo[-1] and bool((q_index == torch.arange(qo[-1])).all())
        return _Level(q_index.to(device), k_rows.to(device), all_tokens)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        self.write_kv(kv_cache, k, v, self.write_rows)
        if self.levels:
            return self._forward_cascade(q, kv_cache)
        return self.attend_groups(q, kv_cache, torch.empty_like(q))

    def attend_groups(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The planned groups' attention from the (written) cache into out [num_tokens, heads, d]
        (or the whole-batch group's output itself)."""
        flat, page = self.flat_rows(kv_cache), kv_cache.shape[2]
        for g in self.groups:
            n, max_q = g.q_index.shape
            qg = (q.view(n, max_q, *q.shape[1:]) if g.whole_batch else q[g.q_index]).transpose(1, 2)
            kv_shape = (n, -1, flat.shape[1], flat.shape[2])  # qg: [n, heads, max_q, d]
            kg = flat.index_select(0, g.k_rows).view(kv_shape).transpose(1, 2)  # [n, kv_heads, max_kv, d]
            vg = flat.index_select(0, g.k_rows + page).view(kv_shape).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.sdpa_mask, scale=self.shape.scale,
                                                enable_gqa=self.shape.num_heads != self.shape.num_kv_heads)
            og = og.transpose(1, 2)  # [n, max_q, heads, d]
            if g.whole_batch:
                return og.reshape(q.shape)
            out[g.q_index[g.q_valid]] = og[g.q_valid]
        return out

    def _forward_cascade(self, q: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        flat, page = self.flat_rows(kv_cache), kv_cache.shape[2]
        hkv, d = flat.shape[1], flat.shape[2]
        g_heads = self.shape.num_heads // hkv
        out = torch.empty_like(q)  # [T, heads, d]
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # [T, heads]
        for g, mask in zip(self.groups, self.lse_masks):  # each request's own keys
            n, max_q = g.q_index.shape
            qg = q[g.q_index].view(n, max_q, hkv, g_heads, d).permute(0, 2, 1, 3, 4)
            qg = qg.reshape(n, hkv, max_q * g_heads, d)  # row t * g + j: token t, head kv * g + j
            kg = flat.index_select(0, g.k_rows).view(n, -1, hkv, d).transpose(1, 2)  # [n, hkv, max_kv, d]
            vg = flat.index_select(0, g.k_rows + page).view(n, -1, hkv, d).transpose(1, 2)
            og, lg = attend_lse(qg, kg, vg, mask, self.shape.scale)
            og = og.view(n, hkv, max_q, g_heads, d).permute(0, 2, 1, 3, 4).reshape(n, max_q, -1, d)
            lg = lg.view(n, hkv, max_q, g_heads).permute(0, 2, 1, 3).reshape(n, max_q, -1)
            out[g.q_index[g.q_valid]] = og[g.q_valid]
            lse[g.q_index[g.q_valid]] = lg[g.q_valid]
        for n_lv, lv in enumerate(self.levels):  # a shared level: its KV read once, all members' queries together
            num_q = lv.q_index.shape[0]
            ql = q[lv.q_index].view(num_q, hkv, g_heads, d).transpose(0, 1).reshape(1, hkv, num_q * g_heads, d)
            kl = flat.index_select(0, lv.k_rows).transpose(0, 1)[None]  # [1, hkv, P, d]
            vl = flat.index_select(0, lv.k_rows + page).transpose(0, 1)[None]
            ol, ll = attend_lse(ql, kl, vl, None, self.shape.scale)
            ol = ol.view(hkv, num_q, g_heads, d).transpose(0, 1).reshape(num_q, -1, d)
            ll = ll.view(hkv, num_q, g_heads).transpose(0, 1).reshape(num_q, -1)
            merge_lse_(out, lse, ol, ll, None if lv.all_tokens else lv.q_index,
                       need_lse=n_lv + 1 < len(self.levels))
        return out

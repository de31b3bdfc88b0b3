"""Paged attention on CPU for short query runs (`kernels/cpu/paged_attention.cpp`), and its
torch reference.

One op per layer writes the step's K/V into the pages and attends the planned rows
(decodes, speculative verification, short prefill chunks) straight from the pages:
no gather, no padding, no mask tensors. Built with the GGUF kernels
(`kernels.gguf_cpu.available()`); fp32 on CPU; `supported` says whether a model's
attention shape fits. `reference` is plain softmax attention per request, in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROWS = 32  # query rows per work item: tile tokens x query heads of one KV head
MAX_HEAD_DIM = 256


def supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    return (head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM and num_heads % num_kv_heads == 0
            and num_heads // num_kv_heads <= MAX_ROWS)


@dataclass(frozen=True)
class NativePlan:
    """One step's metadata for the op (host tensors; CPU only)."""
    items: torch.Tensor  # [n, 3] int32: (request row, KV head, first query token of a tile)
    qo_indptr: torch.Tensor  # [batch + 1] int32
    kv_indptr: torch.Tensor  # [batch + 1] int32
    kv_indices: torch.Tensor  # [pages] int32
    kv_lens: torch.Tensor  # [batch] int32
    slots: torch.Tensor  # [num_tokens] int64: cache slot of every new token (all rows, not only `items`)
    q_tile: int
    scale: float


def make_plan(layout, rows: list[int], num_heads: int, num_kv_heads: int, scale: float) -> NativePlan:
    """The op's plan for the layout's request `rows` (engine.attention.base.BatchLayout)."""
    q_tile = max(1, MAX_ROWS // (num_heads // num_kv_heads))
    items = [(i, h, t) for i in rows for h in range(num_kv_heads) for t in range(0, layout.q_lens[i], q_tile)]
    return NativePlan(torch.tensor(items, dtype=torch.int32).view(-1, 3), layout.qo_indptr, layout.kv_indptr,
                      layout.kv_indices, torch.tensor(layout.kv_lens, dtype=torch.int32), layout.slot_mapping,
                      q_tile, scale)


def paged_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    plan: NativePlan) -> None:
    """Write k/v [T, hkv, d] at plan.slots, then fill out [T, hq, d] at the planned rows' tokens
    with their causal attention over the pages (other tokens' rows are left untouched)."""
    torch.ops.strix_cpu.paged_attention(out, q, k, v, kv_cache, plan.slots, plan.items, plan.qo_indptr,
                                        plan.kv_indptr, plan.kv_indices, plan.kv_lens, plan.scale, plan.q_tile)


def reference(q: torch.Tensor, kv_cache: torch.Tensor, layout, rows: list[int], scale: float) -> torch.Tensor:
    """Softmax attention of `rows` in float64 from an already written cache -> [T, hq, d]
    (zeros at other rows' tokens). Query t of a request sees keys 0 .. kv_len - q_len + t."""
    page, hkv = kv_cache.shape[2], kv_cache.shape[3]
    g = q.shape[1] // hkv
    out = torch.zeros(q.shape, dtype=torch.float64)
    qo, kv_ptr, pages = layout.qo_indptr.tolist(), layout.kv_indptr.tolist(), layout.kv_indices.tolist()
    for i in rows:
        n, kv_len = layout.q_lens[i], layout.kv_lens[i]
        pos = torch.arange(kv_len)
        blocks = torch.tensor(pages[kv_ptr[i]:kv_ptr[i + 1]])[pos // page]
        keys = kv_cache[blocks, 0, pos % page].double().repeat_interleave(g, dim=1)  # [kv_len, hq, d]
        vals = kv_cache[blocks, 1, pos % page].double().repeat_interleave(g, dim=1)
        qi = q[qo[i]:qo[i] + n].double()  # [n, hq, d]
        scores = torch.einsum("thd,khd->htk", qi, keys) * scale
        visible = pos[None, :] <= (kv_len - n + torch.arange(n))[:, None]  # [n, kv_len]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[qo[i]:qo[i] + n] = torch.einsum("htk,khd->thd", probs, vals)
    return out.to(q.dtype)

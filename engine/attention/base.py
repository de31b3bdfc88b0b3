"""Attention backend ABC + registry.

A backend owns its per-step metadata: `plan()` is called once per step with the
flattened batch layout (CSR page table, optional draft-tree masks and shared-prefix
levels), `forward()` once per layer. KV memory
per layer is `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (NHD), shared
by every backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from engine.attention.cascade import CascadePlan, PrefixLevel, plan_cascade
from engine.spec.tree import ancestor_mask, depths


@dataclass(frozen=True)
class BatchLayout:
    """The step's flattened batch, one row per scheduled request, host + device copies.
    Query tokens of request i are rows qo_indptr[i]:qo_indptr[i+1] of the flattened
    batch; its KV pages are kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last one
    holding kv_last_page_len[i] (1..page_size) tokens. Causality is aligned to the
    end of each KV sequence (query j of request i sits at KV slot kv_len - q_len + j).

    A request listed in `tree_masks` (speculative draft tree, engine/spec/tree.py) has
    a [q_len, q_len] bool mask over its query tokens instead of causality among them:
    query j attends to every KV slot before its first query token and to the query
    tokens l with mask[j, l]. Every backend level that attends over query tokens
    applies it."""
    qo_indptr: torch.Tensor  # [batch + 1] int32
    kv_indptr: torch.Tensor  # [batch + 1] int32
    kv_indices: torch.Tensor  # [total pages] int32
    kv_last_page_len: torch.Tensor  # [batch] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (page * page_size + offset) per new token
    q_lens: list[int]  # host copies (built on the host anyway; no device sync needed)
    kv_lens: list[int]
    page_size: int
    tree_masks: tuple[tuple[int, torch.Tensor], ...] = ()  # (request row, [q_len, q_len] bool) host
    # Shared-prefix forest of the step (engine.attention.cascade), parents first; a
    # backend may decompose any of its levels (`plan_cascade`).
    prefix_levels: tuple[PrefixLevel, ...] = ()


def build_layout(q_lens: list[int], kv_lens: list[int], kv_indptr: list[int], kv_indices: list[int],
                 page: int, device: torch.device, trees: dict[int, list[int]] | None = None
                 ) -> tuple[BatchLayout, torch.Tensor]:
    """The layout of requests whose q_lens[i] new tokens end their kv_lens[i]-token KV
    (pages kv_indices[kv_indptr[i]:kv_indptr[i+1]]) -> (layout, positions [num_tokens]).
    trees: request row -> parent query index of each of its query tokens (-1: none,
    engine.spec.tree.query_parents); such a row's query j sits at position
    first + depth(j) and gets a tree mask."""
    q_len_t = torch.tensor(q_lens, dtype=torch.long)
    qo = torch.zeros(len(q_lens) + 1, dtype=torch.long)
    qo[1:] = q_len_t.cumsum(0)
    row = torch.repeat_interleave(torch.arange(len(q_lens)), q_len_t)  # [num_tokens] request row
    start = torch.tensor(kv_lens, dtype=torch.long) - q_len_t  # [batch] first new position
    offset = torch.arange(int(qo[-1])) - qo[row]  # [num_tokens] index among the row's queries
    slot_pos = offset + start[row]  # [num_tokens] KV slot position of each new token
    positions = slot_pos.clone()
    masks = []
    for i, qparents in sorted((trees or {}).items()):
        assert len(qparents) == q_lens[i], "a tree names every query token's parent"
        positions[int(qo[i]):int(qo[i + 1])] = int(start[i]) + torch.tensor(depths(qparents))
        masks.append((i, ancestor_mask(qparents)))
    indptr, indices = torch.tensor(kv_indptr, dtype=torch.long), torch.tensor(kv_indices, dtype=torch.long)
    slots = indices[indptr[row] + slot_pos // page] * page + slot_pos % page
    last = torch.tensor(kv_lens, dtype=torch.long) - (indptr[1:] - indptr[:-1] - 1) * page
    i32 = dict(dtype=torch.int32, device=device)
    layout = BatchLayout(qo.to(**i32), indptr.to(**i32), indices.to(**i32), last.to(**i32),
                         slots.to(device), list(q_lens), list(kv_lens), page, tuple(masks))
    return layout, positions.to(device)


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: torch.dtype
    device: torch.device


class AttentionBackend(ABC):
    name: str = "abstract"

    @classmethod
    def usable(cls, shape: AttentionShape) -> bool:
        """Whether `auto` may pick this backend for the shape (device, dtype, head sizes)."""
        return True

    def __init__(self, shape: AttentionShape, shared_prefix: str = "auto"):
        self.shape = shape
        self.shared_prefix = shared_prefix  # auto | on | off (engine.attention.cascade)
        self.cascade = CascadePlan((), ())  # the last plan's decomposition (metrics, tests)

    def plan_levels(self, layout: BatchLayout) -> CascadePlan:
        """The levels of the layout this backend decomposes this step (its cost model)."""
        self.cascade = plan_cascade(layout.prefix_levels, len(layout.q_lens), layout.page_size,
                                    self.shared_prefix)
        return self.cascade

    @abstractmethod
    def plan(self, layout: BatchLayout) -> None:
        """Prepare per-step metadata; called once per step before any forward()."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]:
        write k/v into kv_cache at the planned slots, attend, return [num_tokens, num_heads, head_dim]."""

    @staticmethod
    def flat_rows(kv_cache: torch.Tensor) -> torch.Tensor:
        """The cache as rows [num_blocks * 2 * page, kv_heads, head_dim] (a view): the K of
        (block b, offset o) is row (2b)*page + o and its V is that row + page."""
        nb, two, page, hkv, d = kv_cache.shape
        return kv_cache.view(nb * two * page, hkv, d)

    @classmethod
    def level_rows(cls, lv: PrefixLevel, qo: list[int], kv_ptr: list[int], pages: list[int],
                   page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A decomposed level's host tensors: (its members' query tokens [N], the K rows of
        its pages [num_pages * page]), from the layout's host qo/kv indptr and page list."""
        q_index = torch.cat([torch.arange(qo[i], qo[i + 1]) for i in lv.rows])
        first = kv_ptr[lv.rows[0]] + lv.first_page
        blocks = torch.tensor(pages[first:first + lv.num_pages], dtype=torch.long)
        return q_index, cls.k_rows(blocks[:, None], torch.arange(page)[None, :], page).view(-1)

    @staticmethod
    def k_rows(block_idx: torch.Tensor, offsets: torch.Tensor, page: int) -> torch.Tensor:
        return block_idx * (2 * page) + offsets

    @classmethod
    def slot_k_rows(cls, slots: torch.Tensor, page: int) -> torch.Tensor:
        """Cache slots (page * page_size + offset) -> their K rows in `flat_rows`."""
        return cls.k_rows(torch.div(slots, page, rounding_mode="floor"), slots % page, page)

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_rows: torch.Tensor) -> None:
        """Store k/v [num_tokens, num_kv_heads, head_dim] at their K rows (V rows = +page)."""
        flat = self.flat_rows(kv_cache)
        flat.index_copy_(0, k_rows, k)
        flat.index_copy_(0, k_rows + kv_cache.shape[2], v)


_REGISTRY: dict[str, Callable[[AttentionShape], AttentionBackend]] = {}


def register_backend(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def create_backend(name: str, shape: AttentionShape, shared_prefix: str = "auto") -> AttentionBackend:
    if name == "auto":  # triton on CUDA; our native op on an fp32 CPU model with the extension built
        if shape.device.type == "cuda":
            name = "triton" if "triton" in _REGISTRY else "torch"
        else:
            name = "cpu" if "cpu" in _REGISTRY and _REGISTRY["cpu"].usable(shape) else "torch"
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {available_backends()}")
    return _REGISTRY[name](shape, shared_prefix)


def available_backends() -> list[str]:
    return sorted(_REGISTRY)

"""Attention backend ABC + registry.

A backend owns its per-step metadata: `plan()` is called once per step with the
flattened batch layout (CSR page table), `forward()` once per layer. KV memory
per layer is `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (NHD), shared
by every backend.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class BatchLayout:
    """The step's flattened batch, one row per scheduled request, host + device copies.
    Query tokens of request i are rows qo_indptr[i]:qo_indptr[i+1] of the flattened
    batch; its KV pages are kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last one
    holding kv_last_page_len[i] (1..page_size) tokens. Causality is aligned to the
    end of each KV sequence (query j of request i sits at position kv_len - q_len + j)."""
    qo_indptr: torch.Tensor  # [batch + 1] int32
    kv_indptr: torch.Tensor  # [batch + 1] int32
    kv_indices: torch.Tensor  # [total pages] int32
    kv_last_page_len: torch.Tensor  # [batch] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (page * page_size + offset) per new token
    q_lens: list[int]  # host copies (built on the host anyway; no device sync needed)
    kv_lens: list[int]
    page_size: int


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

    def __init__(self, shape: AttentionShape):
        self.shape = shape

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

    @staticmethod
    def k_rows(block_idx: torch.Tensor, offsets: torch.Tensor, page: int) -> torch.Tensor:
        return block_idx * (2 * page) + offsets

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


def create_backend(name: str, shape: AttentionShape) -> AttentionBackend:
    if name == "auto":
        name = "torch"
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {available_backends()}")
    return _REGISTRY[name](shape)


def available_backends() -> list[str]:
    return sorted(_REGISTRY)

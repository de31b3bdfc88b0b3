"""KV cache memory: per-layer `[num_blocks, 2, block_size, num_kv_heads, head_dim]` tensors,
zero until written.

On the CPU the layers are views of one anonymous memory mapping: the kernel hands out zero
pages and commits each on its first write, so the process's resident memory grows with the
KV actually used (up to the configured size) instead of the whole cache at start-up, as
`torch.zeros` would (it writes every page). Reads of never-written slots see zeros either way.
On other devices: `torch.zeros`.
"""
from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch


class KVMemory:
    """Owns the cache tensors (and, on the CPU, the mapping behind them)."""

    def __init__(self, num_layers: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self._mapping = None
        if device.type != "cpu":
            self.layers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            return
        per_layer = math.prod(shape)
        nbytes = per_layer * num_layers * dtype.itemsize
        self._mapping = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE)  # anonymous: zero-filled on demand
        flat = torch.frombuffer(self._mapping, dtype=dtype, count=per_layer * num_layers)
        self.layers = [flat[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(num_layers)]

    def zero_blocks(self, block_ids: Sequence[int]) -> None:
        """Write zeros over these blocks in every layer. On the CPU this makes their pages
        the process's own before anything reads them: a read of a never-written page maps
        the kernel's shared zero page there, and the first write to it later costs a
        copy-on-write fault with a TLB shootdown across the compute threads."""
        if not block_ids:
            return
        index = torch.tensor(list(block_ids), dtype=torch.long, device=self.layers[0].device)
        for layer in self.layers:
            layer.index_fill_(0, index, 0)

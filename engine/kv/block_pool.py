"""Block pool: reference counts, prefix-cache hash table, LRU of evictable blocks.

Invariant: a block is exactly one of
  - free (ref_count 0, no hash, in `free_queue`),
  - cached-and-evictable (ref_count 0, hash known, in `evictable`, ordered
    least-recently-freed first),
  - in use (ref_count > 0, in neither queue).
Allocation takes truly free blocks first and only then evicts the least
recently used cached block, so cached prefixes live as long as possible.
Pure Python: no torch.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # prefix-cache key (any hashable in tests)


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cached: dict = {}  # block key -> block id
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (truly free or cached-and-evictable)."""
        return len(self.free_queue) + len(self.evictable)

    def free_order(self) -> list[int]:
        """Block ids in the order `allocate` would hand them out."""
        return list(self.free_queue) + list(self.evictable)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} blocks, {self.num_free} free")
        ids = []
        for _ in range(count):
            if self.free_queue:
                block_id, _ = self.free_queue.popitem(last=False)
            else:
                block_id, _ = self.evictable.popitem(last=False)
                self._uncache(self.blocks[block_id])
                self.num_evictions += 1
            self.blocks[block_id].ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.evictable[block_id]
            block.ref_count += 1

    def free(self, block_ids: list[int], reuse_first: bool = False) -> None:
        """Drop one reference each; blocks reaching 0 join the tail of their queue in
        the order given (callers pass a sequence's tail first so it is evicted first).
        reuse_first: they join the head instead, so the next allocation hands the same
        blocks out again (the last one given first: pass a sequence tail first and it
        comes back in order). Scratch work (start-up probes) then keeps to a few blocks
        instead of touching pages all over the cache."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                queue = self.free_queue if block.block_hash is None else self.evictable
                queue[block_id] = None
                if reuse_first:
                    queue.move_to_end(block_id, last=False)

    def cache(self, block_id: int, block_hash: bytes) -> int:
        """Register a full, computed, in-use block under its hash. If another block
        already holds that hash the existing one stays canonical; returns its id."""
        existing = self.cached.get(block_hash)
        if existing is not None:
            return existing
        block = self.blocks[block_id]
        block.block_hash = block_hash
        self.cached[block_hash] = block_id
        return block_id

    def uncache(self, block_id: int) -> None:
        """Forget an in-use block's hash (its content is about to change)."""
        block = self.blocks[block_id]
        if block.ref_count > 0 and block.block_hash is not None:
            self._uncache(block)

    def _uncache(self, block: Block) -> None:
        if self.cached.get(block.block_hash) == block.block_id:
            del self.cached[block.block_hash]
        block.block_hash = None

    def reset_prefix_cache(self) -> None:
        """Drop every cached-and-evictable block's hash (they become truly free)."""
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self.free_queue[block_id] = None

    def check_invariants(self) -> None:
        for block in self.blocks:
            in_free, in_evictable = block.block_id in self.free_queue, block.block_id in self.evictable
            assert not (in_free and in_evictable), block
            assert (block.ref_count == 0) == (in_free or in_evictable), block
            assert in_free == (block.ref_count == 0 and block.block_hash is None), block
            if block.block_hash is not None:
                assert self.cached[block.block_hash] == block.block_id, block
        for block_hash, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == block_hash, (block_hash, block_id)

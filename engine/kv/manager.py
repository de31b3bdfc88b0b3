"""KV cache manager: which physical blocks each request owns, prefix-cache lookups.

A request's block table covers its first `num_computed_tokens + scheduled`
tokens; block i holds token positions [i*block_size, (i+1)*block_size).
Automatic prefix caching: every full, computed block is registered under a key
chained over (parent block's key, this block's token ids) (`block_hash.py`: a
256-bit BLAKE2b digest, salted per `cache_salt` at the root), so equal prefixes
map to equal keys whatever request produced them, and different prefixes never
do. Pure Python: no torch.
"""
from __future__ import annotations

from engine.kv.block_hash import UNSALTED_ROOT, block_key, root_key
from engine.kv.block_pool import BlockPool
from engine.kv.prefix_forest import PrefixForest, SharedPrefix, restrict
from engine.request import Request

__all__ = ["KVCacheManager", "SharedPrefix", "cdiv"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[int]] = {}
        self.num_hashed_blocks: dict[str, int] = {}  # leading blocks already registered
        self.queried_tokens = 0  # cumulative prefix-cache counters, in tokens
        self.hit_tokens = 0
        self.forest = PrefixForest()  # registered leading blocks of every request
        # Full prompt blocks some running request will compute and register, by key:
        # a waiting request whose next block is one of them waits to share it.
        self.pending: dict[bytes, str] = {}

    # ---- queries -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def usage(self) -> float:
        return self.pool.usage()

    def block_table(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def _extend_hashes(self, req: Request, num_blocks: int) -> None:
        """Make req.block_hashes cover its first `num_blocks` full blocks."""
        bs = self.block_size
        hashes = req.block_hashes
        if len(hashes) >= num_blocks:
            return
        salt = req.params.cache_salt
        parent = hashes[-1] if hashes else (UNSALTED_ROOT if salt is None else root_key(salt))
        tokens = req.token_ids
        for i in range(len(hashes), num_blocks):
            parent = block_key(parent, tokens[i * bs:(i + 1) * bs])
            hashes.append(parent)

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of a request that has no KV yet.
        At least one token is always left to compute (its logits are needed)."""
        if not self.enable_prefix_caching or req.num_computed_tokens:
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        self._extend_hashes(req, max_blocks)
        hits: list[int] = []
        for block_hash in req.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def blocks_to_decode(self, req: Request) -> int:
        """Free blocks `req` still takes before its first decode step: those its prompt and
        first sampled token need beyond the blocks it holds or, not admitted yet, beyond its
        cached prefix (whose blocks without a user sit in the free queue: taking them counts)."""
        total = cdiv(req.num_tokens + 1, self.block_size)
        held = self.req_blocks.get(req.request_id)
        if held is not None:
            return max(0, total - len(held))
        cached = self.find_cached_prefix(req)
        return total - len(cached) + sum(1 for b in cached if self.pool.blocks[b].ref_count == 0)

    # ---- allocation ----------------------------------------------------
    def allocate(self, req: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Make the request's blocks cover its computed tokens (or `cached_blocks`
        when it is being admitted with a prefix hit) plus `num_new_tokens`.
        Returns False and changes nothing when not enough blocks are free."""
        admission = req.request_id not in self.req_blocks and not req.num_computed_tokens
        blocks = self.req_blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens or len(cached_blocks) * self.block_size
        needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(cached_blocks)
        # Cached blocks with no user sit in the free queue: touching them uses free slots.
        evictable = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_count == 0)
        if max(needed, 0) + evictable > self.pool.num_free:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        if admission and self.enable_prefix_caching:  # counted once per successful admission
            self.queried_tokens += req.num_tokens
            self.hit_tokens += len(cached_blocks) * self.block_size
        if cached_blocks:
            self.pool.touch(list(cached_blocks))
            blocks.extend(cached_blocks)
            self.num_hashed_blocks[req.request_id] = len(blocks)
            self.forest.extend(req.request_id, cached_blocks)
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        if admission and self.enable_prefix_caching:
            self._mark_pending(req, len(cached_blocks))
        return True

    def _mark_pending(self, req: Request, num_cached: int) -> None:
        """Announce the full blocks of the admitted request's tokens beyond its hits."""
        num_full = req.num_tokens // self.block_size
        self._extend_hashes(req, num_full)
        for key in req.block_hashes[num_cached:num_full]:
            self.pending.setdefault(key, req.request_id)

    def _clear_pending(self, req: Request, start: int, end: int) -> None:
        for key in req.block_hashes[start:end]:
            if self.pending.get(key) == req.request_id:
                del self.pending[key]

    def should_wait(self, req: Request, num_cached_blocks: int) -> bool:
        """Whether a request about to be admitted with that many cached blocks would
        compute a block another running request is computing (it waits to share it)."""
        hashes = req.block_hashes
        if num_cached_blocks >= len(hashes):
            return False
        owner = self.pending.get(hashes[num_cached_blocks])
        return owner is not None and owner != req.request_id

    def cache_full_blocks(self, req: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        start = self.num_hashed_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        self._extend_hashes(req, num_full)
        blocks = self.req_blocks[req.request_id]
        for i in range(start, num_full):
            self.pool.cache(blocks[i], req.block_hashes[i])
        self.num_hashed_blocks[req.request_id] = num_full
        self.forest.extend(req.request_id, blocks[start:num_full])
        self._clear_pending(req, start, num_full)

    def free(self, req: Request, reuse_first: bool = False) -> None:
        """Release every block of the request (tail first, so it is evicted first;
        reuse_first: handed out again next, in the same order, see BlockPool.free)."""
        blocks = self.req_blocks.pop(req.request_id, [])
        hashed = self.num_hashed_blocks.pop(req.request_id, 0)
        self._clear_pending(req, hashed, len(req.block_hashes))
        self.forest.remove(req.request_id)
        self.pool.free(list(reversed(blocks)), reuse_first)

    def truncate(self, req: Request) -> None:
        """Release blocks beyond what the request's computed tokens need (rollback)."""
        blocks = self.req_blocks.get(req.request_id, [])
        keep = cdiv(req.num_computed_tokens, self.block_size)
        for block_id in blocks[req.num_computed_tokens // self.block_size:]:
            self.pool.uncache(block_id)  # no longer fully computed: its hash is stale
        if len(blocks) > keep:
            self.pool.free(list(reversed(blocks[keep:])))
            del blocks[keep:]
        hashed = self.num_hashed_blocks.get(req.request_id, 0)
        keep_hashed = min(hashed, req.num_computed_tokens // self.block_size)
        self.num_hashed_blocks[req.request_id] = keep_hashed
        if keep_hashed < self.forest.path_length(req.request_id):  # the path is blocks[:hashed]
            self.forest.remove(req.request_id)
            self.forest.extend(req.request_id, blocks[:keep_hashed])
        del req.block_hashes[req.num_tokens // self.block_size:]

    # ---- shared prefixes -----------------------------------------------
    def shared_prefixes(self, request_ids: list[str]) -> list[SharedPrefix]:
        """Maximal runs of leading blocks shared by >= 2 of the given requests, as a
        forest (parents first): a level may split further down into sub-levels sharing
        more blocks. O(shared levels) per call; the forest itself is incremental."""
        return restrict(self.forest.levels(), request_ids)

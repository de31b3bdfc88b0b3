"""Unit tests for engine/kv/block_pool.py: ref counts, prefix-cache table, LRU free queue.

Pure CPU, no model. The fuzz test drives the pool against a small reference model.
"""
from __future__ import annotations

import random

import pytest

from engine.kv.block_pool import BlockPool


def test_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_free_ref_counts():
    pool = BlockPool(4)
    assert pool.num_blocks == 4 and pool.num_free == 4 and pool.usage() == 0.0
    ids = pool.allocate(3)
    assert ids == [0, 1, 2]  # fresh pool hands out blocks in id order
    assert all(pool.blocks[i].ref_count == 1 for i in ids)
    assert pool.num_free == 1 and pool.usage() == pytest.approx(0.75)
    pool.touch([1])  # a second user
    assert pool.blocks[1].ref_count == 2
    pool.free([1])
    assert pool.blocks[1].ref_count == 1 and pool.num_free == 1  # still held by one user
    pool.free([0, 1, 2])
    assert pool.num_free == 4 and all(b.ref_count == 0 for b in pool.blocks)
    pool.check_invariants()


def test_allocate_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    pool.allocate(2)
    before = pool.free_order()
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.free_order() == before and pool.num_free == 1
    assert pool.allocate(0) == []
    pool.check_invariants()


def test_free_twice_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([1])  # never allocated
    pool.check_invariants()


def test_lru_least_recently_freed_first():
    pool = BlockPool(4)
    pool.allocate(4)
    pool.free([2, 0, 3, 1])
    assert pool.free_order() == [2, 0, 3, 1]
    assert pool.allocate(4) == [2, 0, 3, 1]
    assert pool.num_evictions == 0


def test_reuse_first_hands_the_same_blocks_out_again_in_order():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    pool.free([1, 0])
    assert pool.free_order() == [2, 3, 4, 5, 1, 0]  # the tail of the queue
    assert pool.allocate(3) == [2, 3, 4]
    pool.free([4, 3, 2], reuse_first=True)  # a sequence, tail first
    assert pool.free_order() == [2, 3, 4, 5, 1, 0]
    assert pool.allocate(3) == [2, 3, 4]
    pool.cache(3, "h")
    pool.free([4, 3, 2], reuse_first=True)  # a cached block heads the evictable queue
    assert pool.free_order() == [2, 4, 5, 1, 0, 3]
    pool.check_invariants()


def test_cached_blocks_evicted_after_free_ones_in_lru_order():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    assert pool.cache(a, 111) == a and pool.cache(b, 222) == b
    assert pool.lookup(111) == a and pool.lookup(222) == b
    pool.free([c, a, b])  # truly free block first, then cached ones
    pool.check_invariants()
    # Freed cached blocks stay findable.
    assert pool.lookup(111) == a and pool.lookup(222) == b

    assert pool.allocate(1) == [c]
    assert pool.num_evictions == 0 and pool.lookup(111) == a and pool.lookup(222) == b

    assert pool.allocate(1) == [a]  # least recently freed cached block goes first
    assert pool.num_evictions == 1
    assert pool.lookup(111) is None and pool.blocks[a].block_hash is None
    assert pool.lookup(222) == b

    assert pool.allocate(1) == [b]
    assert pool.num_evictions == 2 and pool.lookup(222) is None and not pool.cached
    pool.check_invariants()


def test_cached_block_not_evicted_while_truly_free_blocks_remain():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, 111)
    pool.cache(b, 222)
    pool.free([a, b])  # cached blocks freed first ...
    pool.free([c])  # ... then an uncached one
    got = pool.allocate(1)
    assert got == [c]
    assert pool.num_evictions == 0
    assert pool.lookup(111) == a and pool.lookup(222) == b


def test_cache_duplicate_hash_keeps_canonical():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache(a, 7) == a
    assert pool.cache(b, 7) == a  # the existing block stays canonical
    assert pool.blocks[b].block_hash is None
    assert pool.lookup(7) == a
    pool.free([a, b])
    pool.check_invariants()


def test_touch_cached_free_block_removes_it_from_free_queue():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, 42)
    pool.free([a, b])
    assert a in pool.free_order() and pool.num_free == 3
    hit = pool.lookup(42)
    assert hit == a
    pool.touch([hit])
    assert a not in pool.free_order()
    assert pool.blocks[a].ref_count == 1 and pool.num_free == 2
    # It can no longer be handed out (nor evicted) while in use.
    others = pool.allocate(2)
    assert a not in others and pool.lookup(42) == a and pool.num_evictions == 0
    pool.check_invariants()
    pool.free([a])
    assert pool.free_order()[-1] == a  # back at the tail (evicted last)
    pool.check_invariants()


def test_reset_prefix_cache_drops_only_unused_hashes():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache(a, 1)
    pool.cache(b, 2)
    pool.free([a])
    pool.reset_prefix_cache()
    assert pool.lookup(1) is None and pool.blocks[a].block_hash is None
    assert pool.lookup(2) == b  # still in use: kept
    pool.check_invariants()


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    pool = BlockPool(n)
    refs: list[int] = []  # one entry per reference we hold
    model_plain = list(range(n))  # expected truly-free order
    model_evictable: list[int] = []  # expected cached-and-evictable LRU order
    model_hash: dict[int, int] = {}  # block -> hash
    evictions = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            k = rng.randint(0, pool.num_free)
            got = pool.allocate(k)
            assert got == (model_plain + model_evictable)[:k]  # truly free first, then LRU cached
            for b in got:
                if b in model_hash:
                    del model_hash[b]
                    evictions += 1
                (model_plain if b in model_plain else model_evictable).remove(b)
            refs.extend(got)
        elif op < 0.6 and refs:
            rng.shuffle(refs)
            k = rng.randint(1, len(refs))
            gone, refs = refs[:k], refs[k:]
            pool.free(gone)
            for i, b in enumerate(gone):
                # A block joins the free queue when its last reference is dropped.
                if b not in refs and b not in gone[i + 1:]:
                    (model_evictable if b in model_hash else model_plain).append(b)
        elif op < 0.8 and refs:
            b = rng.choice(refs)
            if b not in model_hash:
                h = rng.randrange(20)  # small hash space: collisions happen
                canonical = pool.cache(b, h)
                owner = next((blk for blk, hh in model_hash.items() if hh == h), None)
                if owner is None:
                    model_hash[b] = h
                    assert canonical == b
                else:
                    assert canonical == owner
        elif model_hash:
            h = rng.choice(sorted(model_hash.values()))
            b = pool.lookup(h)
            assert b is not None and model_hash[b] == h
            pool.touch([b])
            if b in model_evictable:
                model_evictable.remove(b)
            refs.append(b)
        pool.check_invariants()
        assert pool.free_order() == model_plain + model_evictable
        assert pool.num_free == len(model_plain) + len(model_evictable)
        assert pool.num_evictions == evictions
        assert {b: blk.block_hash for b, blk in enumerate(pool.blocks) if blk.block_hash is not None} == model_hash
        assert pool.cached == {h: b for b, h in model_hash.items()}
        for b, blk in enumerate(pool.blocks):
            assert blk.ref_count == refs.count(b)
    pool.free(refs)
    assert pool.num_free == n
    pool.check_invariants()

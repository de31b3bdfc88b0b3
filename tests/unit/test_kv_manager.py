"""Unit tests for engine/kv/manager.py: block tables, chained prefix caching, shared prefixes.

Pure CPU, no model: requests are built directly and "computed" by moving
num_computed_tokens forward, as the scheduler's update does.
"""
from __future__ import annotations

import pytest

from engine.kv.manager import KVCacheManager, SharedPrefix, cdiv
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def make_req(rid: str, tokens, **kw) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), **kw)


def blocks_of(*starts: int) -> list[int]:
    """Token ids of full blocks, block i = [s, s+1, ..., s+BS-1] for each start."""
    out: list[int] = []
    for s in starts:
        out.extend(range(s, s + BS))
    return out


def admit_and_compute(kv: KVCacheManager, req: Request) -> list[int]:
    """Admit like the scheduler (prefix lookup + allocation), then compute the whole prompt."""
    hits = kv.find_cached_prefix(req)
    assert kv.allocate(req, req.num_tokens - len(hits) * BS, hits)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return hits


def snapshot(kv: KVCacheManager):
    pool = kv.pool
    return (list(pool.free_queue), [(b.ref_count, b.block_hash) for b in pool.blocks], dict(pool.cached),
            {k: list(v) for k, v in kv.req_blocks.items()}, dict(kv.num_hashed_blocks), pool.num_evictions)


def test_cdiv():
    assert [cdiv(x, 4) for x in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_allocate_covers_tokens_and_grows_at_block_boundaries():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_req("r", range(6))
    assert kv.allocate(r, 6)
    assert len(kv.block_table("r")) == 2
    r.num_computed_tokens = 6
    for n in range(7, 14):  # decode one token at a time
        r.append_output([100 + n])
        assert kv.allocate(r, 1)
        assert len(kv.block_table("r")) == cdiv(n, BS)
        r.num_computed_tokens = n
        kv.cache_full_blocks(r)
    assert kv.num_hashed_blocks["r"] == 13 // BS
    kv.pool.check_invariants()
    assert kv.block_table("nobody") == []


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_prefix_hit_covers_exactly_the_shared_full_blocks(k):
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    a = make_req("a", blocks_of(0, 10, 20, 30) + [1, 2])
    assert admit_and_compute(kv, a) == []
    a_blocks = list(kv.block_table("a"))
    kv.free(a)  # finished: its full blocks stay cached
    assert kv.num_free_blocks == 32
    # b shares the first k blocks, then differs (and has a partial tail).
    b_tokens = blocks_of(0, 10, 20, 30)[:k * BS] + blocks_of(500, 600, 700, 800)[k * BS:] + [3]
    b = make_req("b", b_tokens)
    hits = admit_and_compute(kv, b)
    assert hits == a_blocks[:k]
    assert kv.block_table("b")[:k] == a_blocks[:k]
    assert len(kv.block_table("b")) == cdiv(len(b_tokens), BS)
    assert len(set(kv.block_table("b"))) == len(kv.block_table("b"))
    kv.pool.check_invariants()


def test_chained_hash_different_first_block_gives_no_hits():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    a = make_req("a", blocks_of(0, 10, 20) + [1])
    admit_and_compute(kv, a)
    kv.free(a)
    b = make_req("b", blocks_of(99, 10, 20) + [1])  # later blocks equal, first differs
    assert kv.find_cached_prefix(b) == []


def test_at_least_one_token_left_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_req("a", blocks_of(0, 10))  # exactly two full blocks
    admit_and_compute(kv, a)
    assert kv.num_hashed_blocks["a"] == 2  # both were registered
    a_blocks = list(kv.block_table("a"))
    kv.free(a)
    same = make_req("same", blocks_of(0, 10))
    assert kv.find_cached_prefix(same) == a_blocks[:1]  # not both: the last token is recomputed
    longer = make_req("longer", blocks_of(0, 10) + [5])
    assert kv.find_cached_prefix(longer) == a_blocks
    tiny = make_req("tiny", [0, 1, 2, 3])
    assert kv.find_cached_prefix(tiny) == []
    single = make_req("single", [7])
    assert kv.find_cached_prefix(single) == []


def test_hit_on_running_request_shares_physical_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_req("a", blocks_of(0, 10) + [1, 2])
    admit_and_compute(kv, a)
    b = make_req("b", blocks_of(0, 10) + [7])
    assert admit_and_compute(kv, b) == kv.block_table("a")[:2]
    for blk in kv.block_table("a")[:2]:
        assert kv.pool.blocks[blk].ref_count == 2
    kv.free(a)
    for blk in kv.block_table("b")[:2]:
        assert kv.pool.blocks[blk].ref_count == 1
    kv.free(b)
    assert kv.num_free_blocks == 16
    kv.pool.check_invariants()


def test_no_hits_without_prefix_caching():
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    a = make_req("a", blocks_of(0, 10) + [1])
    admit_and_compute(kv, a)
    assert not kv.pool.cached
    kv.free(a)
    assert kv.find_cached_prefix(make_req("b", blocks_of(0, 10) + [1])) == []
    assert kv.queried_tokens == 0 and kv.hit_tokens == 0


def test_request_with_kv_gets_no_lookup():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_req("a", blocks_of(0, 10) + [1])
    admit_and_compute(kv, a)
    b = make_req("b", blocks_of(0, 10) + [1])
    b.num_computed_tokens = 3
    assert kv.find_cached_prefix(b) == []


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_req("a", blocks_of(0, 10, 20) + [1])  # 4 blocks, 3 cached
    admit_and_compute(kv, a)
    run = make_req("run", [9, 9])
    admit_and_compute(kv, run)  # 1 block; 1 left free
    # A running request growing past what is free.
    before = snapshot(kv)
    run.append_output([1] * 8)
    assert not kv.allocate(run, 8)
    assert snapshot(kv) == before
    # A new request with no blocks at all.
    big = make_req("big", range(100, 120))
    assert not kv.allocate(big, 20)
    assert snapshot(kv) == before and "big" not in kv.req_blocks
    # A prefix hit whose remaining tokens do not fit (a's blocks are in use, so no
    # evictable slots are consumed by the hit itself).
    hit_req = make_req("hit", blocks_of(0, 10, 20) + list(range(200, 212)))
    hits = kv.find_cached_prefix(hit_req)
    assert len(hits) == 3
    before = snapshot(kv)
    assert not kv.allocate(hit_req, hit_req.num_tokens - 3 * BS, hits)
    assert snapshot(kv) == before
    kv.pool.check_invariants()


def test_cached_free_blocks_count_against_free_space():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_req("a", blocks_of(0, 10, 20) + [1])  # 3 cached blocks + partial tail
    admit_and_compute(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    # Needs its 3 cached blocks (sitting in the free queue) + 2 new ones: 5 > 4.
    too_big = make_req("too_big", blocks_of(0, 10, 20) + list(range(50, 55)))
    hits = kv.find_cached_prefix(too_big)
    assert len(hits) == 3
    before = snapshot(kv)
    assert not kv.allocate(too_big, too_big.num_tokens - 3 * BS, hits)
    assert snapshot(kv) == before
    # Exactly fits: 3 cached + 1 new; the new one is a's uncached tail (freed first).
    fits = make_req("fits", blocks_of(0, 10, 20) + [50, 51])
    hits = kv.find_cached_prefix(fits)
    assert kv.allocate(fits, 2, hits)
    assert kv.num_free_blocks == 0 and kv.pool.num_evictions == 0
    kv.pool.check_invariants()


def test_free_returns_everything():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    reqs = [make_req("a", blocks_of(0, 10) + [1]), make_req("b", blocks_of(0, 10, 20)),
            make_req("c", blocks_of(0) + [3, 3]), make_req("d", [5] * 9)]
    for r in reqs:
        admit_and_compute(kv, r)
    assert kv.num_free_blocks < 20
    for r in reqs:
        kv.free(r)
        kv.pool.check_invariants()
    assert kv.num_free_blocks == 20
    assert kv.req_blocks == {} and kv.num_hashed_blocks == {}
    assert all(b.ref_count == 0 for b in kv.pool.blocks)
    kv.free(reqs[0])  # freeing an unknown request is a no-op
    assert kv.num_free_blocks == 20


def test_shared_prefixes_forest():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    a = make_req("A", blocks_of(0, 10, 20, 30) + [1])
    b = make_req("B", blocks_of(0, 10, 20, 40) + [2])
    c = make_req("C", blocks_of(0, 10, 50, 60) + [3])
    d = make_req("D", blocks_of(70, 10, 20) + [4])
    for r in (a, b, c, d):
        admit_and_compute(kv, r)
    ta = kv.block_table("A")
    b0, b1, b2 = ta[:3]
    assert kv.block_table("B")[:3] == [b0, b1, b2]
    assert kv.block_table("C")[:2] == [b0, b1] and kv.block_table("C")[2] != b2
    assert b0 not in kv.block_table("D")
    got = kv.shared_prefixes(["A", "B", "C", "D"])
    assert got == [  # parents first; the nested level's own blocks are block_ids[start:]
        SharedPrefix((b0, b1), ("A", "B", "C"), 0),
        SharedPrefix((b0, b1, b2), ("A", "B"), 2),
    ]
    assert kv.shared_prefixes(["A", "D"]) == []
    assert kv.shared_prefixes(["C", "A"]) == [SharedPrefix((b0, b1), ("C", "A"))]
    # Seen by A and B only, the two levels have the same members: one level of 3 blocks.
    assert kv.shared_prefixes(["B", "A"]) == [SharedPrefix((b0, b1, b2), ("B", "A"))]
    assert kv.shared_prefixes([]) == []
    kv.free(a)
    assert kv.shared_prefixes(["A", "B", "C", "D"]) == [SharedPrefix((b0, b1), ("B", "C"))]
    kv.free(b)
    assert kv.shared_prefixes(["A", "B", "C", "D"]) == []
    assert kv.forest.root.children.keys() == {kv.block_table("C")[0], kv.block_table("D")[0]}


def test_forest_nested_levels_and_dropped_parents():
    """Depth-3 forest: a level seen by < 2 of the given requests gives its blocks to its
    children's levels; the forest equals a brute-force grouping of the block tables."""
    kv = KVCacheManager(num_blocks=128, block_size=BS)
    specs = {"A": (0, 10, 20, 30, 40), "B": (0, 10, 20, 30, 41), "C": (0, 10, 20, 31),
             "D": (0, 10, 21), "E": (0, 11), "F": (1, 10)}
    reqs = {rid: make_req(rid, blocks_of(*starts) + [7]) for rid, starts in specs.items()}
    for r in reqs.values():
        admit_and_compute(kv, r)
    t = {rid: kv.block_table(rid) for rid in specs}
    got = kv.shared_prefixes(list(specs))
    assert got == [SharedPrefix(tuple(t["A"][:1]), ("A", "B", "C", "D", "E"), 0),
                   SharedPrefix(tuple(t["A"][:2]), ("A", "B", "C", "D"), 1),
                   SharedPrefix(tuple(t["A"][:3]), ("A", "B", "C"), 2),
                   SharedPrefix(tuple(t["A"][:4]), ("A", "B"), 3)]
    # Without E the root level has the same members as its child: they merge.
    assert kv.shared_prefixes(["A", "B", "C", "D"])[0] == SharedPrefix(tuple(t["A"][:2]), ("A", "B", "C", "D"), 0)
    # Without C and D, the levels of 3 and 4 blocks lose members, A-B-E's own level is 1.
    assert kv.shared_prefixes(["A", "B", "E"]) == [SharedPrefix(tuple(t["A"][:1]), ("A", "B", "E"), 0),
                                                   SharedPrefix(tuple(t["A"][:4]), ("A", "B"), 1)]
    for sub in (["A", "C"], ["B", "D", "F"], ["E", "F"], ["D", "C", "B", "A"]):
        got = kv.shared_prefixes(sub)
        for level in got:  # every member really holds the level's blocks, no one else does
            holders = [r for r in sub if tuple(t[r][:len(level.block_ids)]) == level.block_ids]
            assert sorted(holders) == sorted(level.request_ids)
        pairs = {(x, y) for x in sub for y in sub if x < y and t[x][0] == t[y][0]}
        grouped = {(x, y) for lv in got for x in lv.request_ids for y in lv.request_ids if x < y}
        assert grouped == pairs


def test_forest_is_cached_until_a_shared_node_changes():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    a = make_req("A", blocks_of(0, 10) + [1])
    b = make_req("B", blocks_of(0, 10) + [2])
    admit_and_compute(kv, a)
    admit_and_compute(kv, b)
    first = kv.forest.levels()
    v = kv.forest.version
    a.append_output([5, 6, 7])  # A's third block fills: private, the forest is unchanged
    a.num_computed_tokens = a.num_tokens
    assert kv.allocate(a, 0)
    kv.cache_full_blocks(a)
    assert kv.forest.path_length("A") == 3 and kv.forest.version == v
    assert kv.forest.levels() is first


def test_pending_blocks_make_a_same_prompt_request_wait():
    """A request whose next block another running request is computing waits to share it;
    when the computing request is freed first, nothing is pending any more."""
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    a = make_req("A", blocks_of(0, 10, 20) + [1])
    b = make_req("B", blocks_of(0, 10, 20) + [2])
    c = make_req("C", blocks_of(5, 10) + [3])
    assert kv.allocate(a, BS, kv.find_cached_prefix(a))  # first chunk of A
    assert kv.should_wait(b, len(kv.find_cached_prefix(b)))
    assert not kv.should_wait(c, len(kv.find_cached_prefix(c)))
    assert not kv.should_wait(a, 0)  # its own blocks
    a.num_computed_tokens = BS
    kv.cache_full_blocks(a)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 1 and kv.should_wait(b, 1)  # block 2 is still being computed
    assert kv.allocate(a, 3 * BS + 1 - BS)
    a.num_computed_tokens = a.num_tokens
    kv.cache_full_blocks(a)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 3 and not kv.should_wait(b, 3)
    kv.free(a)
    assert kv.pending == {}
    d = make_req("D", blocks_of(50, 60) + [4])
    e = make_req("E", blocks_of(50, 60) + [5])
    assert kv.allocate(d, BS, kv.find_cached_prefix(d))
    assert kv.should_wait(e, len(kv.find_cached_prefix(e)))
    kv.free(d)  # preempted or aborted mid-prefill: E computes the blocks itself
    assert kv.pending == {} and not kv.should_wait(e, len(kv.find_cached_prefix(e)))


def test_shared_prefixes_identical_requests():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    a = make_req("A", blocks_of(0, 10, 20) + [1])
    admit_and_compute(kv, a)
    b = make_req("B", blocks_of(0, 10, 20) + [1])
    admit_and_compute(kv, b)
    # b hits 3 blocks; its partial tail is its own.
    assert kv.shared_prefixes(["A", "B"]) == [SharedPrefix(tuple(kv.block_table("A")[:3]), ("A", "B"))]


def test_query_and_hit_counters():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    a = make_req("a", blocks_of(0, 10, 20) + [1])  # 13 tokens
    admit_and_compute(kv, a)
    assert (kv.queried_tokens, kv.hit_tokens) == (13, 0)
    kv.free(a)
    b = make_req("b", blocks_of(0, 10, 99) + [1, 2])  # 14 tokens, 2 blocks hit
    admit_and_compute(kv, b)
    assert (kv.queried_tokens, kv.hit_tokens) == (27, 2 * BS)
    c = make_req("c", blocks_of(0, 10, 20) + [1])  # 3 blocks hit
    admit_and_compute(kv, c)
    assert (kv.queried_tokens, kv.hit_tokens) == (40, 5 * BS)
    assert 0 < kv.usage() < 1


def test_output_tokens_are_cached_too():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_req("a", [1, 2, 3])
    admit_and_compute(kv, a)
    a.append_output([4])
    assert kv.allocate(a, 1)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    first = kv.block_table("a")[0]
    a.append_output([5, 6])  # the sampled tokens' KV is not computed yet
    kv.free(a)
    assert kv.find_cached_prefix(make_req("b", [1, 2, 3, 4, 5])) == [first]
    assert kv.find_cached_prefix(make_req("c", [1, 2, 3, 9, 5])) == []


def test_truncate_releases_blocks_past_computed_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_req("r", [1, 2, 3])
    admit_and_compute(kv, r)
    r.append_output([4, 5, 6, 7, 8, 9])  # e.g. speculative tokens, computed together
    assert kv.allocate(r, 6)
    assert len(kv.block_table("r")) == 3
    r.num_computed_tokens = 6  # only part of them accepted
    kv.truncate(r)
    assert len(kv.block_table("r")) == 2
    assert kv.num_free_blocks == 6
    kv.pool.check_invariants()


def test_truncate_unregisters_rolled_back_cached_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_req("r", [1, 2, 3])
    admit_and_compute(kv, r)
    r.append_output([4, 5, 6, 7, 8, 9])
    assert kv.allocate(r, 6)
    r.num_computed_tokens = 9
    kv.cache_full_blocks(r)  # blocks 0 and 1 registered
    old_tokens = list(r.token_ids[:8])
    b1 = kv.block_table("r")[1]
    r.truncate_output(2)  # rollback: tokens [1, 2, 3, 4, 5], block 1 now partial
    kv.truncate(r)
    assert kv.block_table("r")[1] == b1
    other = make_req("other", old_tokens + [0])
    assert b1 not in kv.find_cached_prefix(other)  # b1 will be overwritten by r
    r.append_output([60, 70, 80])  # new tokens land in b1's slots 1..3
    assert kv.allocate(r, 3)
    r.num_computed_tokens = 8
    kv.cache_full_blocks(r)
    for block_hash, block_id in kv.pool.cached.items():
        assert kv.pool.blocks[block_id].block_hash == block_hash


def test_requests_with_different_cache_salts_never_share():
    kv = KVCacheManager(num_blocks=64, block_size=BS)
    tokens = blocks_of(0, 10, 20) + [1]
    reqs = [Request(rid, list(tokens), SamplingParams(max_tokens=8, cache_salt=salt))
            for rid, salt in (("A", "t1"), ("B", "t2"), ("C", "t1"), ("D", None))]
    for r in reqs:
        admit_and_compute(kv, r)
    got = kv.shared_prefixes(["A", "B", "C", "D"])
    assert got == [SharedPrefix(tuple(kv.block_table("A")[:3]), ("A", "C"))]
    # Nor does a salted request wait for another salt's blocks being computed.
    e = Request("E", list(tokens) + [5] * 8, SamplingParams(max_tokens=8, cache_salt="t3"))
    assert kv.allocate(e, BS, kv.find_cached_prefix(e))
    f = Request("F", list(tokens) + [6] * 8, SamplingParams(max_tokens=8, cache_salt="t4"))
    assert not kv.should_wait(f, len(kv.find_cached_prefix(f)))

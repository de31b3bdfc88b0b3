"""Prefix-cache keys: 256-bit chained digests, salted per cache_salt (engine/kv/block_hash.py)."""
from __future__ import annotations

import hashlib
from array import array

from engine.kv.block_hash import DIGEST_SIZE, UNSALTED_ROOT, block_key, root_key
from engine.kv.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4


def test_key_is_the_documented_digest():
    parent = root_key("tenant-a")
    assert parent == hashlib.blake2b(b"strix-prefix-root\x00\x01tenant-a", digest_size=32).digest()
    key = block_key(parent, [1, 2, 3, 70000])
    expected = hashlib.blake2b(parent + array("i", [1, 2, 3, 70000]).tobytes(), digest_size=32).digest()
    assert key == expected and len(key) == DIGEST_SIZE


def test_key_depends_on_every_token_and_the_whole_prefix():
    base = [5, 6, 7, 8]
    key = block_key(UNSALTED_ROOT, base)
    for i in range(BS):
        for delta in (1, 256, 65536):
            changed = list(base)
            changed[i] += delta
            assert block_key(UNSALTED_ROOT, changed) != key
    # Python's int hash makes t and t + (2**61 - 1) equal; the digest does not care.
    assert hash(5) == hash(5 + 2 ** 61 - 1)
    assert block_key(block_key(UNSALTED_ROOT, [1] * BS), base) != block_key(block_key(UNSALTED_ROOT, [2] * BS), base)
    # Salts: none, empty-named and named roots are all distinct.
    assert len({UNSALTED_ROOT, root_key(""), root_key("a"), root_key("b")}) == 4


def _admit(kv: KVCacheManager, rid: str, tokens: list[int], salt: str | None) -> int:
    """Admit and compute a request; returns how many blocks came from the cache."""
    req = Request(rid, list(tokens), SamplingParams(max_tokens=4, cache_salt=salt))
    hits = kv.find_cached_prefix(req)
    assert kv.allocate(req, req.num_tokens - len(hits) * BS, hits)
    req.num_computed_tokens = req.num_tokens
    kv.cache_full_blocks(req)
    return len(hits)


def test_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=32, block_size=BS)
    prompt = list(range(100, 113))  # 3 full blocks + 1 token
    assert _admit(kv, "a1", prompt, "tenant-a") == 0
    assert _admit(kv, "a2", prompt, "tenant-a") == 3  # same tenant shares
    assert _admit(kv, "b1", prompt, "tenant-b") == 0  # another tenant never does
    assert _admit(kv, "u1", prompt, None) == 0  # nor does the unsalted namespace
    assert _admit(kv, "u2", prompt, None) == 3
    assert set(kv.block_table("a1")[:3]).isdisjoint(kv.block_table("b1")[:3])

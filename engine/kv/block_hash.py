"""Prefix-cache block keys: a cryptographic digest chained over the prefix.

key(block i) = BLAKE2b-256(key(block i-1) || token ids of block i as int32 bytes)
key(block -1) = BLAKE2b-256("strix-prefix-root" || 0x00 || cache_salt)   (the root)

A block is reused on key equality alone, so keys must not collide by accident
or on purpose: Python's `hash()` of token tuples is 64-bit and can be forced
to collide by a client choosing tokens, handing one client another's KV. A
256-bit digest cannot be. Framing is unambiguous: the parent is always 32
bytes and a full block always `4 * block_size` bytes; the salt only enters
the root, so requests with different `cache_salt` share no block, and the
unsalted namespace is its own root. Pure Python (hashlib), no torch.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DIGEST_SIZE = 32
_ROOT_TAG = b"strix-prefix-root\x00"


def root_key(cache_salt: str | None = None) -> bytes:
    salt = b"" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8")
    return hashlib.blake2b(_ROOT_TAG + salt, digest_size=DIGEST_SIZE).digest()


UNSALTED_ROOT = root_key(None)


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Key of a full block whose predecessor's key is `parent` (token ids < 2**31)."""
    h = hashlib.blake2b(parent, digest_size=DIGEST_SIZE)
    h.update(array("i", token_ids).tobytes())
    return h.digest()

"""Cost of a prefix-cache block key: our BLAKE2b-256 chain vs the alternatives, same run.

Per full block (block_size tokens): `engine.kv.block_hash.block_key` (BLAKE2b-256 over
parent digest + int32 token bytes), SHA-256 over the same bytes, and Python's
`hash((parent, tuple(tokens)))` (the old, collidable key) as the baseline. Also the
whole-prompt figure (keys of an 8k-token prompt) and that cost next to one decode step.

    python loadtest/prefix_hash_bench.py [--block-size 16] [--json loadtest/results/prefix_hash_cpu.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import time
from array import array

from engine.kv.block_hash import UNSALTED_ROOT, block_key


def _sha256_key(parent: bytes, tokens) -> bytes:
    return hashlib.sha256(parent + array("i", tokens).tobytes()).digest()


def _python_hash_key(parent, tokens):
    return hash((parent, tuple(tokens)))


def per_block_us(fn, blocks, root, repeats: int) -> float:
    """Best-of-`repeats` microseconds per block for a chained pass over `blocks`."""
    best = float("inf")
    for _ in range(repeats):
        parent = root
        start = time.perf_counter()
        for b in blocks:
            parent = fn(parent, b)
        best = min(best, (time.perf_counter() - start) / len(blocks))
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = random.Random(0)
    bs = args.block_size
    tokens = [rng.randrange(49152) for _ in range(args.blocks * bs)]
    blocks = [tokens[i * bs:(i + 1) * bs] for i in range(args.blocks)]  # list slices, as the manager does
    results = {
        "blake2b_256 (ours)": per_block_us(block_key, blocks, UNSALTED_ROOT, args.repeats),
        "sha256": per_block_us(_sha256_key, blocks, UNSALTED_ROOT, args.repeats),
        "python hash (baseline, collidable)": per_block_us(_python_hash_key, blocks, 0x5EED, args.repeats),
    }
    base = results["python hash (baseline, collidable)"]
    ours = results["blake2b_256 (ours)"]
    prompt_blocks = 8192 // bs
    print(f"block_size {bs}, {args.blocks} chained blocks, best of {args.repeats}")
    for name, us in results.items():
        print(f"  {name:36s} {us:6.2f} us/block  ({us / base:4.2f}x baseline)")
    print(f"  8k-token prompt ({prompt_blocks} blocks): ours {ours * prompt_blocks / 1000:.2f} ms, "
          f"baseline {base * prompt_blocks / 1000:.2f} ms")
    print(f"  per decode step of 64 requests (at most 64 new full blocks): {ours * 64 / 1000:.3f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"block_size": bs, "blocks": args.blocks, "repeats": args.repeats,
                       "us_per_block": results, "ratio_vs_python_hash": ours / base,
                       "prompt_8k_ms": ours * prompt_blocks / 1000,
                       "machine": platform.platform(), "python": platform.python_version()}, fh, indent=2)


if __name__ == "__main__":
    main()

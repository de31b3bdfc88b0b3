"""Attention-only micro-benchmark of shared-prefix attention (the torch backend, this CPU).

B decoding requests share a P-token prefix (SmolLM2 shapes: 9 query heads, 3 KV heads,
head_dim 64) and each has `--own` tokens of its own; one decode step's attention over
`--layers` layers (a KV cache per layer) is timed with the decomposition off (the plain
padded path) and on, best of `--repeats`, plus the max abs difference of the outputs. It
also prints the largest saved-rows count per layer, (B - 1) x P, at which the
decomposition still lost: the break-even that sets `CascadeCost.min_saved_tokens`.

    python loadtest/shared_prefix_attention.py --json loadtest/results/shared_prefix_attention_cpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.attention import AttentionShape, build_layout, create_backend  # noqa: E402
from engine.attention.cascade import PrefixLevel  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def _layout(batch: int, prefix: int, own: int):
    """Decodes sharing `prefix` tokens (whole pages) then `own` tokens each."""
    shared = prefix // PAGE
    own_pages = -(-own // PAGE)
    tables = [list(range(shared)) + [shared + i * own_pages + j for j in range(own_pages)] for i in range(batch)]
    kvp = [0]
    for t in tables:
        kvp.append(kvp[-1] + len(t))
    kv_lens = [shared * PAGE + own] * batch
    layout, _ = build_layout([1] * batch, kv_lens, kvp, sum(tables, []), PAGE, torch.device("cpu"))
    levels = (PrefixLevel(0, shared, tuple(range(batch))),) if shared else ()
    return dataclasses.replace(layout, prefix_levels=levels), shared + batch * own_pages


def time_step(batch: int, prefix: int, own: int, layers: int, repeats: int) -> dict:
    shape = AttentionShape(HEADS, KV_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, torch.float32, torch.device("cpu"))
    layout, num_blocks = _layout(batch, prefix, own)
    caches = [torch.randn(num_blocks, 2, PAGE, KV_HEADS, HEAD_DIM) for _ in range(layers)]
    q = torch.randn(batch, HEADS, HEAD_DIM)
    k, v = torch.randn(batch, KV_HEADS, HEAD_DIM), torch.randn(batch, KV_HEADS, HEAD_DIM)
    result, outs = {}, {}
    for mode in ("off", "on"):
        backend = create_backend("torch", shape, shared_prefix=mode)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            backend.plan(layout)
            for cache in caches:
                out = backend.forward(q, k, v, cache)
            best = min(best, time.perf_counter() - t0)
        result[f"{mode}_ms"] = round(best * 1e3, 3)
        outs[mode] = out
    result["speedup"] = round(result["off_ms"] / result["on_ms"], 3)
    result["max_abs_diff"] = float((outs["on"] - outs["off"]).abs().max())
    return {"batch": batch, "prefix": prefix, "own": own, "saved_rows": (batch - 1) * prefix, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 4, 16, 32])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 64, 256, 1024, 2048, 4096])
    ap.add_argument("--own", type=int, default=96, help="tokens of each request's own (question + output)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for b in args.batches:
        for p in args.prefixes:
            row = time_step(b, p, args.own, args.layers, args.repeats)
            rows.append(row)
            print(f"B={b:3d} P={p:5d} saved={row['saved_rows']:7d}  off {row['off_ms']:9.2f} ms  "
                  f"on {row['on_ms']:9.2f} ms  x{row['speedup']:.2f}  diff {row['max_abs_diff']:.1e}", flush=True)
    losing = [r["saved_rows"] for r in rows if r["speedup"] < 1.0]
    print("largest saved-rows count where the decomposition lost:", max(losing) if losing else None)
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "layers": args.layers, "shapes": [HEADS, KV_HEADS, HEAD_DIM]}
        args.json.write_text(json.dumps({"kind": "shared_prefix_attention", "meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

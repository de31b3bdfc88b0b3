"""Kernel benchmark: our GGUF block kernels vs the fp32 linears they replace, same run.

Every linear of the default model (its real Q4_1 blocks, 30 layers, and the
Q8_0 tied LM head) run once each, as one forward step reads them (so caches see
the whole model, not one hot tensor), at M = 1, 4, 16, 64 rows: best of
--repeats for our kernels, the oneDNN-packed fp32 linears (the fp32 CPU path)
and plain F.linear over the dequantized weights; prints ms and the ratios.
--json writes the figures.

    python loadtest/gguf_kernel_bench.py --json loadtest/results/gguf_kernels_cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--isa", choices=["auto", "avx2"], default="auto",
                    help="auto: AVX-512 variants where the CPU has them; avx2: force AVX2")
    ap.add_argument("--json")
    args = ap.parse_args()
    from engine.config import ModelConfig  # noqa: F401  (engine import order)
    from engine.models.cpu_linear import PackedLinear, packing_available
    from engine.models.gguf_linear import read_blocks
    from engine.models.loader import load_model_config, resolve_model
    from kernels import gguf_cpu

    assert gguf_cpu.available(), "the native kernels did not build here"
    isa = "avx512" if gguf_cpu.set_avx512(args.isa == "auto") else "avx2"
    print(f"our kernels on {isa}", flush=True)
    src = resolve_model("smollm2-135m")
    cfg = load_model_config(src)
    blocks = read_blocks(src.path, cfg)  # every linear of every layer + the tied LM head (Q8_0)
    names = [n for n in blocks if n.startswith("layers.")] + ["embed_tokens.weight"]
    tensors = [blocks[n] for n in names]
    dense = [gguf_cpu.dequantize(b.data, b.qtype, b.cols) for b in tensors]
    packed = [PackedLinear(w, None, 64) for w in dense] if packing_available() else None
    print(f"{len(tensors)} tensors: {sum(b.data.numel() for b in tensors) / 2**20:.0f} MiB in blocks, "
          f"{sum(w.numel() * 4 for w in dense) / 2**20:.0f} MiB as fp32", flush=True)
    rows_out = []
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {b.cols: torch.randn(m, b.cols) for b in tensors}
        # One "step": every tensor once, as a forward pass reads them (caches see the whole model).
        ours = best_ms(lambda: [gguf_cpu.linear(xs[b.cols], b.data, b.qtype, b.rows) for b in tensors], args.repeats)
        plain = best_ms(lambda: [F.linear(xs[w.shape[1]], w) for w in dense], args.repeats)
        pk = best_ms(lambda: [p(xs[p.in_features]) for p in packed], args.repeats) if packed else plain
        rows_out.append({"rows": m, "ours_ms": ours, "fp32_packed_ms": pk, "fp32_linear_ms": plain})
        print(f"M={m:3d}: all linears of one step: ours {ours:7.2f} ms   fp32 packed {pk:7.2f} ms "
              f"({pk / ours:4.2f}x)   F.linear {plain:7.2f} ms ({plain / ours:4.2f}x)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": " ".join(sys.argv), "device": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "isa": isa, "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()

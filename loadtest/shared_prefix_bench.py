"""Shared-prefix attention through the running server: decode throughput vs shared prompt length.

B concurrent streaming requests (/v1/completions, greedy, EOS ignored) share a P-token
system prompt followed by a distinct ~32-token question. Each grid point first sends a
warm-up round (max_tokens 1: the prefix is computed once and cached, and llama-server's
slots cache their prompts), then `--repeats` measured rounds. A round's decode
throughput is the sum over streams of (tokens - 1) / (last token time - first token
time); points with P >= `--long-from` generate 17 tokens (16 warm decode steps, since
`off` takes seconds per step there), shorter ones `--max-tokens`. The median round is
reported (over every pass when `--interleave N` alternates the servers N times). Our server runs once per `--shared-prefix-attention` mode (off, on, auto),
all in this run; `--llama-server PATH` adds llama.cpp's server on the same GGUF
(`-np B`, `-t 2`, a context of B x (P_max + 256)) for the B values in `--llama-batches`.

    python loadtest/shared_prefix_bench.py --json loadtest/results/shared_prefix_cpu.json \
        --plot loadtest/results/shared_prefix_cpu.png --llama-server /path/to/llama-server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from local_server import LlamaServer, Server  # noqa: E402

TOPICS = ["the harbour", "the old mill", "the orchard", "the railway", "the library", "the market",
          "the bridge", "the observatory", "the school", "the bakery", "the lighthouse", "the museum"]


def make_prompts(tokenizer, prefix_tokens: int, batch: int) -> list[str]:
    """A P-token system prompt (varied sentences, cut to P tokens) + a distinct question each."""
    sentences, i = [], 0
    while len(tokenizer.encode(" ".join(sentences))) < prefix_tokens + 16:
        t = TOPICS[i % len(TOPICS)]
        sentences.append(f"Note {i}: the town council keeps records about {t}, its history, its "
                         f"keepers and the {i * 7 % 97} events held there each year.")
        i += 1
    system = tokenizer.decode(tokenizer.encode(" ".join(sentences))[:prefix_tokens])
    return [f"{system}\nQuestion {b}: in a few sentences, what would a visitor number {b * 13} "
            f"want to know about {TOPICS[b % len(TOPICS)]}?\nAnswer:" for b in range(batch)]


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float | None, float, int]:
    """-> (first token time, last token time, tokens) of one streamed completion."""
    first, last, tokens = None, 0.0, 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
    return first, last, tokens


async def run_round(base: str, prompts: list[str], max_tokens: int) -> dict:
    url = base + "/v1/completions"
    bodies = [{"prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}, "cache_prompt": True}
              for p in prompts]
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as client:
        results = await asyncio.gather(*(_stream(client, url, b) for b in bodies))
    rate = sum((n - 1) / (last - first) for first, last, n in results if first and n > 1 and last > first)
    return {"decode_tok_s": round(rate, 2), "tokens": sum(n for _, _, n in results),
            "wall_s": round(time.perf_counter() - t0, 2),
            "ttft_max_s": round(max(f for f, _, _ in results if f) - t0, 2)}


def measure_point(base: str, prompts: list[str], max_tokens: int, repeats: int) -> dict:
    asyncio.run(run_round(base, prompts, 1))  # warm: the prefix computed once, then cached
    rounds = [asyncio.run(run_round(base, prompts, max_tokens)) for _ in range(repeats)]
    rates = [r["decode_tok_s"] for r in rounds]
    return {"decode_tok_s": statistics.median(rates), "rounds": rounds, "max_tokens": max_tokens}


def run_grid(base: str, grid: list[tuple[int, int]], prompts_for, args, label: str) -> list[dict]:
    rows = []
    for batch, prefix in grid:
        max_tokens = 17 if prefix >= args.long_from else args.max_tokens
        point = measure_point(base, prompts_for(prefix, batch), max_tokens, args.repeats)
        rows.append({"mode": label, "batch": batch, "prefix": prefix, **point})
        print(f"{label:>12} B={batch:3d} P={prefix:5d}: {point['decode_tok_s']:8.2f} tok/s "
              f"(rounds {[r['decode_tok_s'] for r in point['rounds']]})", flush=True)
    return rows


def run_llama(args, grid: list[tuple[int, int]], prompts_for, gguf: str) -> list[dict]:
    """llama-server's rows; a server that fails to start costs its rows, not the run."""
    rows = []
    for batch in args.llama_batches:
        prefixes = [p for b, p in grid if b == batch and p <= args.llama_max_prefix]
        try:
            llama = LlamaServer(args.llama_server, gguf, batch, batch * (max(prefixes) + 256), 2)
        except RuntimeError as exc:
            print(f"llama-server B={batch} skipped: {exc}", flush=True)
            continue
        try:
            rows += run_grid(llama.url, [(batch, p) for p in prefixes], prompts_for, args, "llama-server")
        finally:
            llama.stop()
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (mode, B, P) other than off: tokens/s, the ratio to off and to llama-server."""
    by = {(r["mode"], r["batch"], r["prefix"]): r["decode_tok_s"] for r in rows}
    out = []
    for (mode, b, p), v in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if mode == "off":
            continue
        off, llama = by.get(("off", b, p)), by.get(("llama-server", b, p))
        out.append({"mode": mode, "batch": b, "prefix": p, "tok_s": v,
                    "vs_off": round(v / off, 3) if off else None,
                    "vs_llama_server": round(v / llama, 3) if llama and mode != "llama-server" else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[1024, 2048, 4096, 7680])
    ap.add_argument("--small-prefixes", type=int, nargs="*", default=[128, 256],
                    help="extra points at batch 16 where auto must not lose to off")
    ap.add_argument("--modes", nargs="*", default=["off", "on", "auto"])
    ap.add_argument("--merge", type=Path, help="a previous run's JSON: its rows join this run's "
                    "(e.g. llama-server alone now, our modes from before)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--long-from", type=int, default=1024, help="P from which 16 warm decode steps are timed")
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds per point per server start")
    ap.add_argument("--interleave", type=int, default=1,
                    help="start each mode's server this many times, alternating; the median over all rounds")
    ap.add_argument("--llama-server", help="llama-server binary")
    ap.add_argument("--llama-batches", type=int, nargs="*", default=[16])
    ap.add_argument("--llama-max-prefix", type=int, default=4096)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()

    from engine.models.loader import load_tokenizer, resolve_model
    src = resolve_model(args.model)
    tokenizer = load_tokenizer(src)
    cache: dict = {}

    def prompts_for(prefix: int, batch: int) -> list[str]:
        if (prefix, batch) not in cache:
            cache[(prefix, batch)] = make_prompts(tokenizer, prefix, batch)
        return cache[(prefix, batch)]

    grid = [(16, p) for p in args.small_prefixes] + [(b, p) for b in args.batches for p in args.prefixes]
    rows, t_start = [], time.time()
    passes: dict = {}
    for _ in range(args.interleave):  # modes alternate, so slow drift of the machine hits all alike
        for mode in args.modes:
            server = Server(args.model, ["--shared-prefix-attention", mode, "--max-num-seqs",
                                         str(max(args.batches)), "--kv-cache-memory", "2GiB"], start_timeout=300)
            try:
                for row in run_grid(server.url, grid, prompts_for, args, mode):
                    passes.setdefault((mode, row["batch"], row["prefix"]), []).append(row)
            finally:
                server.stop()
    for (mode, batch, prefix), found in passes.items():
        rounds = [r for row in found for r in row["rounds"]]
        rows.append({"mode": mode, "batch": batch, "prefix": prefix, "max_tokens": found[0]["max_tokens"],
                     "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rounds), "rounds": rounds})
    if args.llama_server:
        rows += run_llama(args, grid, prompts_for, str(src.path))
    if args.merge:
        done = {(r["mode"], r["batch"], r["prefix"]) for r in rows}
        rows += [r for r in json.loads(args.merge.read_text())["rows"]
                 if (r["mode"], r["batch"], r["prefix"]) not in done]
    summary = summarize(rows)
    for s in summary:
        print(f"{s['mode']:>12} B={s['batch']:3d} P={s['prefix']:5d}: {s['tok_s']:8.2f} tok/s, "
              f"x{s['vs_off']} vs off, x{s['vs_llama_server']} vs llama-server", flush=True)
    data = {"kind": "shared_prefix", "rows": rows, "summary": summary,
            "meta": {"machine": platform.processor() or platform.machine(), "model": args.model,
                     "repeats": args.repeats, "interleave": args.interleave, "max_tokens": args.max_tokens, "long_from": args.long_from,
                     "wall_s": round(time.time() - t_start, 1)}}
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
    if args.plot:
        from plot import plot_shared_prefix
        plot_shared_prefix(data, args.plot)


if __name__ == "__main__":
    main()

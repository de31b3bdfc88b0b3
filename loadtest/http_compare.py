"""HTTP comparison: our server vs llama.cpp's llama-server on the same GGUF, both driven by
loadtest/http_load.py at several concurrencies in one run.

Our server starts once (`--max-num-seqs` = the highest concurrency, then `--server-args`),
every `--concurrency` level runs against it and it stops; with `--llama-server PATH` the same
follows for llama-server on the model's GGUF (`-np` = the highest concurrency, `-t 2`, a
context of that x (prompt tokens + max_tokens + 64), rounded up to 256, so each slot fits one
request). Level C: C clients send C x `--requests-per-client` streaming /v1/completions
requests back to back after one warm-up request, `--repeats` times; the median of each metric
is reported. Both servers get identical bodies from http_load.py: greedy (`temperature` 0),
`ignore_eos: true`, `stream_options.include_usage` (both honour all three; llama-server also
caches each slot's prompt, its default `cache_prompt`). Each run's prompts carry a run tag, so
no run reuses more than a few tokens of an earlier run's cached prompts. Output tokens/s is the
usage chunks' completion_tokens over the run's wall time; TTFT and ITL are timed per streamed
chunk with text (a chunk is about one token on both servers). RSS (VmRSS, VmHWM) of each
server is read after its last run.

    python loadtest/http_compare.py --llama-server /path/to/llama-server \\
        --json loadtest/results/http_compare_cpu.json --plot loadtest/results/http_compare_cpu.png
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import http_load  # noqa: E402
from local_server import LlamaServer, Server, rss_kib  # noqa: E402

LLAMA_THREADS = 2
CTX_MARGIN = 64  # tokens per llama-server slot beyond prompt + max_tokens
CTX_ROUND = 256


def prompt_for(concurrency: int, repeat: int) -> str:
    """http_load.py puts "[index] " before this; the tag makes each run's prompts new."""
    return f"Run {concurrency}-{repeat}. {http_load.BASE_PROMPT}"


def run_once(url: str, label: str, concurrency: int, repeat: int, args: argparse.Namespace) -> dict:
    """One http_load.py run (1 warm-up request, then the measured ones) -> its summary."""
    load_args = http_load.parse_args([
        "--url", url, "--concurrency", str(concurrency),
        "--num-requests", str(concurrency * args.requests_per_client),
        "--max-tokens", str(args.max_tokens), "--prompt", prompt_for(concurrency, repeat),
        "--warmup", "1", "--temperature", "0", "--duration", str(args.duration),
        "--request-timeout", str(args.duration), "--label", label])
    http_load.check_loopback(url)
    return asyncio.run(http_load.main_async(load_args))["summary"]


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else round(ms / 1000, 5)


def make_row(label: str, concurrency: int, runs: list[dict]) -> dict:
    """Median over the repeats of each http_load.py summary metric (latencies in seconds)."""
    med = {key: _median([r.get(key) for r in runs]) for key in runs[0]
           if key != "errors" and not isinstance(runs[0][key], list)}
    ok = med["succeeded"] or 1
    row = {"server": label, "concurrency": concurrency, "requests": runs[0]["requests"],
           "output_tok_s": med["output_tokens_per_s"], "requests_per_s": med["requests_per_s"],
           "prompt_tokens_per_request": round(med["prompt_tokens"] / ok, 1),
           "output_tokens_per_request": round(med["output_tokens"] / ok, 1)}
    for metric in ("ttft", "itl", "e2e"):
        for q in (50, 90, 99):
            row[f"{metric}_p{q}_s"] = _seconds(med[f"{metric}_ms_p{q}"])
    row["failed"] = sum(r["failed"] for r in runs)
    row["errors"] = sorted({e for r in runs for e in r["errors"]})[:5]
    row["runs"] = runs
    return row


def run_levels(url: str, label: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for concurrency in args.concurrency:
        runs = [run_once(url, label, concurrency, repeat, args) for repeat in range(args.repeats)]
        row = make_row(label, concurrency, runs)
        rows.append(row)
        print(f"{label:>12} c={concurrency:3d}: {row['output_tok_s']} tok/s, TTFT p50 "
              f"{row['ttft_p50_s']} s, ITL p50 {row['itl_p50_s']} s "
              f"(runs {[r['output_tokens_per_s'] for r in runs]})", flush=True)
        for err in row["errors"]:
            print(f"{'':>12} error: {err}", flush=True)
    return rows


def run_ours(args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    extra = ["--max-num-seqs", str(max(args.concurrency)), *shlex.split(args.server_args)]
    server = Server(args.model, extra, start_timeout=300)
    try:
        rows = run_levels(server.url, "ours", args)
        return rows, rss_kib(server.pid)
    finally:
        server.stop()


def llama_ctx(args: argparse.Namespace, src) -> int:
    """-c for llama-server: every slot holds the longest prompt + max_tokens + a margin."""
    from engine.models.loader import load_tokenizer
    tokenizer = load_tokenizer(src)
    top = max(args.concurrency)
    longest = max(len(tokenizer.encode(f"[{index}] {prompt_for(top, args.repeats - 1)}"))
                  for index in (-1, top * args.requests_per_client - 1))
    per_slot = longest + args.max_tokens + CTX_MARGIN
    return math.ceil(top * per_slot / CTX_ROUND) * CTX_ROUND


def llama_version(binary: str) -> str | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("version")), lines[0] if lines else None)


def run_llama(args: argparse.Namespace, src) -> tuple[list[dict], dict | None, int]:
    ctx = llama_ctx(args, src)
    llama = LlamaServer(args.llama_server, str(src.path), max(args.concurrency), ctx, LLAMA_THREADS)
    try:
        rows = run_levels(llama.url, "llama-server", args)
        return rows, rss_kib(llama.proc.pid), ctx
    finally:
        llama.stop()


def summarize(rows: list[dict]) -> list[dict]:
    """Per concurrency: our output tokens/s over llama-server's (None without llama-server)."""
    by = {(r["server"], r["concurrency"]): r for r in rows}
    out = []
    for (server, concurrency), row in by.items():
        if server != "ours":
            continue
        llama = by.get(("llama-server", concurrency))
        ratio = (round(row["output_tok_s"] / llama["output_tok_s"], 3)
                 if llama and llama["output_tok_s"] and row["output_tok_s"] is not None else None)
        out.append({"concurrency": concurrency, "ours_over_llama": ratio})
    return out


def print_table(rows: list[dict], summary: list[dict]) -> None:
    by = {(r["server"], r["concurrency"]): r for r in rows}

    def cell(server: str, c: int, key: str, scale: float = 1) -> str:
        value = by.get((server, c), {}).get(key)
        return "-" if value is None else f"{value * scale:.1f}"

    print(f"\n{'conc':>5} {'ours tok/s':>11} {'llama tok/s':>12} {'ratio':>7} "
          f"{'ours TTFT p50 ms':>17} {'llama TTFT p50 ms':>18}")
    for s in summary:
        c = s["concurrency"]
        ratio = "-" if s["ours_over_llama"] is None else f"{s['ours_over_llama']:.3f}"
        print(f"{c:>5} {cell('ours', c, 'output_tok_s'):>11} "
              f"{cell('llama-server', c, 'output_tok_s'):>12} {ratio:>7} "
              f"{cell('ours', c, 'ttft_p50_s', 1000):>17} "
              f"{cell('llama-server', c, 'ttft_p50_s', 1000):>18}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2,
                    help="measured requests per level = concurrency x this (plus 1 warm-up)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per level; the median is reported")
    ap.add_argument("--llama-server", help="llama-server binary (omit: our server only)")
    ap.add_argument("--server-args", default="",
                    help='extra args for our server, one string: --server-args="--kv-cache-memory 2GiB"')
    ap.add_argument("--model", default="smollm2-135m", help="our server's --model; its GGUF for llama-server")
    ap.add_argument("--duration", type=float, default=1800,
                    help="http_load.py --duration and --request-timeout per run, seconds")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    if min(args.concurrency) < 1 or args.max_tokens < 1 or args.requests_per_client < 1 or args.repeats < 1:
        ap.error("--concurrency, --max-tokens, --requests-per-client and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from engine.models.loader import resolve_model
    src = resolve_model(args.model)
    if args.llama_server and src.kind != "gguf":
        sys.exit(f"error: llama-server needs a GGUF model; {args.model!r} is {src.kind}")
    t_start = time.time()
    rows, ours_rss = run_ours(args)
    rss = {"ours": ours_rss}
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "model": args.model, "gguf": str(src.path), "max_tokens": args.max_tokens,
            "concurrency": args.concurrency, "requests_per_client": args.requests_per_client,
            "warmup_requests": 1, "repeats": args.repeats, "server_args": args.server_args,
            "temperature": 0, "ignore_eos": True}
    if args.llama_server:
        llama_rows, rss["llama-server"], ctx = run_llama(args, src)
        rows += llama_rows
        meta["llama_server"] = {"binary": args.llama_server, "version": llama_version(args.llama_server),
                                "np": max(args.concurrency), "ctx": ctx, "threads": LLAMA_THREADS}
    meta["rss_kib"] = rss
    meta["wall_s"] = round(time.time() - t_start, 1)
    summary = summarize(rows)
    print_table(rows, summary)
    print("RSS KiB after the runs:", json.dumps(rss), flush=True)
    data = {"kind": "http_compare", "meta": meta, "rows": rows, "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(data, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        from plot import plot_http_compare
        plot_http_compare(data, args.plot)
        print(f"wrote {args.plot}")
    return 1 if any(r["failed"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

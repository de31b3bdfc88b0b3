"""Resident memory of our server: after start-up, after a few requests, and with the KV cache
filled.

Starts `python -m server` on the default model with `--kv-cache-memory` (default 256MiB) and
reads VmRSS / VmHWM from /proc: once healthy, after `--requests` streaming requests (4 at a
time, `--max-tokens` each, via loadtest/http_load.py), and after enough concurrent long
requests to use every KV block at once (KV pages are committed on first write, so resident
memory grows with the KV in use: the last figure shows the full cache resident). --json
writes the figures.

    python loadtest/server_memory.py --json loadtest/results/server_memory_cpu.json
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_server import Server, rss_kib  # noqa: E402


def load(url: str, concurrency: int, requests: int, max_tokens: int) -> None:
    cmd = [sys.executable, str(Path(__file__).parent / "http_load.py"), "--url", url, "--concurrency",
           str(concurrency), "--num-requests", str(requests), "--max-tokens", str(max_tokens), "--warmup", "0"]
    subprocess.run(cmd, check=True, capture_output=True)


def kv_capacity_tokens(log: str) -> tuple[int, int]:
    """(KV blocks, block size) from the server's start-up log line."""
    m = re.search(r"(\d+) KV blocks x (\d+) tokens", log)
    if not m:
        raise SystemExit("no 'KV blocks' line in the server log")
    return int(m.group(1)), int(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--server-args", default="")
    ap.add_argument("--json")
    args = ap.parse_args()
    extra = ["--kv-cache-memory", args.kv_cache_memory] + args.server_args.split()
    server = Server("smollm2-135m", extra, start_timeout=300)
    rows = {}
    try:
        rows["started"] = rss_kib(server.pid)
        load(server.url, 4, args.requests, args.max_tokens)
        rows["after_requests"] = rss_kib(server.pid)
        blocks, size = kv_capacity_tokens(server.log_tail(200_000))
        per_request = 1024  # prompt (~40 tokens) + max_tokens: 64 blocks of 16 each
        n = -(-blocks * size // per_request)
        load(server.url, n, n, per_request - 64)  # n requests at once: every block in use
        rows["kv_filled"] = rss_kib(server.pid)
        rows["kv_blocks"], rows["block_size"], rows["fill_requests"] = blocks, size, n
    finally:
        server.stop()
    for key in ("started", "after_requests", "kv_filled"):
        r = rows[key]
        print(f"{key:15s} VmRSS {r['VmRSS'] / 1024:7.1f} MiB   VmHWM {r['VmHWM'] / 1024:7.1f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "kv_cache_memory": args.kv_cache_memory,
                                               "requests": args.requests, "max_tokens": args.max_tokens, **rows},
                                              indent=2))


if __name__ == "__main__":
    main()

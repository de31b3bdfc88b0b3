"""HTTP load generator for an OpenAI-compatible server (streaming /v1/completions).

    python loadtest/http_load.py --concurrency 8 --num-requests 32 --max-tokens 128
    python loadtest/http_load.py --rate 2 --num-requests 100 --json loadtest/results/x.json

Fixed concurrency (N clients back to back) or Poisson arrivals (`--rate`
requests/s, optionally capped by `--concurrency`). Always bounded: at most
`--num-requests` requests and `--duration` seconds (in-flight requests are
cancelled at the deadline). Loopback hosts only: this tool must not be
pointed at someone else's server. Reports output tokens/s (from each stream's
final usage chunk), TTFT, inter-token latency and end-to-end latency p50/p90/p99.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx

MAX_REQUESTS = 100_000
BASE_PROMPT = ("Write a detailed story about a lighthouse keeper who finds a message in a "
               "bottle, describing the sea, the weather and the people of the village.")


@dataclass
class Record:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    e2e: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: int | None = None
    text: str = ""  # the streamed completion (choice 0 and any others, in arrival order)
    finish_reason: str | None = None


def check_loopback(url: str) -> None:
    """Exit unless every address the URL's host resolves to is a loopback address."""
    host = urlparse(url).hostname
    if not host:
        sys.exit(f"error: no host in {url!r}")
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        sys.exit(f"error: cannot resolve {host!r}: {exc}")
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback
                                for a in addresses):
        sys.exit(f"error: refusing non-loopback host {host!r} ({', '.join(sorted(addresses))});"
                 " this load generator only targets servers on this machine")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no data."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _body(args: argparse.Namespace, model: str, index: int) -> dict:
    return {"model": model, "prompt": f"[{index}] {args.prompt}", "max_tokens": args.max_tokens,
            "temperature": args.temperature, "ignore_eos": not args.allow_eos, "stream": True,
            "stream_options": {"include_usage": True}}


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    rec = Record(start=time.perf_counter())
    last = rec.start
    try:
        async with client.stream("POST", url, json=body) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    rec.text += choice.get("text") or ""
                    rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if rec.ttft is None:
                    rec.ttft = now - rec.start
                else:
                    rec.itls.append(now - last)
                last = now
        rec.e2e = time.perf_counter() - rec.start
        rec.ok = rec.ttft is not None
        if not rec.ok:
            rec.error = "no tokens received"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    return rec


async def run_fixed(client: httpx.AsyncClient, url: str, args: argparse.Namespace,
                    model: str, deadline: float) -> list[Record]:
    """`concurrency` workers issue requests back to back."""
    records: list[Record] = []
    counter = iter(range(args.num_requests))

    async def worker() -> None:
        for index in counter:
            if time.perf_counter() >= deadline:
                return
            records.append(await one_request(client, url, _body(args, model, index)))

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return records


async def run_poisson(client: httpx.AsyncClient, url: str, args: argparse.Namespace,
                      model: str, deadline: float) -> list[Record]:
    """Exponential inter-arrival times at `rate` req/s; `concurrency` caps in-flight."""
    rng = random.Random(args.seed)
    limit = asyncio.Semaphore(args.concurrency or MAX_REQUESTS)
    records: list[Record] = []

    async def launch(index: int) -> None:
        async with limit:
            records.append(await one_request(client, url, _body(args, model, index)))

    tasks = []
    for index in range(args.num_requests):
        tasks.append(asyncio.ensure_future(launch(index)))
        await asyncio.sleep(rng.expovariate(args.rate))
        if time.perf_counter() >= deadline:
            break
    await asyncio.gather(*tasks)
    return records


def summarize(records: list[Record], wall: float) -> dict:
    ok = [r for r in records if r.ok]
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        p = percentile(values, q)
        return None if p is None else round(p * ms, 2)

    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [x for r in ok for x in r.itls]
    e2es = [r.e2e for r in ok if r.e2e is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records), "succeeded": len(ok), "failed": len(records) - len(ok),
        "wall_s": round(wall, 3), "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens_per_s": round(out_tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        **{f"{name}_ms_p{q}": pct(values, q) for name, values in
           (("ttft", ttfts), ("itl", itls), ("e2e", e2es)) for q in (50, 90, 99)},
        "itl_ms_mean": round(statistics.fmean(itls) * ms, 2) if itls else None,
        "errors": sorted({r.error for r in records if r.error})[:5],
    }


async def resolve_model(client: httpx.AsyncClient, base: str, model: str | None) -> str:
    if model:
        return model
    resp = await client.get(base + "/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def main_async(args: argparse.Namespace) -> dict:
    base = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 1) + 64)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        model = await resolve_model(client, base, args.model)
        url = base + "/v1/completions"
        for index in range(args.warmup):
            await one_request(client, url, _body(args, model, -1 - index))
        start = time.perf_counter()
        deadline = start + args.duration
        runner = run_poisson if args.rate else run_fixed
        try:
            records = await asyncio.wait_for(runner(client, url, args, model, deadline),
                                             timeout=args.duration + args.request_timeout)
        except asyncio.TimeoutError:
            sys.exit("error: run exceeded --duration + --request-timeout; aborted")
        wall = time.perf_counter() - start
    summary = summarize(records, wall)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "json")}
    return {"config": {**config, "model": model}, "summary": summary,
            "requests": [asdict(r) for r in records] if args.save_requests else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback)")
    p.add_argument("--model", help="model name (default: the server's first model)")
    p.add_argument("--api-key", help="bearer token, if the server requires one")
    p.add_argument("--concurrency", type=int, default=1, help="clients (fixed mode) or "
                   "in-flight cap (with --rate; 0 = no cap)")
    p.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--duration", type=float, default=600, help="stop launching after this "
                   "many seconds")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default=BASE_PROMPT)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--allow-eos", action="store_true", help="let requests stop at EOS "
                   "(default: ignore_eos, so each produces exactly --max-tokens)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent first, not measured")
    p.add_argument("--seed", type=int, default=0, help="seed for Poisson arrivals")
    p.add_argument("--json", help="write config + summary (+ requests) to this file")
    p.add_argument("--label", default="ours", help="series name for loadtest/plot.py "
                   "(e.g. the server or build being compared)")
    p.add_argument("--save-requests", action="store_true", help="include per-request records")
    args = p.parse_args(argv)
    if not 1 <= args.num_requests <= MAX_REQUESTS:
        p.error(f"--num-requests must be in [1, {MAX_REQUESTS}]")
    if args.rate is None and args.concurrency < 1:
        p.error("--concurrency must be >= 1 without --rate")
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    if args.duration <= 0 or args.max_tokens < 1:
        p.error("--duration and --max-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_loopback(args.url)
    result = asyncio.run(main_async(args))
    s = result["summary"]
    mode = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
    print(f"{mode}: {s['succeeded']}/{s['requests']} ok in {s['wall_s']} s, "
          f"max_tokens {args.max_tokens}")
    print(f"  output tokens/s  {s['output_tokens_per_s']}   requests/s {s['requests_per_s']}")
    print(f"  TTFT ms   p50 {s['ttft_ms_p50']}  p90 {s['ttft_ms_p90']}  p99 {s['ttft_ms_p99']}")
    print(f"  ITL ms    p50 {s['itl_ms_p50']}  p90 {s['itl_ms_p90']}  p99 {s['itl_ms_p99']}")
    print(f"  e2e ms    p50 {s['e2e_ms_p50']}  p90 {s['e2e_ms_p90']}  p99 {s['e2e_ms_p99']}")
    for err in s["errors"]:
        print(f"  error: {err}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
        print(f"  wrote {args.json}")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Soak test for the server: many mixed requests, client disconnects, bad inputs;
then checks that nothing leaked (KV blocks, running requests, memory).

    python loadtest/soak.py                                  # 10,000 requests, concurrency 32
    python loadtest/soak.py --requests 300 --model /tmp/strix-tiny-llama -- --max-model-len 128
    python loadtest/soak.py --url http://127.0.0.1:8000 --json loadtest/results/soak.json

Without `--url` it starts `python -m server --model MODEL --host 127.0.0.1 --port <free>
[ARGS after --]` itself (log in a temp file, path printed), so it can read the
server's RSS from /proc/<pid>/status: once after warm-up (the first
`--warmup-fraction` of requests) and at the end, plus a sample every
`--rss-every` seconds. With `--url` (loopback hosts only) there is no RSS.
KV-cache pages count in RSS only once first written, and the block pool hands
out never-used blocks first, so with a KV cache much larger than the run needs
RSS grows until every block has been used once; for a meaningful growth figure
give the server a small cache (`-- --kv-cache-memory 64MiB`) or a long run.

Requests are drawn from a seeded RNG (`--seed`): completions and chat, stream
and not, n 1..3, max_tokens 1..32, stop strings, logprobs/top_logprobs,
seeds, temperatures, shared and unique prompt prefixes; `--disconnect-fraction`
of them are cancelled by the client at a random point (some before the first
byte, some mid-stream); `--bad-fraction` are invalid on purpose and must get a
4xx.

Reported (stdout, and `--json PATH`): requests ok, errors by HTTP code,
unexpected 5xx (any 5xx except 503 engine_overloaded, plus in-band server
errors in streams), lost (no response: connection errors, timeouts; our own
cancellations are not lost), malformed 200s (bad JSON, stream without
`data: [DONE]`, wrong number of choices), bad inputs accepted with 200,
disconnects done, KV usage and running/waiting gauges once idle, RSS after
warm-up / at the end / growth %, elapsed time and throughput.

Exit status: 0 if lost == 0, unexpected 5xx == 0, malformed == 0 and the KV
usage once idle is 0; 1 otherwise; 2 if the server cannot be started or reached.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import check_loopback, percentile  # noqa: E402
from local_server import Server, rss_kib  # noqa: E402
from soak_plan import Plan, make_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_REQUESTS = 1_000_000

# --------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    index: int
    path: str
    bad: bool
    status: int | None = None
    code: str | None = None  # OpenAI error code, if any
    error: str | None = None  # exception text: lost
    disconnected: str | None = None  # where we cut it: before_headers | during_body
    malformed: str | None = None
    inband_error: str | None = None
    elapsed: float = 0.0
    completion_tokens: int = 0
    body_excerpt: str = ""
    response_excerpt: str = ""


# --------------------------------------------------------------------------- one request
def _excerpt(body: Any, limit: int = 400) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body)
    return text[:limit]


def _check_ok(plan: Plan, out: Outcome, text: str, sse: bool) -> None:
    """Validate a complete 200 response; sets out.malformed / out.inband_error."""
    try:
        if not sse:
            data = json.loads(text)
            choices = data.get("choices") or []
            if plan.n_choices and len(choices) != plan.n_choices:
                out.malformed = f"{len(choices)} choices, expected {plan.n_choices}"
            elif any(c.get("finish_reason") is None for c in choices):
                out.malformed = "a choice without finish_reason"
            out.completion_tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
            return
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            out.malformed = "stream did not end with data: [DONE]"
            return
        finished: set[int] = set()
        for payload in events[:-1]:
            data = json.loads(payload)
            err = data.get("error")
            if isinstance(err, dict):
                if err.get("type") == "server_error" and err.get("code") != "engine_overloaded":
                    out.inband_error = payload[:300]
                continue
            for choice in data.get("choices") or []:
                if choice.get("finish_reason") is not None:
                    finished.add(choice.get("index"))
            if data.get("usage"):
                out.completion_tokens = int(data["usage"].get("completion_tokens") or 0)
        if out.inband_error is None and plan.n_choices and len(finished) != plan.n_choices:
            out.malformed = f"{len(finished)} choices finished, expected {plan.n_choices}"
    except (ValueError, AttributeError, TypeError) as exc:
        out.malformed = f"unparsable 200 body: {type(exc).__name__}: {exc}"


async def _do_request(client: httpx.AsyncClient, plan: Plan, out: Outcome,
                      phase: list[str]) -> None:
    # ASCII JSON (lone surrogates as \ud800 escapes: httpx's json= would fail to encode them)
    content = plan.body if isinstance(plan.body, bytes) else json.dumps(plan.body).encode()
    async with client.stream("POST", plan.path, content=content,
                             headers={"content-type": "application/json"}) as resp:
        phase[0] = "during_body"
        out.status = resp.status_code
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")
        if plan.disconnect == "mid_stream" and resp.status_code == 200 and sse:
            chunks = 0
            async for _ in resp.aiter_lines():
                chunks += 1
                if chunks >= plan.disconnect_at:
                    out.disconnected = "during_body"
                    return  # leaving the block closes the connection mid-stream
        raw = await resp.aread()
    text = raw.decode("utf-8", "replace")
    if out.status == 200:
        _check_ok(plan, out, text, sse)
    else:
        try:
            err = json.loads(text).get("error") or {}
            out.code = err.get("code")
            if not isinstance(err, dict) or not {"message", "type"} <= set(err):
                out.malformed = "error body without the OpenAI error shape"
        except (ValueError, AttributeError):
            out.malformed = "error body is not JSON"
    if out.status != 200 or out.malformed or out.inband_error:
        out.response_excerpt = text[:400]


async def run_one(client: httpx.AsyncClient, plan: Plan, timeout: float) -> Outcome:
    out = Outcome(plan.index, plan.path, plan.bad)
    phase = ["before_headers"]
    start = time.perf_counter()
    cut_after = None
    if plan.disconnect in ("before_first_byte", "timer"):
        cut_after = plan.disconnect_at
    task = asyncio.ensure_future(_do_request(client, plan, out, phase))
    try:
        await asyncio.wait_for(asyncio.shield(task), cut_after if cut_after is not None else timeout)
    except asyncio.TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if cut_after is not None:
            out.disconnected = phase[0]
        else:
            out.error = f"no complete response within {timeout:.0f} s"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - anything else is a lost request too
        out.error = f"{type(exc).__name__}: {exc}"
    if out.disconnected and not out.error:
        out.status = None if out.disconnected == "before_headers" else out.status
    out.elapsed = time.perf_counter() - start
    if out.error or out.malformed or out.inband_error or (out.status or 0) >= 500:
        out.body_excerpt = _excerpt(plan.body)
    return out


# --------------------------------------------------------------------------- metrics
async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    resp = await client.get("/metrics", timeout=10)
    resp.raise_for_status()
    out: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[sample.name] += sample.value
    return out


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> dict[str, float] | None:
    """Gauges once running == waiting == 0 and KV usage == 0, or the last scrape at timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = await scrape(client)
        except httpx.HTTPError:
            last = None
        if last is not None and last.get("strix:num_requests_running", -1) == 0 \
                and last.get("strix:num_requests_waiting", -1) == 0 \
                and last.get("strix:kv_cache_usage_perc", -1) == 0:
            return last
        if time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- the run
@dataclass
class RssTrack:
    pid: int | None
    warmup_after: int
    warm: dict[str, int] | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)


async def soak(args: argparse.Namespace, base_url: str, pid: int | None) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 8,
                          max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:
        models = (await client.get("/v1/models", timeout=30)).json()["data"]
        max_model_len = int(models[0].get("max_model_len") or 2048)
        rng = random.Random(args.seed)
        plans = [make_plan(rng, i, args, max_model_len) for i in range(args.requests)]
        outcomes: list[Outcome] = []
        track = RssTrack(pid, max(1, int(args.requests * args.warmup_fraction)))
        progress_every = max(1, args.requests // 10)
        next_plan = iter(plans)
        start = time.perf_counter()
        deadline = start + args.max_duration

        def sample_rss() -> dict[str, int] | None:
            if track.pid is None:
                return None
            rss = rss_kib(track.pid)
            if rss:
                track.samples.append((round(time.perf_counter() - start, 1), rss["VmRSS"]))
            return rss

        async def rss_sampler() -> None:
            while True:
                await asyncio.sleep(args.rss_every)
                sample_rss()

        def progress() -> None:
            done = len(outcomes)
            counts = tally(outcomes)
            rss = track.samples[-1][1] // 1024 if track.samples else None
            print(f"  {done}/{args.requests} in {time.perf_counter() - start:.0f} s: ok "
                  f"{counts['ok']}, 4xx {counts['client_errors']}, unexpected 5xx "
                  f"{counts['unexpected_5xx']}, lost {counts['lost']}, malformed "
                  f"{counts['malformed']}, disconnects {counts['disconnects']}"
                  + (f", RSS {rss} MiB" if rss is not None else ""), flush=True)

        async def worker() -> None:
            for plan in next_plan:
                if time.perf_counter() > deadline:
                    return
                outcomes.append(await run_one(client, plan, args.request_timeout))
                if len(outcomes) == track.warmup_after:
                    track.warm = sample_rss()
                if len(outcomes) % progress_every == 0:
                    sample_rss()
                    progress()

        sampler = asyncio.ensure_future(rss_sampler()) if pid is not None else None
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        idle = await wait_idle(client, args.idle_timeout)
        end_rss = sample_rss()
    return summarize(args, plans, outcomes, elapsed, idle, track, end_rss)


def tally(outcomes: list[Outcome]) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for o in outcomes:
        if o.error:
            c["lost"] += 1
        elif o.disconnected:
            c["disconnects"] += 1
            c[f"disconnects_{o.disconnected}"] += 1
        elif o.status is not None and o.status >= 500:
            if o.status == 503 and o.code == "engine_overloaded":
                c["overloaded_503"] += 1
            else:
                c["unexpected_5xx"] += 1
        elif o.inband_error:
            c["unexpected_5xx"] += 1
            c["inband_server_errors"] += 1
        elif o.malformed:
            c["malformed"] += 1
        elif o.status == 200:
            c["ok"] += 1
            if o.bad:
                c["bad_accepted"] += 1
        elif o.status is not None and o.status >= 400:
            c["client_errors"] += 1
            if not o.bad:
                c["unexpected_4xx"] += 1
    return c


def summarize(args: argparse.Namespace, plans: list[Plan], outcomes: list[Outcome],
              elapsed: float, idle: dict[str, float] | None, track: RssTrack,
              end_rss: dict[str, int] | None) -> dict:
    counts = tally(outcomes)
    by_code = collections.Counter(str(o.status) for o in outcomes
                                  if not o.error and not o.disconnected and o.status != 200)
    kv = idle.get("strix:kv_cache_usage_perc") if idle else None
    running = idle.get("strix:num_requests_running") if idle else None
    waiting = idle.get("strix:num_requests_waiting") if idle else None
    warm_rss = track.warm["VmRSS"] if track.warm else None
    end = end_rss["VmRSS"] if end_rss else None
    growth = round((end - warm_rss) / warm_rss * 100, 2) if warm_rss and end else None
    ok_lat = [o.elapsed for o in outcomes if o.status == 200 and not o.disconnected
              and not o.error]
    tokens = sum(o.completion_tokens for o in outcomes)
    interesting = [o for o in outcomes if o.error or o.malformed or o.inband_error
                   or (o.status is not None and o.status >= 500
                       and not (o.status == 503 and o.code == "engine_overloaded"))
                   or (o.status is not None and 400 <= o.status < 500 and not o.bad
                       and not o.disconnected)]
    summary = {
        "requests_planned": len(plans), "requests_done": len(outcomes),
        "ok": counts["ok"], "errors_by_http_code": dict(sorted(by_code.items())),
        "client_errors_4xx": counts["client_errors"],
        "bad_inputs_sent": sum(1 for o in outcomes if o.bad),
        "bad_inputs_accepted_200": counts["bad_accepted"],
        "unexpected_4xx_on_good_input": counts["unexpected_4xx"],
        "unexpected_5xx": counts["unexpected_5xx"],
        "inband_server_errors": counts["inband_server_errors"],
        "overloaded_503": counts["overloaded_503"],
        "lost": counts["lost"], "malformed": counts["malformed"],
        "disconnects": counts["disconnects"],
        "disconnects_before_headers": counts["disconnects_before_headers"],
        "disconnects_during_body": counts["disconnects_during_body"],
        "kv_cache_usage_end": kv, "num_requests_running_end": running,
        "num_requests_waiting_end": waiting,
        "rss_warm_mib": round(warm_rss / 1024, 1) if warm_rss else None,
        "rss_end_mib": round(end / 1024, 1) if end else None,
        "rss_peak_mib": round(end_rss["VmHWM"] / 1024, 1) if end_rss else None,
        "rss_growth_pct": growth,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(outcomes) / elapsed, 2) if elapsed > 0 else None,
        "completion_tokens_reported": tokens,
        "completion_tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "ok_latency_ms_p50": _ms(percentile(ok_lat, 50)),
        "ok_latency_ms_p99": _ms(percentile(ok_lat, 99)),
    }
    failures = []
    if summary["requests_done"] < summary["requests_planned"]:
        failures.append(f"only {len(outcomes)}/{len(plans)} requests done within --max-duration")
    if counts["lost"]:
        failures.append(f"{counts['lost']} request(s) lost")
    if counts["unexpected_5xx"]:
        failures.append(f"{counts['unexpected_5xx']} unexpected server error(s)")
    if counts["malformed"]:
        failures.append(f"{counts['malformed']} malformed response(s)")
    if kv != 0:
        failures.append(f"KV cache usage once idle is {kv}, not 0")
    summary["failures"] = failures
    return {"summary": summary,
            "rss_samples_kib": track.samples,
            "problems": [asdict(o) for o in interesting[:50]]}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    else:
        server_args = []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after `--` go to `python -m server`.")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write config + summary + problems to this file")
    p.add_argument("--model", default="smollm2-135m", help="--model for the started server")
    p.add_argument("--url", help="attach to this running server (loopback) instead of "
                   "starting one; no RSS then")
    p.add_argument("--disconnect-fraction", type=float, default=0.1)
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="RSS baseline taken after this share of requests")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="a request without a complete response by then is lost")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="how long to wait for the server to go idle at the end")
    p.add_argument("--max-duration", type=float, default=4 * 3600.0,
                   help="stop launching requests after this many seconds")
    p.add_argument("--rss-every", type=float, default=10.0, help="RSS sampling period (s)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if not 1 <= args.requests <= MAX_REQUESTS or args.concurrency < 1:
        p.error(f"--requests must be in [1, {MAX_REQUESTS}] and --concurrency >= 1")
    for name in ("disconnect_fraction", "bad_fraction", "warmup_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    if args.url and server_args:
        p.error("server arguments after -- need a started server (no --url)")
    return args, server_args


def print_report(result: dict) -> None:
    s = result["summary"]
    print(f"soak: {s['requests_done']}/{s['requests_planned']} requests in {s['elapsed_s']} s "
          f"({s['requests_per_s']} req/s, {s['completion_tokens_per_s']} completion tok/s)")
    print(f"  ok {s['ok']}   errors by HTTP code {s['errors_by_http_code']}")
    print(f"  bad inputs sent {s['bad_inputs_sent']} (accepted with 200: "
          f"{s['bad_inputs_accepted_200']}); 4xx on good input {s['unexpected_4xx_on_good_input']}")
    print(f"  unexpected 5xx {s['unexpected_5xx']} (in-band {s['inband_server_errors']})   "
          f"overloaded 503 {s['overloaded_503']}   lost {s['lost']}   malformed {s['malformed']}")
    print(f"  disconnects {s['disconnects']} (before headers {s['disconnects_before_headers']}, "
          f"during body {s['disconnects_during_body']})")
    print(f"  at the end: kv_cache_usage {s['kv_cache_usage_end']}, running "
          f"{s['num_requests_running_end']}, waiting {s['num_requests_waiting_end']}")
    print(f"  RSS MiB: after warm-up {s['rss_warm_mib']}, end {s['rss_end_mib']}, peak "
          f"{s['rss_peak_mib']}, growth {s['rss_growth_pct']} %")
    print(f"  ok latency ms p50 {s['ok_latency_ms_p50']} p99 {s['ok_latency_ms_p99']}")
    for problem in result["problems"][:5]:
        print(f"  problem: {problem['path']} status={problem['status']} "
              f"error={problem['error']} malformed={problem['malformed']} "
              f"inband={problem['inband_error']}\n    body: {problem['body_excerpt'][:200]}\n"
              f"    response: {problem['response_excerpt'][:200]}")
    for failure in s["failures"]:
        print(f"  FAIL: {failure}")
    print("  PASS" if not s["failures"] else "  soak FAILED")


def main(argv: list[str] | None = None) -> int:
    args, server_args = parse_args(sys.argv[1:] if argv is None else argv)
    server = None
    if args.url:
        check_loopback(args.url)
        base_url = args.url.rstrip("/")
    else:
        try:
            server = Server(args.model, server_args, args.start_timeout)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        base_url = server.url
    try:
        try:
            result = asyncio.run(soak(args, base_url, server.pid if server else None))
        except httpx.HTTPError as exc:
            print(f"error: cannot talk to {base_url}: {exc}", file=sys.stderr)
            return 2
        if server is not None and not server.alive():
            result["summary"]["failures"].append(
                f"server process exited with {server.proc.returncode}")
            print(server.log_tail())
    finally:
        exit_code = server.stop() if server is not None else None
    result["summary"]["server_exit_code"] = exit_code
    config = {k: v for k, v in vars(args).items() if k != "json"}
    result = {"config": {**config, "server_args": server_args, "url": base_url}, **result}
    print_report(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
        print(f"  wrote {args.json}")
    return 1 if result["summary"]["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

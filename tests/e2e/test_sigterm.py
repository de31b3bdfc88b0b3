"""SIGTERM with requests in flight: short ones finish, the one that outlives
--shutdown-timeout is aborted (its stream ends with finish_reason "abort"),
and the process exits 0."""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.helpers import ServerProcess, parse_sse, require_engine

SHUTDOWN_TIMEOUT_S = 15
SHORT_TOKENS = 24


def _short(base: str, i: int) -> httpx.Response:
    body = {"prompt": f"Request {i}:", "max_tokens": SHORT_TOKENS, "ignore_eos": True}
    return httpx.post(base + "/v1/completions", json=body, timeout=120)


def _long_stream(base: str) -> list:
    """SSE events of a stream that cannot finish in time."""
    body = {"prompt": "An endless story:", "max_tokens": 8000, "ignore_eos": True,
            "stream": True}
    lines = []
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
    except httpx.HTTPError:
        pass  # a cut connection: the assertions below fail with what did arrive
    return parse_sse(lines)


def _running(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("strix:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_sigterm_drains_then_exits_zero():
    require_engine()
    server = ServerProcess(["--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S)]).start()
    base = server.base_url
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            long = pool.submit(_long_stream, base)
            shorts = [pool.submit(_short, base, i) for i in range(3)]
            deadline = time.monotonic() + 60
            while _running(base) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _running(base) >= 4, "requests did not reach the engine"
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            rc = server.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 45)
            elapsed = time.monotonic() - signalled
            results = [f.result(timeout=30) for f in shorts]
            events = long.result(timeout=30)
    finally:
        server.stop()
    assert rc == 0, server.log_tail()
    for resp in results:
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == SHORT_TOKENS
    assert len(events) > 2 and events[-1] == "[DONE]", events[-3:]
    assert events[-2]["choices"][0]["finish_reason"] == "abort"
    assert elapsed < SHUTDOWN_TIMEOUT_S + 30

"""Faults through the real server process (tests/e2e/faulty_server.py injects them):

* a fault for one request: a stream ends with a finish_reason "error" chunk, an
  error event and [DONE]; a non-streaming request gets a 500 in OpenAI shape; an
  n > 1 request fails as a whole; concurrent requests complete exactly as in a
  fault-free run; the engine stays healthy; `finished_reason="error"` is counted.
* the engine thread dies (a bug): open streams end with an error event and [DONE],
  waiting non-streaming requests get a 500, and the process exits with status 70.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.e2e.helpers import ServerProcess, parse_sse
from tests.e2e.test_server_http import assert_openai_error, metric, wait_for

FAULT = {"cache_salt": "fault-request"}
NORMAL = {"prompt": "The three primary colors are", "max_tokens": 10, "temperature": 0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def faulty_server():
    server = ServerProcess(["--max-num-seqs", "16"], module="tests.e2e.faulty_server").start()
    yield server
    server.stop()


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> list:
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        return parse_sse([line async for line in resp.aiter_lines()])


def _assert_stream_failed(events: list, n: int = 1) -> None:
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "request_failed"
    reasons = {c["index"]: c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]}
    assert reasons == {i: "error" for i in range(n)}


def test_request_fault_fails_only_that_request(faulty_server):
    base = faulty_server.base_url
    comp, chat = base + "/v1/completions", base + "/v1/chat/completions"
    reference = httpx.post(comp, json=NORMAL, timeout=120).json()["choices"][0]["text"]
    chat_fault = {"messages": [{"role": "user", "content": "Name two birds."}], "n": 2,
                  "temperature": 0.8, "seed": 1, "max_tokens": 12, **FAULT}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                _stream(client, comp, NORMAL),
                _stream(client, comp, {**NORMAL, "max_tokens": 12, **FAULT}),
                _stream(client, chat, chat_fault),
                client.post(comp, json={**NORMAL, **FAULT}),
                client.post(chat, json=chat_fault),
                client.post(comp, json=NORMAL))
    ok_stream, bad_stream, bad_chat_stream, bad_plain, bad_chat_plain, ok_plain = asyncio.run(run())

    _assert_stream_failed(bad_stream)
    _assert_stream_failed(bad_chat_stream, n=2)
    assert_openai_error(bad_plain, 500, code="request_failed")
    assert_openai_error(bad_chat_plain, 500, code="request_failed")
    # The survivors are exactly what a fault-free run gives.
    assert ok_plain.status_code == 200 and ok_plain.json()["choices"][0]["text"] == reference
    assert ok_stream[-1] == "[DONE]"
    assert "".join(c["text"] for e in ok_stream[:-1] for c in e["choices"]) == reference
    assert httpx.get(base + "/health").status_code == 200
    assert wait_for(lambda: metric(base, "strix:kv_cache_usage_perc") == 0)
    text = httpx.get(base + "/metrics").text
    errors = [line for line in text.splitlines()
              if line.startswith("strix:request_success_total") and 'finished_reason="error"' in line]
    assert errors and float(errors[0].split()[-1]) >= 1 + 2 + 1 + 2  # sequences finished with error


def test_engine_death_fails_in_flight_requests_and_exits_70():
    server = ServerProcess([], module="tests.e2e.faulty_server").start()
    base = server.base_url
    comp = base + "/v1/completions"
    long = {"prompt": "Count to one thousand:", "max_tokens": 2000, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", comp, json={**long, "stream": True}) as resp:
                lines = resp.aiter_lines()
                first = await lines.__anext__()
                waiting = asyncio.ensure_future(client.post(comp, json=long))
                await asyncio.sleep(0.5)
                killer = await client.post(comp, json={"prompt": "x", "max_tokens": 2,
                                                       "cache_salt": "kill-engine"})
                rest = [line async for line in lines]
            health = await client.get(base + "/health")
            return first, rest, await waiting, killer, health

    try:
        first, rest, waited, killer, health = asyncio.run(run())
        events = parse_sse([first, *rest])
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead"
        assert_openai_error(waited, 500, code="engine_dead")
        assert_openai_error(killer, 500, code="engine_dead")
        assert health.status_code == 503
        assert server.proc.wait(timeout=60) == 70
        assert "engine thread died" in server.log_tail(20000)
    finally:
        server.stop()


def test_health_and_metrics_json_error_shape_on_unknown_route(faulty_server):
    resp = httpx.get(faulty_server.base_url + "/v1/nothing-here")
    err = assert_openai_error(resp, 404)
    assert json.loads(resp.text)["error"]["type"] == "invalid_request_error" and err["code"] == "not_found"

"""Raw HTTP against the real server on the default model: error shapes, auth,
overload, disconnects freeing KV blocks, 32 concurrent streams, /metrics."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import API_KEY, DEFAULT_MODEL, parse_sse

CHAT = {"messages": [{"role": "user", "content": "Tell me a long story."}]}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def metric(base_url: str, name: str) -> float:
    """Sum of a metric's samples named exactly `name` (labels summed over)."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.name == name)


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def assert_openai_error(resp: httpx.Response, status: int, param=None, code=None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in resp.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop", None),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "prompt", None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 16}, 400, None,
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, 400, None,
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400, "presence_penalty", None),
])
def test_error_cases(real_server, path, body, status, param, code):
    resp = httpx.post(real_server.base_url + path, json=body, timeout=60)
    err = assert_openai_error(resp, status, param, code)
    if code == "context_length_exceeded":
        assert "8192" in err["message"]  # both numbers: the limit and what was asked


def test_unknown_fields_ignored_and_no_422(real_server):
    body = {"prompt": "Hi", "max_tokens": 2, "future_sdk_field": [1, 2], "user": "u1"}
    assert httpx.post(real_server.base_url + "/v1/completions", json=body,
                      timeout=60).status_code == 200
    bad = httpx.post(real_server.base_url + "/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"}, timeout=60)
    assert_openai_error(bad, 400)


def test_auth_off_by_default(real_server):
    assert httpx.get(real_server.base_url + "/v1/models").status_code == 200


def test_auth_on(restricted_server):
    url = restricted_server.base_url
    assert_openai_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
    assert_openai_error(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 401)
    assert_openai_error(httpx.get(url + "/v1/models",
                                  headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == DEFAULT_MODEL
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200


def test_overload_503_with_retry_after(restricted_server):
    """max-num-seqs 1 + max-waiting-requests 1: one runs, one waits, the next gets 503."""
    url = restricted_server.base_url + "/v1/completions"

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            long = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            async with client.stream("POST", url, json=long) as running:
                lines = running.aiter_lines()
                await lines.__anext__()
                waiting = asyncio.ensure_future(client.post(url, json={"prompt": "a",
                                                                       "max_tokens": 2}))
                await asyncio.sleep(1.0)
                rejected = await client.post(url, json={"prompt": "b", "max_tokens": 2})
                await lines.aclose()
            return rejected, await waiting

    rejected, waited = asyncio.run(run())
    assert_openai_error(rejected, 503, code="engine_overloaded")
    assert int(rejected.headers["retry-after"]) >= 1
    assert waited.status_code == 200


def test_disconnect_mid_stream_frees_blocks(real_server):
    base = real_server.base_url
    aborted_before = metric(base, "strix:request_aborted_total")
    body = {"prompt": "Write a very long essay about the sea.", "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
        assert metric(base, "strix:kv_cache_usage_perc") > 0
        assert metric(base, "strix:num_requests_running") == 1
    assert wait_for(lambda: metric(base, "strix:kv_cache_usage_perc") == 0)
    assert wait_for(lambda: metric(base, "strix:request_aborted_total") >= aborted_before + 1)
    assert metric(base, "strix:num_requests_running") == 0


def test_disconnect_mid_request_frees_blocks(real_server):
    base = real_server.base_url
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions",
                   json={**CHAT, "max_tokens": 4000, "ignore_eos": True}, timeout=2.0)
    assert wait_for(lambda: metric(base, "strix:kv_cache_usage_perc") == 0)


def test_32_concurrent_streams(real_server):
    url = real_server.base_url + "/v1/completions"
    prompts = [f"Request number {i} says:" for i in range(32)]

    async def one(client: httpx.AsyncClient, prompt: str) -> tuple[list, int]:
        body = {"prompt": prompt, "max_tokens": 16, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with client.stream("POST", url, json=body) as resp:
            assert resp.status_code == 200
            events = parse_sse([line async for line in resp.aiter_lines()])
        count = (await client.post(real_server.base_url + "/tokenize",
                                   json={"prompt": prompt})).json()["count"]
        return events, count

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    for events, prompt_tokens in asyncio.run(run()):
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": 16,
                         "total_tokens": prompt_tokens + 16}
        assert events[-3]["choices"][0]["finish_reason"] == "length"


def test_metrics_parse(real_server):
    base = real_server.base_url
    httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
    text = httpx.get(base + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {"strix:num_requests_running": "gauge", "strix:num_requests_waiting": "gauge",
                "strix:kv_cache_usage_perc": "gauge", "strix:prompt_tokens": "counter",
                "strix:generation_tokens": "counter", "strix:request_success": "counter",
                "strix:num_preemptions": "counter", "strix:prefix_cache_queries": "counter",
                "strix:prefix_cache_hits": "counter", "strix:request_aborted": "counter",
                "strix:time_to_first_token_seconds": "histogram",
                "strix:inter_token_latency_seconds": "histogram",
                "strix:e2e_request_latency_seconds": "histogram",
                "strix:request_queue_time_seconds": "histogram",
                "strix:request_prompt_tokens": "histogram",
                "strix:request_generation_tokens": "histogram"}
    for name, kind in expected.items():
        assert families[name].type == kind, name
    assert metric(base, "strix:generation_tokens_total") >= 4
    assert metric(base, "strix:time_to_first_token_seconds_count") >= 1
    reasons = {s.labels.get("finished_reason") for s in families["strix:request_success"].samples}
    assert "length" in reasons


def test_service_endpoints(real_server):
    base = real_server.base_url
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/version").json()["name"] == "strix"
    tok = httpx.post(base + "/tokenize", json={"prompt": "Hello world"}).json()
    text = httpx.post(base + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world") and tok["max_model_len"] == 8192
    chat = httpx.post(base + "/tokenize", json=CHAT).json()
    assert chat["count"] > tok["count"]
    json.dumps(chat)

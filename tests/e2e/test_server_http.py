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
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "minProperties": 2, "maxProperties": 1}}}}, 400,
     "response_format", None),
    # A constraint no token sequence of this tokenizer can follow (byte 0xF2 has no token):
    # the request fails alone, as the client's error.
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "structured_outputs": {"regex": "\U000a3f2b"}},
     400, "structured_outputs", "constraint_failed"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 3}, 400, "presence_penalty", None),
    # Ids and numbers the engine cannot hold: refused at the edge, naming the field.
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 1,
                         "stop_token_ids": [9223372036854775808]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [49152]}, 400, "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"49152": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"18446744073709551616": 1}}, 400,
     "logit_bias", None),
    ("/v1/completions", {"prompt": "hi", "seed": 2 ** 64}, 400, "seed", None),
    ("/v1/completions", {"prompt": "hi", "n": 129}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of", None),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20, "max_tokens": 10}, 400, "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "stop": ["x"] * 65}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "cache_salt": ""}, 400, "cache_salt", None),
    ("/v1/completions", {"prompt": "a\u0000b"}, 400, "prompt", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", None),
    ("/detokenize", {"tokens": [49152]}, 400, "tokens", None),
])
def test_error_cases(real_server, path, body, status, param, code):
    resp = httpx.post(real_server.base_url + path, json=body, timeout=60)
    err = assert_openai_error(resp, status, param, code)
    if code == "context_length_exceeded":
        assert "8192" in err["message"]  # both numbers: the limit and what was asked


def test_the_engine_survives_the_issue_request(real_server):
    """The request that used to kill the engine thread: 400, then business as usual."""
    base = real_server.base_url
    bad = {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 1,
           "stop_token_ids": [9223372036854775808]}
    assert_openai_error(httpx.post(base + "/v1/completions", json=bad, timeout=60), 400,
                        param="stop_token_ids")
    ok = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(base + "/health").status_code == 200


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "temperature": NaN}', "temperature"),
    (b'{"prompt": "x", "top_p": Infinity}', "top_p"),
    (b'{"prompt": "x", "presence_penalty": -Infinity}', "presence_penalty"),
    (rb'{"prompt": "x\ud800"}', "prompt"),
    (rb'{"prompt": "x", "stop": ["\udc00"]}', "stop"),
    (rb'{"messages": [{"role": "user", "content": "x\ud800"}]}', "messages"),
])
def test_non_finite_numbers_and_lone_surrogates(real_server, raw, param):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    resp = httpx.post(real_server.base_url + path, content=raw,
                      headers={"content-type": "application/json"}, timeout=60)
    err = assert_openai_error(resp, 400)
    assert err["param"].startswith(param)


def test_body_over_limit_is_413(real_server):
    url = real_server.base_url + "/v1/completions"
    big = b'{"prompt": "' + b"a" * (10 << 20) + b'"}'
    assert_openai_error(httpx.post(url, content=big, headers={"content-type": "application/json"},
                                   timeout=60), 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while it streams in
        yield b'{"prompt": "'
        for _ in range(11):
            yield b"a" * (1 << 20)
        yield b'"}'
    assert_openai_error(httpx.post(url, content=chunks(), headers={"content-type": "application/json"},
                                   timeout=60), 413, code="request_too_large")
    ok = b'{"prompt": "hi", "max_tokens": 1, "user": "' + b"u" * ((10 << 20) - 100) + b'"}'
    assert httpx.post(url, content=ok, headers={"content-type": "application/json"},
                      timeout=60).status_code == 200


def test_stop_string_across_tokens_streams_without_leaking(real_server):
    """A stop string spanning several tokens: the stream never shows any part of it
    (the partial match is held back), and ends exactly where the plain response does."""
    url = real_server.base_url + "/v1/completions"
    base = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    full = httpx.post(url, json={**base, "logprobs": 0}, timeout=60).json()["choices"][0]
    tokens = full["logprobs"]["tokens"]
    start = next(i for i in range(2, len(tokens) - 4) if tokens[i].strip())
    stop = "".join(tokens[start:start + 3])  # three tokens' worth of text
    assert len(stop) > 2
    expected = full["text"][:full["text"].index(stop)]
    plain = httpx.post(url, json={**base, "stop": [stop]}, timeout=60).json()["choices"][0]
    assert plain["text"] == expected and plain["finish_reason"] == "stop"
    with httpx.stream("POST", url, json={**base, "stop": [stop], "stream": True}, timeout=60) as r:
        events = parse_sse(r.iter_lines())
    pieces = [c["text"] for e in events[:-1] for c in e["choices"]]
    assert "".join(pieces) == expected and events[-2]["choices"][0]["finish_reason"] == "stop"
    streamed = ""
    for piece in pieces:  # no prefix of the stop string ever reached the client early
        streamed += piece
        assert stop not in streamed


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


def test_overload_n_waiting_accepted_n_plus_1_refused(restricted_server):
    """max-num-seqs 1 + max-waiting-requests 2: one runs, two wait (accepted), the next gets 503."""
    url = restricted_server.base_url + "/v1/completions"

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            long = {"prompt": "Count:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
            async with client.stream("POST", url, json=long) as running:
                lines = running.aiter_lines()
                await lines.__anext__()
                waiting = [asyncio.ensure_future(client.post(url, json={"prompt": p, "max_tokens": 2}))
                           for p in ("a", "b")]
                await asyncio.sleep(1.5)
                rejected = await client.post(url, json={"prompt": "c", "max_tokens": 2})
                await lines.aclose()
            return rejected, await asyncio.gather(*waiting)

    rejected, waited = asyncio.run(run())
    assert_openai_error(rejected, 503, code="engine_overloaded")
    assert int(rejected.headers["retry-after"]) >= 1
    assert [w.status_code for w in waited] == [200, 200]


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
                "strix:request_generation_tokens": "histogram",
                "strix:step_duration_seconds": "histogram", "strix:batch_size": "histogram",
                "strix:time_per_output_token_seconds": "histogram",
                "process_cpu_seconds": "counter", "process_resident_memory_bytes": "gauge"}
    for name, kind in expected.items():
        assert families[name].type == kind, name
    assert metric(base, "strix:generation_tokens_total") >= 4
    for name in ("time_to_first_token_seconds", "step_duration_seconds", "batch_size",
                 "time_per_output_token_seconds"):
        assert metric(base, f"strix:{name}_count") >= 1, name
    assert metric(base, "strix:step_duration_seconds_sum") > 0
    assert metric(base, "strix:batch_size_sum") >= metric(base, "strix:batch_size_count")
    assert metric(base, "process_resident_memory_bytes") > 100 * 2**20
    by_reason = {s.labels["finished_reason"]: s.value
                 for s in families["strix:request_success"].samples if s.name.endswith("_total")}
    assert set(by_reason) >= {"stop", "length", "error"}  # created at start-up, for rate()
    assert by_reason["length"] >= 1


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


def test_shared_prefix_metrics(real_server):
    """Four streams over one ~1,000-token prompt: auto decomposes their shared level (3 x
    1,000 saved rows per layer), and the metrics count it."""
    base = real_server.base_url
    before = metric(base, "strix:shared_prefix_tokens_total")
    shared = "The reading room opens at nine and closes at six on weekdays. " * 70

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": shared + f"Visitor {i} asks:", "max_tokens": 8, "ignore_eos": True}
        assert (await client.post(base + "/v1/completions", json=body)).status_code == 200

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(one(client, i) for i in range(4)))

    asyncio.run(run())
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
    assert families["strix:shared_prefix_groups"].type == "gauge"
    assert families["strix:shared_prefix_tokens"].type == "counter"
    # At least one decode step of the four decomposed their ~62 shared blocks.
    assert metric(base, "strix:shared_prefix_tokens_total") - before >= 4 * 900

"""The HTTP app over a deterministic FakeEngine: response shapes, streaming,
errors, auth, disconnects, metrics. Fast; no model needed."""
from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.app import ServerSettings
from tests.e2e.helpers import parse_sse, start_fake_server, stop_fake_server
from tests.e2e.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _assert_error(resp: httpx.Response, status: int, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_completion_shape_echo_and_logprobs(fake_server):
    body = {"prompt": "hi", "max_tokens": 5, "temperature": 0, "echo": True, "logprobs": 2}
    r = httpx.post(fake_server.base_url + "/v1/completions", json=body)
    data = r.json()
    assert r.status_code == 200 and data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-") and data["model"] == "fake-model"
    choice = data["choices"][0]
    assert choice["text"] == "hiThe q" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert lp["tokens"] == list("hiThe q")
    assert lp["token_logprobs"][:2] == [None, None] and lp["token_logprobs"][2] == -0.25
    assert lp["top_logprobs"][:2] == [None, None] and len(lp["top_logprobs"][2]) == 2
    assert lp["text_offset"] == list(range(7))
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_completion_several_prompts_and_n(fake_server):
    body = {"prompt": ["a", "bc"], "n": 2, "max_tokens": 3, "seed": 1}
    data = httpx.post(fake_server.base_url + "/v1/completions", json=body).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert data["usage"]["prompt_tokens"] == 3
    assert data["usage"]["completion_tokens"] == 12


def test_completion_stream_with_usage(fake_server):
    body = {"prompt": "x", "max_tokens": 4, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    text = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert text == "The " and events[-3]["choices"][0]["finish_reason"] == "length"


def test_chat_shape_and_stream(fake_server):
    url = fake_server.base_url + "/v1/chat/completions"
    data = httpx.post(url, json={**CHAT, "max_tokens": 3, "temperature": 0}).json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "The"}
    body = {**CHAT, "max_tokens": 3, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body) as r:
        events = parse_sse(r.iter_lines())
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    firsts = {}
    for c in chunks[:-1]:
        firsts.setdefault(c["choices"][0]["index"], c["choices"][0]["delta"])
    assert firsts == {0: {"role": "assistant", "content": ""},
                      1: {"role": "assistant", "content": ""}}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]
                if c["choices"][0]["finish_reason"]]
    assert finishes == ["length", "length"]


def test_chat_logprobs_and_content_parts(fake_server):
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                         {"role": "user", "content": "hi"}],
            "max_tokens": 2, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "some_future_field": {"x": 1}}
    data = httpx.post(fake_server.base_url + "/v1/chat/completions", json=body).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["T", "h"]
    assert content[0]["bytes"] == [84] and len(content[0]["top_logprobs"]) == 3


def test_stop_string(fake_server):
    body = {"prompt": "x", "max_tokens": 20, "temperature": 0, "stop": ["brown"]}
    choice = httpx.post(fake_server.base_url + "/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "The quick " and choice["finish_reason"] == "stop"


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "x", "temperature": 5}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "x", "top_k": -7}, 400, "top_k", None),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": "x", "seed": 2 ** 70}, 400, "seed", None),
    ("/v1/completions", {"prompt": [], "max_tokens": 3}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [99999]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, 400, "prompt",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400,
     "response_format.type", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"},
                              "guided_regex": "a+"}, 400, "guided_regex", None),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", None),
])
def test_errors_are_openai_shaped(fake_server, path, body, status, param, code):
    resp = httpx.post(fake_server.base_url + path, json=body)
    _assert_error(resp, status, param, code)


def test_bad_json_and_unknown_route(fake_server):
    r = httpx.post(fake_server.base_url + "/v1/completions", content=b"{nope",
                   headers={"content-type": "application/json"})
    _assert_error(r, 400)
    _assert_error(httpx.get(fake_server.base_url + "/v1/nothing"), 404)
    resp = httpx.post(fake_server.base_url + "/v1/chat/completions",
                      json={**CHAT, "response_format": {"type": "json_schema"}})
    assert "needs json_schema.schema" in resp.json()["error"]["message"]


def test_overload_gives_503_with_retry_after():
    fake = start_fake_server(FakeEngine(capacity=1, step_delay=0.01))
    try:
        url = fake.base_url + "/v1/completions"
        long = {"prompt": "x", "max_tokens": 300, "stream": True}
        with httpx.stream("POST", url, json=long) as first:
            lines = first.iter_lines()  # keep a reference: a dropped iterator closes the stream
            next(lines)
            resp = httpx.post(url, json={"prompt": "y", "max_tokens": 2})
            _assert_error(resp, 503, code="engine_overloaded")
            assert resp.headers["retry-after"] == "1"
    finally:
        stop_fake_server(fake)


def test_api_key():
    fake = start_fake_server(FakeEngine(), ServerSettings(api_key="sekret"))
    try:
        url = fake.base_url
        _assert_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
        bad = {"Authorization": "Bearer nope"}
        _assert_error(httpx.get(url + "/v1/models", headers=bad), 401)
        ok = {"Authorization": "Bearer sekret"}
        assert httpx.get(url + "/v1/models", headers=ok).status_code == 200
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200
    finally:
        stop_fake_server(fake)


def test_cors_off_by_default_and_on_when_asked(fake_server):
    origin = {"Origin": "http://example.com"}
    r = httpx.get(fake_server.base_url + "/v1/models", headers=origin)
    assert "access-control-allow-origin" not in r.headers
    fake = start_fake_server(FakeEngine(), ServerSettings(cors_origins=("http://example.com",)))
    try:
        r = httpx.get(fake.base_url + "/v1/models", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://example.com"
    finally:
        stop_fake_server(fake)


def test_stream_disconnect_aborts(fake_server):
    engine = fake_server.engine
    engine.step_delay = 0.01
    body = {"prompt": "x", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", fake_server.base_url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert len(engine.active) == 1
    assert _wait(lambda: len(engine.aborted) == 1 and not engine.active)


def test_non_stream_disconnect_aborts(fake_server):
    engine = fake_server.engine
    engine.step_delay = 0.01
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake_server.base_url + "/v1/chat/completions",
                   json={**CHAT, "max_tokens": 400}, timeout=0.3)
    assert _wait(lambda: len(engine.aborted) == 1 and not engine.active)


def test_metrics_parse_and_count(fake_server):
    httpx.post(fake_server.base_url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    text = httpx.get(fake_server.base_url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("strix:num_requests_running", "strix:num_requests_waiting",
                 "strix:kv_cache_usage_perc", "strix:prompt_tokens", "strix:generation_tokens",
                 "strix:request_success", "strix:num_preemptions", "strix:prefix_cache_queries",
                 "strix:prefix_cache_hits", "strix:request_aborted",
                 "strix:time_to_first_token_seconds", "strix:inter_token_latency_seconds",
                 "strix:e2e_request_latency_seconds", "strix:request_queue_time_seconds",
                 "strix:request_prompt_tokens", "strix:request_generation_tokens"):
        assert name in families, name
    gen = [s for s in families["strix:generation_tokens"].samples if s.name.endswith("_total")]
    assert gen[0].value == 3


def test_service_routes(fake_server):
    url = fake_server.base_url
    assert httpx.get(url + "/version").json()["name"] == "strix"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
    assert httpx.get(url + "/v1/models/fake-model").json()["id"] == "fake-model"
    tok = httpx.post(url + "/tokenize", json={"prompt": "hey"}).json()
    assert tok["tokens"] == [104, 101, 121] and tok["count"] == 3
    assert httpx.post(url + "/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    chat_tok = httpx.post(url + "/tokenize", json=CHAT).json()
    assert chat_tok["count"] > 3
    fake_server.engine.alive = False
    _assert_error(httpx.get(url + "/health"), 503)


def test_several_prompts_all_or_none():
    """One prompt of two refused by the engine: a 503, and the other is aborted."""
    fake = start_fake_server(FakeEngine(capacity=1, step_delay=0.01))
    try:
        resp = httpx.post(fake.base_url + "/v1/completions",
                          json={"prompt": ["a", "b"], "max_tokens": 50})
        _assert_error(resp, 503, code="engine_overloaded")
        assert _wait(lambda: not fake.engine.active and len(fake.engine.aborted) == 1)
    finally:
        stop_fake_server(fake)

"""Structured outputs through the real server with the official openai SDK: forced tool
calls (named and required, plain and streamed), `beta.chat.completions.parse` with a
pydantic model, response_format / structured_outputs / guided_* on both endpoints,
refused schemas as 400s naming the param, and a healthy server afterwards."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.helpers import DEFAULT_MODEL

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="unused", timeout=120)


def test_named_tool_choice_returns_tool_calls(client):
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                         max_tokens=60, tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_required_tool_choice_and_history(client):
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                         max_tokens=80, tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the assistant's tool call and the tool's answer go back through the chat template
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    follow = client.chat.completions.create(model=DEFAULT_MODEL, messages=history, tools=TOOLS,
                                            temperature=0, max_tokens=8)
    assert follow.choices[0].message.content  # "auto": plain text


def test_streamed_named_tool_call(client):
    stream = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, tools=TOOLS, temperature=0,
                                            max_tokens=60, stream=True, tool_choice={
                                                "type": "function", "function": {"name": "get_weather"}})
    args, names, finish = "", [], None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                names += [tc.function.name] if tc.function.name else []
                args += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER)


def test_beta_parse_with_pydantic_model(client):
    class City(BaseModel):
        name: str
        country: str

    out = client.beta.chat.completions.parse(model=DEFAULT_MODEL, temperature=0, max_tokens=60,
                                             messages=[{"role": "user", "content": "Name a city."}],
                                             response_format=City)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_constraints_on_both_endpoints(real_server, client):
    obj = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, temperature=0, max_tokens=40,
                                         response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(model=DEFAULT_MODEL, prompt="Is the sky blue?", max_tokens=5,
                                       temperature=0, extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    regex = client.completions.create(model=DEFAULT_MODEL, prompt="A phone number:", max_tokens=12,
                                      temperature=0, extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"
    n3 = client.completions.create(model=DEFAULT_MODEL, prompt="Pick:", max_tokens=5, n=3, seed=3,
                                   temperature=1.0, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert all(c.text in ("red", "green", "blue") for c in n3.choices)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"structured_outputs": {"grammar": "start: nope"}}, "structured_outputs"),
    ({"guided_regex": "(", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}, "tools": TOOLS}, "tool_choice"),
])
def test_refused_constraints_are_400s_and_server_stays_healthy(real_server, body, param):
    base = real_server.base_url
    resp = httpx.post(base + "/v1/chat/completions", timeout=60,
                      json={"messages": ASK, "max_tokens": 4, **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert httpx.get(base + "/health").status_code == 200
    ok = httpx.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
    metrics = httpx.get(base + "/metrics").text
    assert "strix:grammar_compile_errors_total" in metrics

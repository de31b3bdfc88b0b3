"""The official `openai` SDK (sync and async) against the real server on the
default model: completions, chat, streaming with usage, n, stop, logprobs,
seed, echo."""
from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.helpers import DEFAULT_MODEL

PROMPT = "The three primary colors are"
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def client(real_server):
    return openai.OpenAI(base_url=real_server.base_url + "/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def aclient_url(real_server):
    return real_server.base_url + "/v1"


def test_models(client):
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]


def test_completion_basic_and_usage(client):
    out = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=12,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == DEFAULT_MODEL
    assert out.choices[0].text and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_basic(client):
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=24,
                                         temperature=0)
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 24 and out.usage.prompt_tokens > 10


def test_chat_stream_matches_non_stream_and_reports_usage(client):
    kwargs = dict(model=DEFAULT_MODEL, messages=CHAT, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completion_stream_with_usage(client):
    chunks = list(client.completions.create(
        model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 10
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])


def test_n2(client):
    out = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=8, n=2,
                                         temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 16
    comp = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=5, n=2,
                                     extra_body={"ignore_eos": True})
    assert len(comp.choices) == 2 and comp.usage.completion_tokens == 10


def test_stop_string(client):
    base = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    cut = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=24,
                                    temperature=0, stop=[stop, "zzzz-never"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]


def test_logprobs(client):
    comp = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=6,
                                     temperature=0, logprobs=3)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == comp.choices[0].text
    # greedy: the sampled token is the most likely one
    assert all(max(t.values()) == pytest.approx(v, abs=1e-4)
               for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT, max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert content[0].bytes == list(content[0].token.encode())


def test_seed_reproducible(client):
    kwargs = dict(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0,
                  top_p=0.95, seed=1234)
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second


def test_echo(client):
    out = client.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=4,
                                    temperature=0, echo=True)
    assert out.choices[0].text.startswith(PROMPT) and len(out.choices[0].text) > len(PROMPT)


def test_sdk_error_types(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=DEFAULT_MODEL, prompt="x", max_tokens=10 ** 7)
    assert err.value.body["code"] == "context_length_exceeded"


def test_async_client(aclient_url):
    async def run():
        async with openai.AsyncOpenAI(base_url=aclient_url, api_key="unused",
                                      timeout=120) as aclient:
            comp, chat = await asyncio.gather(
                aclient.completions.create(model=DEFAULT_MODEL, prompt=PROMPT, max_tokens=8,
                                           temperature=0),
                aclient.chat.completions.create(model=DEFAULT_MODEL, messages=CHAT,
                                                max_tokens=8, temperature=0))
            stream = await aclient.chat.completions.create(
                model=DEFAULT_MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return comp, chat, chunks

    comp, chat, chunks = asyncio.run(run())
    assert comp.choices[0].text and chat.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

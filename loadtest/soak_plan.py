"""What the soak sends: one seeded `Plan` per request (completions or chat, stream or
not, n, stops, logprobs, seeds, shared and unique prefixes, client disconnects, and bad
inputs that must get a 4xx)."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from typing import Any

WORDS = ("the sea light keeper bottle village storm night ship letter rock wave wind "
         "harbor rope lamp tide gull island fog bell morning salt").split()
SHARED_PREFIX = ("You are a careful assistant. Answer briefly and precisely, and never "
                 "repeat the question. ")
PROMPTS = ["Write a short poem about", "Explain in one sentence", "List three facts about",
           "Tell a story about", "Translate to French:", "Summarize:", "Q: What is", "Once upon"]
STOPS = [".", "\n", ["\n\n", "."], [" the", " a"], "!", ["Q:", "A:"]]


@dataclass
class Plan:
    index: int
    path: str
    body: Any  # dict, or bytes for raw invalid bodies
    stream: bool
    n_choices: int  # expected choices (n x prompts), 0 if unknown
    bad: bool = False
    disconnect: str | None = None  # None | "before_first_byte" | "mid_stream" | "timer"
    disconnect_at: float = 0.0  # seconds (timer / before_first_byte) or chunks (mid_stream)


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(k))


def _prompt(rng: random.Random) -> str:
    base = f"{rng.choice(PROMPTS)} {_words(rng, rng.randint(1, 12))}"
    return SHARED_PREFIX + base if rng.random() < 0.4 else base


def bad_request_body(rng: random.Random, max_model_len: int) -> tuple[str, Any]:
    """(path, body): invalid on purpose, a 4xx is expected."""
    prompt = {"prompt": "hello", "max_tokens": 4}
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    choices: list[tuple[str, Any]] = [
        ("/v1/completions", {**prompt, "max_tokens": -1}),
        ("/v1/completions", {**prompt, "max_tokens": "8"}),
        ("/v1/completions", {**prompt, "temperature": 5}),
        ("/v1/completions", {**prompt, "n": 0}),
        ("/v1/completions", {**prompt, "top_p": 0}),
        ("/v1/completions", {**prompt, "logprobs": 50}),
        ("/v1/completions", {"prompt": [], "max_tokens": 4}),
        ("/v1/completions", {"prompt": [10 ** 9], "max_tokens": 4}),
        ("/v1/completions", {**prompt, "stop_token_ids": [-1]}),
        ("/v1/completions", {**prompt, "stop_token_ids": [2 ** 63]}),
        ("/v1/completions", {**prompt, "stop_token_ids": [2 ** 63], "min_tokens": 2}),
        ("/v1/completions", {**prompt, "prompt": "\ud800"}),
        ("/v1/completions", {**prompt, "model": "\udfff"}),
        ("/v1/completions", {**prompt, "seed": 2 ** 64}),
        ("/v1/completions", {**prompt, "logit_bias": {"abc": 1}}),
        ("/v1/completions", {**prompt, "model": "no-such-model"}),
        ("/v1/completions", {"prompt": "hello " * (max_model_len + 8), "max_tokens": 4}),
        ("/v1/completions", {**prompt, "max_tokens": max_model_len * 4}),
        ("/v1/completions", b'{"prompt": "hello", "max_tokens": 4'),
        ("/v1/completions", b"[]"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 4}),
        ("/v1/chat/completions", {**chat, "presence_penalty": 3}),
        ("/v1/chat/completions", {**chat, "top_logprobs": 99, "logprobs": True}),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
        ("/v1/chat/completions", {**chat, "stream": True, "n": -3}),
        ("/v1/chat/completions", b'{"messages": NaN}'),
    ]
    return rng.choice(choices)


def make_plan(rng: random.Random, index: int, args: argparse.Namespace,
              max_model_len: int) -> Plan:
    if rng.random() < args.bad_fraction:
        path, body = bad_request_body(rng, max_model_len)
        stream = isinstance(body, dict) and bool(body.get("stream"))
        return Plan(index, path, body, stream, 0, bad=True)
    chat = rng.random() < 0.5
    n = rng.randint(1, 3)
    stream = rng.random() < 0.5
    body: dict[str, Any] = {"max_tokens": rng.randint(1, 32), "n": n}
    num_prompts = 1
    if chat:
        path = "/v1/chat/completions"
        messages = [{"role": "user", "content": _prompt(rng)}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        body["messages"] = messages
        if rng.random() < 0.25:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 5)
    else:
        path = "/v1/completions"
        if rng.random() < 0.15:
            num_prompts = rng.randint(2, 3)
            body["prompt"] = [_prompt(rng) for _ in range(num_prompts)]
        else:
            body["prompt"] = _prompt(rng)
        if rng.random() < 0.25:
            body["logprobs"] = rng.randint(0, 5)
        if rng.random() < 0.1:
            body["echo"] = True
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.3:
        body["stop"] = rng.choice(STOPS)
    if rng.random() < 0.4:
        body["seed"] = rng.randint(0, 2 ** 31 - 1)
    body["temperature"] = rng.choice([0.0, 0.0, 0.3, 0.7, 1.0, 1.5])
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.5, 0.9, 1.0])
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    plan = Plan(index, path, body, stream, n * num_prompts)
    if rng.random() < args.disconnect_fraction:
        kind = rng.choice(["before_first_byte", "timer"] + (["mid_stream"] * 2 if stream else []))
        plan.disconnect = kind
        plan.disconnect_at = {"before_first_byte": rng.uniform(0.0, 0.05),
                              "timer": rng.uniform(0.0, 1.5),
                              "mid_stream": float(rng.randint(1, 6))}[kind]
    return plan

"""POST /v1/chat/completions: messages -> the model's chat template -> engine;
outputs -> a chat.completion or a stream of chat.completion.chunk.

A stream's first chunk per choice carries `delta.role`; each choice's last
chunk carries its `finish_reason`; with `stream_options.include_usage` a
final chunk with empty `choices` carries `usage`.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.errors import bad_request
from server.generation import (EngineStream, InFlight, build_sampling_params,
                               check_context_length, check_model, finite, merge,
                               new_request_id, open_streams, respond)
from server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest,
                             ChatCompletionResponse, ChatLogprobs, ChatMessage, ChatMessageOut,
                             ChatStreamChoice, ChatTokenLogprob, DeltaMessage, TopLogprob,
                             UsageInfo)
from server.streaming import Delta, DeltaTracker, sse

CONSTRAINED_DECODING_MSG = ("response_format {kind!r} is not available yet: constrained "
                            "decoding is not implemented in this server. Use {{\"type\": "
                            "\"text\"}} or omit response_format.")


@dataclass
class Ctx:
    request_id: str
    created: int
    model: str
    n: int
    top_logprobs: int | None  # None: no logprobs


def _text_content(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(f"Only text content parts are supported (got {part.type!r}).",
                              f"messages[{index}].content")
        texts.append(part.text)
    return "\n".join(texts)


def conversation(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts HF chat templates expect."""
    out = []
    for i, msg in enumerate(messages):
        item: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role,
                                "content": _text_content(msg, i)}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(msg, key)
            if value is not None:
                item[key] = value
        out.append(item)
    return out


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage],
                add_generation_prompt: bool = True) -> list[int]:
    """Apply the model's chat template; template errors are the client's 400."""
    conv = conversation(messages)
    try:
        text = tokenizer.apply_chat_template(conv, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors, missing template, role rules
        raise bad_request(f"Could not apply the model's chat template: {exc}", "messages")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_request(req: ChatCompletionRequest) -> int | None:
    """Checks that need more than types; returns the logprobs count for SamplingParams."""
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        raise bad_request(CONSTRAINED_DECODING_MSG.format(kind=fmt.type), "response_format")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, engine: Any,
                                 inflight: InFlight) -> Response:
    model = check_model(engine, req.model)
    logprobs = _check_request(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = build_sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                   vocab_size=engine.vocab_size)
    prompt = await engine.run_tokenizer(
        lambda tok: render_chat(tok, req.messages, req.add_generation_prompt is not False))
    check_context_length(len(prompt), params.max_tokens, engine.max_model_len, "messages")
    ctx = Ctx(new_request_id("chatcmpl"), int(time.time()), model, params.n, logprobs)
    return await respond(raw, open_streams(engine, [prompt], params, ctx.request_id, inflight),
                         bool(req.stream), req.stream_options,
                         lambda streams, usage: _chunks(ctx, streams, usage),
                         lambda finals: _response(ctx, finals[0]))


def _response(ctx: Ctx, final: Any) -> ChatCompletionResponse:
    tracker = DeltaTracker(ctx.n, with_tokens=True)
    tracker.deltas(0, final)
    choices = []
    for comp in sorted(final.outputs, key=lambda c: c.index):  # FINAL: everything at once
        logprobs = None
        if ctx.top_logprobs is not None:
            logprobs = ChatLogprobs(content=_token_logprobs(
                comp.token_ids, comp.logprobs or [], ctx.top_logprobs))
        choices.append(ChatChoice(index=comp.index, message=ChatMessageOut(content=comp.text),
                                  logprobs=logprobs, finish_reason=comp.finish_reason,
                                  stop_reason=comp.stop_reason))
    return ChatCompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                  choices=choices, usage=UsageInfo(**tracker.usage()))


def _chunk(ctx: Ctx, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
    return sse(ChatCompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                   choices=choices, usage=usage))


async def _chunks(ctx: Ctx, streams: list[EngineStream],
                  include_usage: bool) -> AsyncIterator[str]:
    for index in range(ctx.n):
        role = DeltaMessage(role="assistant", content="")
        yield _chunk(ctx, [ChatStreamChoice(index=index, delta=role)])
    tracker = DeltaTracker(ctx.n, with_tokens=ctx.top_logprobs is not None)
    async for _, out in merge(streams):
        for delta in tracker.deltas(0, out):
            choice = _stream_choice(ctx, delta)
            if choice is not None:
                yield _chunk(ctx, [choice])
    if include_usage:
        yield _chunk(ctx, [], UsageInfo(**tracker.usage()))


def _stream_choice(ctx: Ctx, delta: Delta) -> ChatStreamChoice | None:
    logprobs = None
    if ctx.top_logprobs is not None:
        logprobs = ChatLogprobs(content=_token_logprobs(delta.token_ids, delta.logprobs,
                                                        ctx.top_logprobs))
    if not delta.text and not delta.finish_reason and not (logprobs and logprobs.content):
        return None
    content = DeltaMessage(content=delta.text) if delta.text else DeltaMessage()
    return ChatStreamChoice(index=delta.index, delta=content, logprobs=logprobs,
                            finish_reason=delta.finish_reason)


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": finite(logprob), "bytes": list(token.encode("utf-8"))}


def _token_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Any]],
                    k: int) -> list[ChatTokenLogprob]:
    content = []
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        ranked = sorted(entry.values(), key=lambda e: e.rank)[:k]
        top = [TopLogprob(**_entry(e.decoded_token, e.logprob)) for e in ranked]
        if sampled is None:
            continue
        content.append(ChatTokenLogprob(**_entry(sampled.decoded_token, sampled.logprob),
                                        top_logprobs=top))
    return content

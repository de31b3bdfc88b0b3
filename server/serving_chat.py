"""POST /v1/chat/completions: messages -> the model's chat template -> engine;
outputs -> a chat.completion or a stream of chat.completion.chunk.

A stream's first chunk per choice carries `delta.role`; each choice's last
chunk carries its `finish_reason`; with `stream_options.include_usage` a
final chunk with empty `choices` carries `usage`.
"""
from __future__ import annotations

import json
import time
import uuid
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
                             ChatStreamChoice, ChatTokenLogprob, DeltaFunctionCall, DeltaMessage,
                             DeltaToolCall, ToolCall, TopLogprob, UsageInfo)
from server.streaming import Delta, DeltaTracker, sse
from server.structured import ToolMode, structured_outputs_of

@dataclass
class Ctx:
    request_id: str
    created: int
    model: str
    n: int
    top_logprobs: int | None  # None: no logprobs
    tool_mode: ToolMode | None = None  # a forced tool call: the output is read back as tool_calls


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


def _tool_calls_text(calls: list[dict[str, Any]]) -> str:
    """Assistant tool calls as text, for templates that cannot render them."""
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            out.append({"name": fn.get("name"), "arguments": fn.get("arguments")})
    return json.dumps(out, ensure_ascii=False)


def conversation(messages: Sequence[ChatMessage], template_has_tools: bool = False) -> list[dict[str, Any]]:
    """OpenAI messages -> the dicts HF chat templates expect. Assistant `tool_calls`
    become the message text when the template does not render them itself."""
    out = []
    for i, msg in enumerate(messages):
        item: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role,
                                "content": _text_content(msg, i)}
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(msg, key)
            if value is not None:
                item[key] = value
        if msg.tool_calls and not template_has_tools and not item["content"]:
            item["content"] = _tool_calls_text(msg.tool_calls)
        out.append(item)
    return out


def render_chat(tokenizer: Any, messages: Sequence[ChatMessage],
                add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
    """Apply the model's chat template (with `tools` when given); template errors are the
    client's 400."""
    template = getattr(tokenizer, "chat_template", None) or ""
    conv = conversation(messages, template_has_tools="tool_calls" in template)
    try:
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(conv, tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except Exception as exc:  # jinja errors, missing template, role rules
        raise bad_request(f"Could not apply the model's chat template: {exc}", "messages")
    return list(tokenizer.encode(text, add_special_tokens=False))


def _check_request(req: ChatCompletionRequest) -> int | None:
    """Checks that need more than types; returns the logprobs count for SamplingParams."""
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(req: ChatCompletionRequest, raw: Request, engine: Any,
                                 inflight: InFlight) -> Response:
    model = check_model(engine, req.model)
    logprobs = _check_request(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    spec, tool_mode = structured_outputs_of(req)
    params = build_sampling_params(req, max_tokens=max_tokens, logprobs=logprobs,
                                   vocab_size=engine.vocab_size, structured_outputs=spec)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] \
        if req.tools and req.tool_choice != "none" else None
    prompt = await engine.run_tokenizer(
        lambda tok: render_chat(tok, req.messages, req.add_generation_prompt is not False, tools))
    check_context_length(len(prompt), params.max_tokens, engine.max_model_len, "messages")
    ctx = Ctx(new_request_id("chatcmpl"), int(time.time()), model, params.n, logprobs, tool_mode)
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
        message, finish = ChatMessageOut(content=comp.text), comp.finish_reason
        calls = _tool_calls(ctx, comp.text, finish)
        if calls:
            message, finish = ChatMessageOut(content=None, tool_calls=calls), "tool_calls"
        choices.append(ChatChoice(index=comp.index, message=message, logprobs=logprobs,
                                  finish_reason=finish, stop_reason=comp.stop_reason))
    return ChatCompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                  choices=choices, usage=UsageInfo(**tracker.usage()))


def _tool_calls(ctx: Ctx, text: str, finish_reason: str | None) -> list[ToolCall] | None:
    """A forced tool call's finished output read back as tool calls (None: plain text)."""
    if ctx.tool_mode is None or finish_reason != "stop":
        return None
    return ctx.tool_mode.parse(text)


def _chunk(ctx: Ctx, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
    return sse(ChatCompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                   choices=choices, usage=usage))


async def _chunks(ctx: Ctx, streams: list[EngineStream],
                  include_usage: bool) -> AsyncIterator[str]:
    for index in range(ctx.n):
        role = DeltaMessage(role="assistant", content="")
        yield _chunk(ctx, [ChatStreamChoice(index=index, delta=role)])
    tracker = DeltaTracker(ctx.n, with_tokens=ctx.top_logprobs is not None)
    tools = _StreamedToolCalls(ctx) if ctx.tool_mode is not None else None
    async for _, out in merge(streams):
        for delta in tracker.deltas(0, out):
            choice = tools.choice(delta) if tools is not None else _stream_choice(ctx, delta)
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


class _StreamedToolCalls:
    """Forced tool calls as `delta.tool_calls` chunks. A named function streams its
    arguments as they are generated (the first chunk carries id and name); a
    "required" array is held back and sent call by call once complete. An output
    that does not end as a tool call is sent as content at the end."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.text: dict[int, str] = {}
        self.call_ids: dict[int, str] = {}

    def _arguments(self, i: int, text: str) -> DeltaMessage:
        """More of a named call's arguments; the first piece carries its id and name."""
        first = i not in self.call_ids
        call_id = self.call_ids.setdefault(i, f"call_{uuid.uuid4().hex[:24]}")
        fn = DeltaFunctionCall(name=self.ctx.tool_mode.named if first else None, arguments=text)
        return DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=call_id if first else None,
                                                      type="function" if first else None, function=fn)])

    def choice(self, delta: Delta) -> ChatStreamChoice | None:
        ctx, i = self.ctx, delta.index
        self.text[i] = self.text.get(i, "") + delta.text
        named = ctx.tool_mode.named
        if delta.finish_reason is None:
            if named is None or not delta.text:
                return None
            return ChatStreamChoice(index=i, delta=self._arguments(i, delta.text))
        calls = _tool_calls(ctx, self.text[i], delta.finish_reason)
        if calls is None:  # not a tool call after all (length, error): the text as content
            sent = i in self.call_ids and named is not None
            content = None if sent else self.text[i] or None
            return ChatStreamChoice(index=i, delta=DeltaMessage(content=content),
                                    finish_reason=delta.finish_reason)
        if named is not None:  # arguments streamed; this delta may carry their last part
            if not delta.text:
                return ChatStreamChoice(index=i, delta=DeltaMessage(), finish_reason="tool_calls")
            return ChatStreamChoice(index=i, delta=self._arguments(i, delta.text), finish_reason="tool_calls")
        deltas = [DeltaToolCall(index=k, id=c.id, type="function",
                                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for k, c in enumerate(calls)]
        return ChatStreamChoice(index=i, delta=DeltaMessage(tool_calls=deltas), finish_reason="tool_calls")


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

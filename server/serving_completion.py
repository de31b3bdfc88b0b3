"""POST /v1/completions: prompts -> engine requests; outputs -> response or SSE chunks.

Several prompts run as separate engine requests (concurrently); choice
`index` = prompt index * n + completion index. `echo` prepends the prompt
text; with `logprobs` the prompt's tokens are listed with null logprobs.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from server.errors import bad_request
from server.structured import structured_outputs_of
from server.generation import (EngineStream, InFlight, build_sampling_params,
                               check_context_length, check_model, check_token_ids, finite, merge,
                               new_request_id, open_streams, respond, vocab_size_of)
from server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs,
                             CompletionRequest, CompletionResponse, UsageInfo)
from server.streaming import Delta, DeltaTracker, sse

@dataclass
class Prompt:
    ids: list[int]
    text: str | None  # as given, or decoded for echo
    token_texts: list[str] | None = None  # per prompt token, for echo with logprobs


@dataclass
class Ctx:
    request_id: str
    created: int
    model: str
    n: int
    logprobs: int | None
    echo: bool
    prompts: list[Prompt]


def _prompts(req: CompletionRequest, tokenizer: Any) -> list[Prompt]:
    """Tokenizer thread: text -> ids, ids checked; the echo texts decoded here too."""
    raw = req.prompt
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and all(isinstance(t, int) for t in raw):
        items = [list(raw)]
    else:
        items = list(raw)
    if not items:
        raise bad_request("The prompt must not be empty.", "prompt")
    vocab = vocab_size_of(tokenizer)
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompt = Prompt(list(tokenizer.encode(item)), item)
        else:
            prompt = Prompt(list(item), None)
        check_token_ids(prompt.ids, vocab, "prompt")
        if req.echo:
            if prompt.text is None:
                prompt.text = tokenizer.decode(prompt.ids)
            if req.logprobs is not None:
                prompt.token_texts = [tokenizer.decode([t]) for t in prompt.ids]
        prompts.append(prompt)
    return prompts


async def create_completion(req: CompletionRequest, raw: Request, engine: Any,
                            inflight: InFlight) -> Response:
    model = check_model(engine, req.model)
    if req.suffix:
        raise bad_request("suffix is not supported.", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad_request("best_of is not supported (it must equal n).", "best_of")
    spec, _ = structured_outputs_of(req)
    params = build_sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                   vocab_size=engine.vocab_size, structured_outputs=spec)
    prompts = await engine.run_tokenizer(lambda tok: _prompts(req, tok))
    for prompt in prompts:
        check_context_length(len(prompt.ids), params.max_tokens, engine.max_model_len, "prompt")
    ctx = Ctx(new_request_id("cmpl"), int(time.time()), model, params.n, req.logprobs,
              bool(req.echo), prompts)
    return await respond(raw, open_streams(engine, [p.ids for p in prompts], params, ctx.request_id, inflight),
                         bool(req.stream), req.stream_options,
                         lambda streams, usage: _chunks(ctx, streams, usage),
                         lambda finals: _response(ctx, finals))


def _response(ctx: Ctx, finals: Sequence[Any]) -> CompletionResponse:
    tracker = DeltaTracker(ctx.n, with_tokens=True)
    choices = []
    for i, out in enumerate(finals):
        for delta in tracker.deltas(i, out):
            choices.append(_choice(ctx, i, delta))
    choices.sort(key=lambda c: c.index)
    return CompletionResponse(id=ctx.request_id, created=ctx.created, model=ctx.model,
                              choices=choices, usage=UsageInfo(**tracker.usage()))


async def _chunks(ctx: Ctx, streams: list[EngineStream],
                  include_usage: bool) -> AsyncIterator[str]:
    tracker = DeltaTracker(ctx.n, with_tokens=ctx.logprobs is not None)
    offsets: dict[int, int] = {}
    async for i, out in merge(streams):
        for delta in tracker.deltas(i, out):
            choice = _choice(ctx, i, delta, offsets)
            chunk = CompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                    choices=[choice])
            yield sse(chunk)
    if include_usage:
        yield sse(CompletionChunk(id=ctx.request_id, created=ctx.created, model=ctx.model,
                                  choices=[], usage=UsageInfo(**tracker.usage())))


def _choice(ctx: Ctx, prompt_index: int, delta: Delta,
            offsets: dict[int, int] | None = None) -> CompletionChoice:
    """The choice for one delta (a whole completion when not streaming)."""
    offsets = {} if offsets is None else offsets
    text = delta.text
    logprobs = None
    if ctx.logprobs is not None:
        logprobs = CompletionLogprobs()
        offsets.setdefault(delta.index, 0)
    if delta.first and ctx.echo:
        prompt = ctx.prompts[prompt_index]
        prefix = prompt.text or ""
        if logprobs is not None:
            _prompt_logprobs(logprobs, prompt.token_texts or [])
            offsets[delta.index] = len(prefix)
        text = prefix + text
    if logprobs is not None:
        offsets[delta.index] = _token_logprobs(logprobs, delta.token_ids, delta.logprobs,
                                               ctx.logprobs or 0, offsets[delta.index])
    return CompletionChoice(index=delta.index, text=text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)


def _prompt_logprobs(lp: CompletionLogprobs, token_texts: list[str]) -> None:
    offset = 0
    for token in token_texts:
        lp.tokens.append(token)
        lp.token_logprobs.append(None)
        lp.top_logprobs.append(None)
        lp.text_offset.append(offset)
        offset += len(token)


def _token_logprobs(lp: CompletionLogprobs, token_ids: Sequence[int],
                    entries: Sequence[dict[int, Any]], k: int, offset: int) -> int:
    """Append OpenAI completion logprobs for generated tokens; returns the next offset."""
    for token_id, entry in zip(token_ids, entries):
        sampled = entry.get(token_id)
        token = sampled.decoded_token if sampled is not None else ""
        lp.tokens.append(token)
        lp.token_logprobs.append(finite(sampled.logprob) if sampled is not None else None)
        ranked = sorted(entry.values(), key=lambda e: e.rank)[:k]
        lp.top_logprobs.append({e.decoded_token: finite(e.logprob) for e in ranked})
        lp.text_offset.append(offset)
        offset += len(token)
    return offset

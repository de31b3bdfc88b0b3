"""Plumbing shared by chat and completions: request -> SamplingParams and
token ids, and engine output streams that abort when their consumer leaves.

Invariant: every engine request the server opens is either consumed to its
final output or closed (`EngineStream.aclose`), which aborts it in the engine
and frees its KV blocks; cancellation (client disconnect, shutdown timeout)
takes the closing path.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response

from engine.errors import RequestFailedError
from engine.sampling_params import OutputKind, ParamError, SamplingParams
from server.errors import bad_request, from_exception, model_not_found
from server.protocol import SamplingRequest
from server.streaming import EventStreamResponse

CLIENT_CLOSED = 499  # nginx's code for a client that went away; nobody reads it

T = TypeVar("T")
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def check_model(engine: Any, requested: str | None) -> str:
    """The served model name, or a 404 for any other name."""
    if requested in (None, "", engine.model_name):
        return engine.model_name
    raise model_not_found(requested)


def _logit_bias(raw: dict[str, float] | None, vocab_size: int | None) -> dict[int, float] | None:
    if not raw:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise bad_request(f"logit_bias token id {token} is out of vocabulary", "logit_bias")
        bias[token] = value
    return bias


def build_sampling_params(req: SamplingRequest, *, max_tokens: int | None,
                          logprobs: int | None, vocab_size: int | None,
                          structured_outputs: Any = None) -> SamplingParams:
    """OpenAI request fields -> SamplingParams; bad values become 400s with `param`.
    Streams get DELTA outputs from the engine, everything else one FINAL output."""
    kwargs: dict[str, Any] = {
        "output_kind": OutputKind.DELTA if req.stream else OutputKind.FINAL,
        "cache_salt": req.cache_salt,
        "n": req.n or 1,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "seed": req.seed,
        "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or []),
        "stop_token_ids": list(req.stop_token_ids or []),
        "ignore_eos": bool(req.ignore_eos),
        "min_tokens": req.min_tokens or 0,
        "include_stop_str_in_output": bool(req.include_stop_str_in_output),
        "skip_special_tokens": req.skip_special_tokens is not False,
        "logit_bias": _logit_bias(req.logit_bias, vocab_size),
        "structured_outputs": structured_outputs,
    }
    optional = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                "frequency_penalty", "repetition_penalty")
    for name in optional:
        value = getattr(req, name)
        if value is not None:
            kwargs[name] = value
    try:
        return SamplingParams(**kwargs)
    except ParamError as exc:
        raise bad_request(str(exc), exc.param) from None


def check_token_ids(ids: Sequence[int], vocab_size: int | None, param: str) -> None:
    if not ids:
        raise bad_request("The prompt must not be empty.", param)
    if vocab_size is not None and not all(0 <= t < vocab_size for t in ids):
        raise bad_request(f"Token ids must be in [0, {vocab_size}).", param)


def check_context_length(num_prompt: int, max_tokens: int | None, max_model_len: int,
                         param: str) -> None:
    """400 context_length_exceeded, naming both numbers, before the engine sees it."""
    wanted = num_prompt + (max_tokens or 1)
    if wanted <= max_model_len:
        return
    detail = (f"you requested {wanted} tokens ({num_prompt} in the prompt, "
              f"{max_tokens} for the completion)" if max_tokens is not None else
              f"the prompt has {num_prompt} tokens, leaving no room for a completion")
    raise bad_request(f"This model's maximum context length is {max_model_len} tokens, "
                      f"but {detail}. Shorten the prompt or reduce max_tokens.",
                      param, code="context_length_exceeded")


def vocab_size_of(tokenizer: Any) -> int | None:
    """Call on the engine's tokenizer thread only (`engine.run_tokenizer`)."""
    try:
        return len(tokenizer)
    except TypeError:
        return getattr(tokenizer, "vocab_size", None)


class InFlight:
    """Request ids the server has open in the engine (for abort-all at shutdown)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    async def abort_all(self, engine: Any) -> int:
        ids = list(self.ids)
        for request_id in ids:
            with contextlib.suppress(Exception):
                await engine.abort(request_id)
        return len(ids)


class EngineStream:
    """One engine request whose first output has already arrived (so request
    errors surface before any HTTP response starts)."""

    def __init__(self, engine: Any, request_id: str, gen: AsyncIterator[Any], first: Any,
                 inflight: InFlight):
        self.engine = engine
        self.request_id = request_id
        self._gen = gen
        self._first: Any = first
        self._inflight = inflight
        self.last = first
        self.done = False
        self._set_done(bool(first.finished))

    @classmethod
    async def open(cls, engine: Any, prompt: list[int], params: SamplingParams,
                   request_id: str, inflight: InFlight) -> "EngineStream":
        gen = engine.generate(prompt, params, request_id)
        inflight.ids.add(request_id)
        try:
            first = await gen.__anext__()
        except BaseException:
            inflight.ids.discard(request_id)
            await _close_quietly(engine, gen, request_id)
            raise
        return cls(engine, request_id, gen, first, inflight)

    def _set_done(self, done: bool) -> None:
        self.done = done
        if done:
            self._inflight.ids.discard(self.request_id)

    async def __aiter__(self) -> AsyncIterator[Any]:
        """The request's outputs; after one that carries an engine-side `error` (its
        completions end with finish_reason "error") raises RequestFailedError."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            _raise_if_failed(first)
        while not self.done:
            try:
                out = await self._gen.__anext__()
            except StopAsyncIteration:
                self._set_done(True)
                return
            self.last = out
            self._set_done(bool(out.finished))
            yield out
            _raise_if_failed(out)

    async def final(self) -> Any:
        """The FINAL output (non-streaming requests get exactly one)."""
        async for _ in self:
            pass
        return self.last


    async def aclose(self) -> None:
        if not self.done:
            self._set_done(True)
            await _close_quietly(self.engine, self._gen, self.request_id)


def _raise_if_failed(out: Any) -> None:
    error = getattr(out, "error", None)
    if error:
        raise RequestFailedError(error, getattr(out, "error_param", None))


async def _close_quietly(engine: Any, gen: Any, request_id: str) -> None:
    with contextlib.suppress(Exception):
        await gen.aclose()
    with contextlib.suppress(Exception):
        await engine.abort(request_id)


async def open_streams(engine: Any, prompts: Sequence[list[int]], params: SamplingParams,
                       base_id: str, inflight: InFlight) -> list[EngineStream]:
    """Start one engine request per prompt; all or none (errors close the rest)."""
    ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
    tasks = [asyncio.ensure_future(EngineStream.open(engine, p, params, rid, inflight))
             for p, rid in zip(prompts, ids)]
    try:  # a FINAL stream's first output is its last: do not wait for it if a sibling failed
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for task in tasks:
            task.cancel()
        await _close_tasks(tasks)
        raise
    errors = [t.exception() for t in done if t.exception() is not None]
    if errors:
        for task in pending:
            task.cancel()
        await _close_tasks(tasks)
        raise from_exception(errors[0])
    return [t.result() for t in tasks]


async def _close_tasks(tasks: list[asyncio.Future[EngineStream]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is None:
            await task.result().aclose()


async def close_all(streams: Sequence[EngineStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def merge(streams: Sequence[EngineStream]) -> AsyncIterator[tuple[int, Any]]:
    """(stream index, output) from all streams as they arrive; closes them all at the end."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    # (index, output) items; None when a stream ended; an exception ends everything at once.
    queue: asyncio.Queue[tuple[int, Any] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def collect(streams: Sequence[EngineStream]) -> list[Any]:
    """Final output of every stream (cancelling and closing all on error or cancellation)."""
    tasks = [asyncio.ensure_future(s.final()) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client disconnects first, cancel it and return None."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        return None
    finally:
        for task in (watcher, job):
            task.cancel()
        await asyncio.gather(watcher, job, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def respond(raw: Request, opening: Awaitable[list[EngineStream]], stream: bool, stream_options: Any,
                  chunks: Callable[[list[EngineStream], bool], AsyncIterator[str]],
                  build: Callable[[list[Any]], Any]) -> Response:
    """Shared tail of both endpoints: open the engine streams, then either stream SSE
    chunks or collect the final outputs into one JSON body; a client that leaves
    while we wait gets its requests aborted (until_disconnected)."""
    streams = await until_disconnected(raw, opening)
    if streams is None:
        return Response(status_code=CLIENT_CLOSED)
    if stream:
        include_usage = bool(stream_options and stream_options.include_usage)
        return EventStreamResponse(chunks(streams, include_usage))
    finals = await until_disconnected(raw, collect(streams))
    if finals is None:
        return Response(status_code=CLIENT_CLOSED)
    return Response(build(finals).model_dump_json(), media_type="application/json")

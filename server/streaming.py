"""Server-sent events: `data: {json}\\n\\n` chunks ending with `data: [DONE]`.

Disconnects: uvicorn reports a client that goes away as `http.disconnect`;
Starlette then cancels the response task, the cancellation unwinds through
the chunk generator, and its `finally` closes the engine streams, which
aborts the requests and frees their KV blocks. `EventStreamResponse` also
closes the body iterator itself, for servers where `send` raises instead.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import from_exception

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Characters JSON may carry raw but that line splitters other than SSE's (Python's
# str.splitlines, some JS readers) treat as line ends; escaped, a data line stays one line.
_LINE_BREAKERS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, separators=(",", ":"))
    for char, escape in _LINE_BREAKERS.items():
        if char in body:
            body = body.replace(char, escape)
    return f"data: {body}\n\n"


async def _event_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """Frame `chunks`; an error after the stream started becomes an error event."""
    async with contextlib.aclosing(chunks):  # type: ignore[type-var]
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # the status line is gone: report in-band
            yield sse(from_exception(exc).body())
    yield DONE


class EventStreamResponse(StreamingResponse):
    def __init__(self, chunks: AsyncIterator[str]):
        super().__init__(_event_stream(chunks), media_type="text/event-stream",
                         headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()


@dataclass(frozen=True)
class Delta:
    """What one choice gained since the last chunk sent for it."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Any]]  # one entry per token id; empty without logprobs
    finish_reason: str | None
    stop_reason: Any
    first: bool


class DeltaTracker:
    """Turns engine outputs (DELTA outputs of a stream, or the one FINAL output of a
    non-streaming request: both carry what is new) into per-choice deltas, and counts usage.

    Choice index = prompt index * n + completion index (OpenAI's order for
    several prompts). A choice yields nothing after its finish chunk.
    """

    def __init__(self, n: int, with_tokens: bool):
        self.n = n
        self.with_tokens = with_tokens
        self._tokens: dict[int, int] = {}  # tokens generated per choice (usage)
        self._seen: set[int] = set()  # choices that got their first chunk
        self._finished: set[int] = set()
        self._prompt_tokens: dict[int, int] = {}

    def deltas(self, prompt_index: int, out: Any) -> list[Delta]:
        self._prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        found = []
        for comp in out.outputs:
            index = prompt_index * self.n + comp.index
            if index in self._finished:
                continue
            first = index not in self._seen
            self._tokens[index] = self._tokens.get(index, 0) + len(comp.token_ids)
            new_tokens = self.with_tokens and bool(comp.token_ids)
            if not (comp.text or comp.finish_reason or new_tokens or first):
                continue
            self._seen.add(index)
            if comp.finish_reason:
                self._finished.add(index)
            found.append(Delta(index, comp.text, comp.token_ids, comp.logprobs or [],
                               comp.finish_reason, comp.stop_reason, first))
        return found

    def usage(self) -> dict[str, int]:
        prompt = sum(self._prompt_tokens.values())
        completion = sum(self._tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

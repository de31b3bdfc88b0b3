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
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import from_exception

DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: BaseModel | dict[str, Any]) -> str:
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    else:
        body = json.dumps(payload, separators=(",", ":"))
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


class Delta:
    """What one choice gained since the last chunk sent for it."""
    __slots__ = ("index", "text", "token_start", "token_end", "finish_reason", "stop_reason",
                 "first")

    def __init__(self, index: int, text: str, token_start: int, token_end: int,
                 finish_reason: str | None, stop_reason: Any, first: bool):
        self.index = index
        self.text = text
        self.token_start = token_start
        self.token_end = token_end
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.first = first


class DeltaTracker:
    """Turns cumulative engine outputs into per-choice deltas, and counts usage.

    Choice index = prompt index * n + completion index (OpenAI's order for
    several prompts). A choice yields nothing after its finish chunk.
    """

    def __init__(self, n: int, with_tokens: bool):
        self.n = n
        self.with_tokens = with_tokens
        self._text_len: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._finished: set[int] = set()
        self._prompt_tokens: dict[int, int] = {}

    def deltas(self, prompt_index: int, out: Any) -> list[Delta]:
        self._prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        found = []
        for comp in out.outputs:
            index = prompt_index * self.n + comp.index
            if index in self._finished:
                continue
            first = index not in self._text_len
            sent_text = self._text_len.get(index, 0)
            sent_tokens = self._tokens.get(index, 0)
            text = comp.text[sent_text:]
            num_tokens = len(comp.token_ids)
            new_tokens = self.with_tokens and num_tokens > sent_tokens
            if not (text or comp.finish_reason or new_tokens or first):
                continue
            self._text_len[index] = len(comp.text)
            self._tokens[index] = num_tokens
            if comp.finish_reason:
                self._finished.add(index)
            found.append(Delta(index, text, sent_tokens, num_tokens, comp.finish_reason,
                               comp.stop_reason, first))
        return found

    def usage(self) -> dict[str, int]:
        prompt = sum(self._prompt_tokens.values())
        completion = sum(self._tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

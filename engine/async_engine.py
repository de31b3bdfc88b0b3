"""AsyncEngine: the EngineCore on its own thread, async streams per request.

The event loop never blocks on the model: requests are tokenized and validated
on the caller's side (so errors raise before the first yield), then handed to
the engine thread through a command queue; outputs come back through
`loop.call_soon_threadsafe` into one asyncio.Queue per request. A consumer that
stops iterating (client disconnect, cancellation) aborts its request, which
frees its KV blocks on the engine thread's next loop turn.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator, Callable

from engine.config import EngineArgs
from engine.core import EngineCore
from engine.errors import EngineError, EngineOverloadedError
from engine.outputs import RequestOutput, StepStats
from engine.sampling_params import SamplingParams
from engine.setup import LoadedModel, build_parts

log = logging.getLogger(__name__)


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, core: EngineCore, args: EngineArgs):
        self.core = core
        self.args = args
        self.tokenizer = core.tokenizer
        self.model_name = args.served_model_name or args.model
        self.max_model_len = core.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._listeners: list[Callable[[StepStats], None]] = []
        self._error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: EngineArgs, progress: bool = False, loaded: LoadedModel | None = None) -> "AsyncEngine":
        return cls(EngineCore(build_parts(args, progress=progress, loaded=loaded)), args)

    # ---- caller side (event loop) -------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if not self.is_alive():
            raise EngineError("the engine is not running")
        limit = self.args.max_waiting_requests
        if limit is not None and self.num_waiting() >= limit:
            raise EngineOverloadedError(f"too many waiting requests ({limit}); retry later")
        text, prompt_ids = self.core.tokenize(prompt)
        self.core.check_length(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, text, params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping

    def add_stats_listener(self, fn: Callable[[StepStats], None]) -> None:
        self._listeners.append(fn)

    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    def num_waiting(self) -> int:
        return len(self.core.scheduler.waiting) + self._commands.qsize()

    def get_kv_cache_usage(self) -> float:
        return self.core.scheduler.kv.usage()

    async def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # ---- engine thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                block = not self.core.has_unfinished()
                if not self._drain_commands(block):
                    return
                if not self.core.has_unfinished():
                    continue
                outputs, stats = self.core.step()
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put(out)
                self._publish(stats)
        except BaseException as exc:  # the engine is dead: fail every open stream
            log.exception("engine loop failed")
            self._error = exc
            for stream in list(self._streams.values()):
                stream.put(EngineError(f"engine failed: {exc}"))

    def _publish(self, stats: StepStats) -> None:
        for fn in self._listeners:
            try:
                fn(stats)
            except Exception:  # a broken listener must not kill the engine
                log.exception("stats listener failed")

    def _drain_commands(self, block: bool) -> bool:
        """Apply queued add/abort commands; waits for one when idle. False on stop."""
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "abort":
                self.core.abort(cmd[1])
            else:
                self._add(*cmd[1:])

    def _add(self, request_id: str, prompt_ids: list[int], text: str | None, params: SamplingParams) -> None:
        stream = self._streams.get(request_id)
        if stream is None:  # cancelled before it reached the engine
            return
        try:
            self.core.add_request(request_id, prompt_ids, params, prompt_text=text)
        except Exception as exc:  # validation already ran; report anything else to the caller
            stream.put(exc)

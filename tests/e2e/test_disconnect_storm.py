"""Disconnect storm: 300 streaming requests whose clients go away at random points
(some before the first byte, some mid-stream, some read to the end), against the
real app and the real engine (SmolLM2) served by uvicorn in this process, so
the engine's own tables can be inspected afterwards: no KV block in use, and
the engine's request maps, the async engine's stream table, the scheduler's
queues and the server's in-flight set all empty.
"""
from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from engine.config import EngineArgs
from tests.e2e.helpers import start_fake_server, stop_fake_server

NUM_REQUESTS = 300
CONCURRENCY = 32


@pytest.fixture(scope="module")
def live(smol_loaded):
    from engine.async_engine import AsyncEngine
    engine = AsyncEngine.from_args(EngineArgs(max_num_seqs=32, max_model_len=256, num_kv_blocks=256),
                                   loaded=smol_loaded)
    server = start_fake_server(engine)  # the real app over the given engine
    yield server
    stop_fake_server(server)


async def _one(client: httpx.AsyncClient, url: str, rng: random.Random, i: int) -> str:
    body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": rng.randint(1, 16),
            "stream": True, "temperature": rng.choice([0, 0.8]), "ignore_eos": True}
    if i % 3 == 0:
        body = {"messages": [{"role": "user", "content": f"Tell me fact {i}."}],
                "max_tokens": body["max_tokens"], "stream": True}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    mode = rng.choice(["before-first-byte", "mid-stream", "mid-stream", "to-the-end"])
    if mode == "before-first-byte":
        task = asyncio.ensure_future(client.post(url + path, json=body))
        await asyncio.sleep(rng.uniform(0, 0.05))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return mode
    cut = rng.randint(1, 6) if mode == "mid-stream" else None
    async with client.stream("POST", url + path, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        seen = 0
        async for line in resp.aiter_lines():
            seen += bool(line)
            if cut is not None and seen >= cut:
                break  # leaving the block closes the connection
            if line == "data: [DONE]":
                break
    return mode


def test_disconnect_storm_leaves_nothing_behind(live):
    engine, url = live.engine, live.base_url
    rng = random.Random(1234)

    async def storm():
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            sem = asyncio.Semaphore(CONCURRENCY)

            async def guarded(i):
                async with sem:
                    return await _one(client, url, rng, i)
            return await asyncio.gather(*(guarded(i) for i in range(NUM_REQUESTS)))
    modes = asyncio.run(storm())
    assert len(modes) == NUM_REQUESTS and {"before-first-byte", "mid-stream", "to-the-end"} <= set(modes)

    core, sched = engine.core, engine.core.scheduler
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (core.groups or engine._streams or sched.num_unfinished):
        time.sleep(0.05)
    assert core.groups == {} and core.seq_to_group == {} and not core._pending_outputs
    assert engine._streams == {}
    assert not sched.waiting and not sched.running and sched.requests == {}
    assert sched.kv.usage() == 0 and sched.kv.req_blocks == {}
    sched.kv.pool.check_invariants()
    assert live.server.config.app.state.inflight.ids == set()
    # Still healthy and serving.
    assert httpx.get(url + "/health").status_code == 200
    done = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] in ("length", "stop")

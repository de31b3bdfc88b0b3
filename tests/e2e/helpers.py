"""Helpers for the e2e tests; the fixtures live in conftest.py.

`start_fake_server` serves the real app over a FakeEngine on a uvicorn thread;
`ServerProcess` runs `python -m server` on the default model (or `model=`, e.g.
a directory from tests/e2e/tiny_model.py) in a subprocess (127.0.0.1, a free
port), waits for `/health`, and stops it with SIGTERM.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from server.app import ServerSettings, build_app
from tests.e2e.fake_engine import FakeEngine

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "smollm2-135m"
START_TIMEOUT_S = float(os.environ.get("STRIX_TEST_START_TIMEOUT", "600"))
API_KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FakeServer:
    engine: FakeEngine
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread


def start_fake_server(engine: FakeEngine, settings: ServerSettings | None = None) -> FakeServer:
    app = build_app(engine, settings or ServerSettings())
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    return FakeServer(engine, f"http://127.0.0.1:{port}", server, thread)


def stop_fake_server(fake: FakeServer) -> None:
    fake.server.should_exit = True
    fake.thread.join(timeout=10)


@dataclass
class ServerProcess:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    model: str = DEFAULT_MODEL
    module: str = "server"  # what `python -m` runs (tests.e2e.faulty_server injects faults)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        fd, name = tempfile.mkstemp(prefix="strix-e2e-", suffix=".log")
        self.log_path = Path(name)
        cmd = [sys.executable, "-m", self.module, "--model", self.model, "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        env = {**os.environ, **self.env}
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.wait_healthy()
        return self

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


def require_engine() -> None:
    """Fail early (not skip) when the engine cannot be imported."""
    from engine import AsyncEngine  # noqa: F401


def parse_sse(lines: Any) -> list[Any]:
    """SSE `data:` payloads as JSON objects, `[DONE]` as the string."""
    import json

    events = []
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events

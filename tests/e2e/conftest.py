"""Fixtures for the e2e tests.

* `fake_server`: the real app (`server.app.build_app`) over a `FakeEngine`,
  served by uvicorn on a background thread: fast, no model.
* `real_server` / `restricted_server`: `python -m server` with the default
  model in a subprocess on 127.0.0.1 and a free port; started once per
  session, waited for on `/health`, stopped with SIGTERM.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.fake_engine import FakeEngine
from tests.e2e.helpers import (API_KEY, FakeServer, ServerProcess, require_engine,
                               start_fake_server, stop_fake_server)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    fake = start_fake_server(FakeEngine())
    yield fake
    stop_fake_server(fake)


# ------------------------------------------------------------- real server
def _serve(args: list[str], env: dict[str, str] | None = None) -> Iterator[ServerProcess]:
    require_engine()
    server = ServerProcess(args, env or {}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def real_server() -> Iterator[ServerProcess]:
    """The default model, no API key, default limits."""
    yield from _serve(["--max-num-seqs", "32"])


@pytest.fixture(scope="session")
def restricted_server() -> Iterator[ServerProcess]:
    """API key on (from the environment), one running and two waiting requests at most."""
    yield from _serve(["--max-num-seqs", "1", "--max-waiting-requests", "2"],
                      {"STRIX_API_KEY": API_KEY})

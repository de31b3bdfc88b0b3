"""release_openmp_pool frees the calling thread's OpenMP worker team (the server's main
thread loads the model, then hands every step to the engine thread), and AsyncEngine
calls it on the constructing thread before the engine thread starts."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import os, threading, torch
from engine.openmp_pool import release_openmp_pool
torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
before = tasks()
x = torch.randn(256, 1024)
torch.mm(x, x.t())  # a parallel region: this thread now owns a team (one more OS thread)
with_team = tasks()
assert with_team == before + 1, (before, with_team)
assert release_openmp_pool()
# A released worker's /proc/self/task entry goes when its exit completes, a moment after the
# release returns (one suite run saw 4 tasks for 3): wait up to 2 s for it, no longer.
import time
deadline = time.monotonic() + 2.0
while tasks() != before and time.monotonic() < deadline:
    time.sleep(0.01)
assert tasks() == before, (before, tasks())
torch.mm(x, x.t())  # a later region builds a new team
assert tasks() == with_team
print("ok")
"""


def test_release_frees_the_calling_threads_team():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_async_engine_releases_before_the_engine_thread_starts(smol_loaded, monkeypatch):
    from engine import async_engine
    from engine.config import EngineArgs

    calls = []

    def spy():
        calls.append((threading.current_thread(), [t.name for t in threading.enumerate()]))
        return True
    monkeypatch.setattr(async_engine, "release_openmp_pool", spy)
    engine = async_engine.AsyncEngine.from_args(EngineArgs(num_kv_blocks=16), loaded=smol_loaded)
    try:
        (caller, names), = calls
        assert caller is threading.current_thread() and "engine-core" not in names
    finally:
        import asyncio
        asyncio.run(engine.shutdown())

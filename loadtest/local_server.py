"""A server process on this machine for the load tools: `python -m server` on a free
loopback port, waited for until /health is 200, its log in a temp file, stopped with
SIGTERM; the same for llama.cpp's llama-server; and a process's RSS from /proc."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class Server:
    def __init__(self, model: str, extra: list[str], start_timeout: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix="strix-server-", suffix=".log")
        self.log_path = Path(name)
        cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), *extra]
        print(f"starting: {' '.join(cmd)}\n  log: {self.log_path}", flush=True)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not healthy after {start_timeout:.0f} s:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=10)


class LlamaServer:
    """llama.cpp's llama-server on a free loopback port (`-np batch -c ctx -t threads`),
    waited for until /health is 200, its log in a temp file; stopped with SIGTERM."""

    def __init__(self, binary: str, gguf: str, batch: int, ctx: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        cmd = [binary, "-m", gguf, "-np", str(batch), "-c", str(ctx), "-t", str(threads),
               "--host", "127.0.0.1", "--port", str(self.port)]
        print("starting:", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("llama-server exited; log: " + self.log.name)
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError("llama-server not healthy; log: " + self.log.name)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

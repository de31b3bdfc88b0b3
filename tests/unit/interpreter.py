"""Run a check script in a subprocess under TRITON_INTERPRET=1 (the interpreter is chosen
when triton is imported, so it cannot be switched on inside the test process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "KERNEL_OK"


def assert_interpreted(script: str, timeout: float = 600) -> None:
    """The script must exit 0 and print MARKER (so a script that stops early fails)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0 and MARKER in proc.stdout, (proc.stdout + proc.stderr)[-3000:]

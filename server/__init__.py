"""strix HTTP server: an OpenAI-compatible front end over `engine.AsyncEngine`.

Importing this package is cheap: the engine (and torch) is imported only by
`server.__main__` when the CLI actually starts a server.
"""
from __future__ import annotations

from importlib import metadata

PROJECT_NAME = "strix"

try:
    __version__ = metadata.version(PROJECT_NAME)
except metadata.PackageNotFoundError:  # running from a source checkout
    __version__ = "0.1.0.dev0"

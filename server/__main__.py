"""CLI: `python -m server --model smollm2-135m --host 127.0.0.1 --port 8000 ...`
(also the `strix` console script).

Every `EngineArgs` field is a flag (`max_model_len` -> `--max-model-len`,
booleans get `--no-...` too). `--config configs/NAME.yaml` holds the same keys
(engine and server options, `-` or `_`). Precedence: EngineArgs defaults <
YAML < flags given on the command line. The API key comes from `--api-key`,
else from the environment (STRIX_API_KEY, read by engine.config).

SIGTERM / Ctrl-C: stop accepting connections, let in-flight requests finish
for up to `--shutdown-timeout` seconds, abort the rest (their clients get
finish_reason "abort"), shut the engine down and exit 0. If the engine thread
dies (a bug), in-flight requests get their errors, the server stops and the
process exits with status 70 so a supervisor restarts it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import re
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from engine.config import EngineArgs, EnvSettings
from server import PROJECT_NAME, __version__

ENGINE_HELP = {
    "model": "model alias (smollm2-135m), a .gguf file or a Hugging Face directory",
    "served_model_name": "the model name clients send and see (None: the --model value)",
    "dtype": "auto | float32 | bfloat16 | float16",
    "device": "auto | cpu | cuda",
    "max_model_len": "context length (default: the model's own)",
    "max_num_seqs": "most requests computed in one step",
    "max_num_batched_tokens": "most tokens computed in one step",
    "block_size": "KV-cache block size in tokens",
    "kv_cache_memory": "KV-cache bytes on CPU (accepts 512MiB, 2GiB)",
    "max_waiting_requests": "waiting-queue bound; beyond it requests get 503",
    "seed": "engine seed",
    "step_watchdog_s": "log a step running longer than this many seconds, with its batch (0: off)",
    "attention_backend": "auto | cpu | torch | triton (auto: triton on CUDA, our native op on an fp32 CPU model, torch otherwise)",
    "shared_prefix_attention": "auto | on | off: attention over prefixes shared by running requests read "
                               "once per group (auto: where the cost model says it pays)",
    "cpu_native_kernels": "fp32 CPU: our AVX2 kernels (GGUF weights kept in their blocks, fused norms and RoPE)",
    "cpu_activation_quant": "none | q8: GGUF on CPU, linears on int8 activations per 32-block (every batch size "
                            "with AVX-512 VNNI, one-row linears otherwise; integer dots like llama.cpp; not exact)",
    "speculative_draft_activation_quant": "method draft: none | q8, the draft model's activation quant on the "
                                          "native CPU kernels (unset: the target's), e.g. the target's own "
                                          "GGUF in q8 as a cheap draft of the exact target",
    "speculative_draft_kv": "method draft: auto | own | shared, where the draft model's KV lives (shared: the "
                            "target's, no catch-up on prompts; auto: shared for the target's own checkpoint)",
}


ENGINE_DIED_STATUS = 70  # EX_SOFTWARE: an internal error; a supervisor should restart us
# After the engine dies the server keeps answering (503 on /health, errors on every route) this
# long before it exits, so in-flight responses are delivered and a probe sees the 503.
ENGINE_DEATH_LINGER_S = 2.0


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    access_log: bool = False
    max_request_bytes: int = 10 << 20


SERVER_HELP = {
    "host": "address to bind (0.0.0.0 to listen on all interfaces)",
    "port": "TCP port",
    "api_key": f"require 'Authorization: Bearer KEY' on /v1/* (or set {PROJECT_NAME.upper()}"
               "_API_KEY)",
    "cors_origins": "allowed CORS origins (space or comma separated); CORS is off without it",
    "shutdown_timeout": "seconds in-flight requests may run after SIGTERM before being aborted",
    "log_level": "debug | info | warning | error",
    "access_log": "log every HTTP request",
    "max_request_bytes": "largest request body accepted (accepts 10MiB); larger gets 413",
}


def parse_size(text: str) -> int:
    """'1073741824', '512MiB', '2G', '1.5gb' -> bytes (binary multiples)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    power = " kmgt".index(match.group(2) or " ")
    return int(float(match.group(1)) * (1 << (10 * power)))


def _base_type(hint: Any) -> Any:
    """`int | None` -> int; other unions and generics are returned unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _converter(name: str, hint: Any) -> Callable[[str], Any]:
    base = _base_type(hint)
    if base is int:
        return parse_size if name.endswith(("memory", "bytes")) else int
    if base is float:
        return float
    if base is str:
        return str
    return yaml.safe_load  # dicts, lists, tuples: YAML/JSON syntax on the command line


def _option_fields() -> list[tuple[str, Any, Any, str]]:
    """(name, type hint, default, help) for every engine and server option."""
    out = []
    for cls, helps in ((EngineArgs, ENGINE_HELP), (ServerOptions, SERVER_HELP)):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out.append((f.name, hints[f.name], default, helps.get(f.name, f.name)))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROJECT_NAME, argument_default=argparse.SUPPRESS,
        description="OpenAI-compatible LLM inference server.")
    parser.add_argument("--config", help="YAML file with engine/server options (flags win)")
    parser.add_argument("--version", action="version", version=f"{PROJECT_NAME} {__version__}")
    for name, hint, default, help_text in _option_fields():
        flag = "--" + name.replace("_", "-")
        text = f"{help_text} (default: {default})"
        if _base_type(hint) is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                help=text)
        elif name == "cors_origins":
            parser.add_argument(flag, dest=name, nargs="+", help=text)
        else:
            parser.add_argument(flag, dest=name, type=_converter(name, hint), help=text)
    return parser


def load_config_file(path: str | Path) -> dict[str, Any]:
    """YAML mapping -> option dict; unknown keys and wrong shapes are errors."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    known = {name: (hint, name) for name, hint, _, _ in _option_fields()}
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise ValueError(f"{path}: unknown option {raw_key!r}; known: {', '.join(known)}")
        hint = known[key][0]
        if isinstance(value, str) and _base_type(hint) not in (str, Any):
            value = _converter(key, hint)(value)
        options[key] = value
    return options


def _normalise_origins(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value or [])
    return tuple(o.strip() for item in items for o in str(item).split(",") if o.strip())


def resolve(argv: list[str] | None = None,
            environ: dict[str, str] | None = None) -> tuple[EngineArgs, ServerOptions]:
    """Defaults < YAML < command-line flags."""
    parser = build_parser()
    given = vars(parser.parse_args(argv))
    options: dict[str, Any] = {}
    config_path = given.pop("config", None)
    if config_path is not None:
        try:
            options.update(load_config_file(config_path))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            parser.error(str(exc))
    options.update(given)
    engine_keys = set(EngineArgs.field_names())
    engine_args = EngineArgs(**{k: v for k, v in options.items() if k in engine_keys})
    server_opts = {k: v for k, v in options.items() if k not in engine_keys}
    server_opts["cors_origins"] = _normalise_origins(server_opts.get("cors_origins"))
    if not server_opts.get("api_key"):
        server_opts["api_key"] = EnvSettings.from_env(environ).api_key
    return engine_args, ServerOptions(**server_opts)


class StrixServer(uvicorn.Server):
    """uvicorn.Server that prints one ready line and exits 0 after a graceful
    SIGTERM (uvicorn would re-raise the signal once it has shut down)."""

    def __init__(self, config: uvicorn.Config, ready_line: str,
                 on_exit_signal: Callable[[], None]):
        super().__init__(config)
        self._ready_line = ready_line
        self._on_exit_signal = on_exit_signal
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started:
            print(self._ready_line, flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_exit_signal)  # signal context -> loop
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit)
                     for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


async def serve(engine_args: EngineArgs, opts: ServerOptions) -> int:
    from engine import AsyncEngine  # heavy (torch): only when a server really starts
    from engine.errors import UnsupportedModelError
    from server.app import ServerSettings, build_app, start_draining

    try:
        # Blocking on purpose: nothing is served until the model is loaded.
        engine = AsyncEngine.from_args(engine_args, progress=True)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as exc:
        print(f"{PROJECT_NAME}: error: cannot load model {engine_args.model!r}: {exc}",
              file=sys.stderr)
        return 1
    settings = ServerSettings(api_key=opts.api_key, cors_origins=opts.cors_origins,
                              model_root=engine_args.model, max_request_bytes=opts.max_request_bytes)
    app = build_app(engine, settings)
    # uvicorn's own graceful timeout is the backstop behind start_draining's abort.
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                            access_log=opts.access_log, lifespan="on",
                            timeout_graceful_shutdown=int(opts.shutdown_timeout) + 10)
    url = f"http://{opts.host}:{opts.port}"
    ready = f"{PROJECT_NAME} ready: {url}/v1 (model {engine.model_name}, {__version__})"
    server = StrixServer(config, ready, lambda: start_draining(app, opts.shutdown_timeout))
    loop = asyncio.get_running_loop()
    engine_died = threading.Event()

    def on_engine_death(exc: BaseException) -> None:
        # Engine thread: its streams already got their errors; stop serving and exit
        # non-zero so Docker / Kubernetes restart the process (the traceback is logged once).
        engine_died.set()
        loop.call_soon_threadsafe(loop.call_later, ENGINE_DEATH_LINGER_S,
                                  setattr, server, "should_exit", True)
    engine.add_death_listener(on_engine_death)
    try:
        await server.serve()
    finally:
        if engine.is_alive():
            await engine.shutdown()
    if engine_died.is_set():
        print(f"{PROJECT_NAME}: error: the engine failed; exiting with status 70", file=sys.stderr)
        return ENGINE_DIED_STATUS
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    engine_args, opts = resolve(argv)
    logging.basicConfig(level=opts.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(engine_args, opts))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


if __name__ == "__main__":
    sys.exit(main())

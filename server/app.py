"""App factory: `build_app(engine, settings)`; routes, auth, CORS, lifespan.

The engine is injected (tests pass a fake); the app only uses its public
surface: generate/abort, run_tokenizer (the tokenizer is never touched on the
event loop), model_name, max_model_len, vocab_size, is_alive,
add_stats_listener, num_unfinished_requests, get_kv_cache_usage, shutdown.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server import PROJECT_NAME, __version__
from server.errors import APIError, error_body, install_error_handlers, payload_too_large
from server.generation import InFlight, check_model, check_token_ids, vocab_size_of
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                             ModelCard, ModelList, TokenizeRequest)
from server.serving_chat import create_chat_completion, render_chat
from server.serving_completion import create_completion

logger = logging.getLogger("strix.server")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    model_root: str | None = None  # what --model named, shown in /v1/models
    max_request_bytes: int = 10 << 20


class BodyLimitMiddleware:
    """413 (OpenAI shape) for a request body over `limit` bytes, declared or streamed.

    The body is read here (as the app would read it anyway) and replayed to the
    app; later `receive` calls go to the server, so disconnects still arrive."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").strip()
        if declared.isdigit() and int(declared) > self.limit:
            await payload_too_large(self.limit).response()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client gone while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await payload_too_large(self.limit).response()(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()
        await self.app(scope, replayed, send)


class APIKeyMiddleware:
    """401 for /v1/* without `Authorization: Bearer <key>`; everything else is open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") \
                or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)


def build_app(engine: Any, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine.model_name, engine.max_model_len,
                            num_spec_positions=getattr(engine, "num_speculative_tokens", 0))
    engine.add_stats_listener(metrics.on_step)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.draining = True
        await engine.shutdown()

    app = FastAPI(title=PROJECT_NAME, version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    app.state.inflight = InFlight()
    app.state.started = int(time.time())
    install_error_handlers(app)
    _add_openai_routes(app, engine)
    _add_service_routes(app, engine, metrics)
    # Last added runs first: CORS, then the API key (no body is read for a stranger), then the limit.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=False)
    return app


def start_draining(app: FastAPI, abort_after_s: float | None) -> None:
    """Graceful shutdown, phase one (call on the event loop): /health turns 503,
    new generation requests get 503, and whatever still runs `abort_after_s`
    later is aborted, so its clients get a finished response (finish_reason
    "abort") instead of a cut connection."""
    if app.state.draining:
        return
    app.state.draining = True
    if abort_after_s is None:
        return
    engine, inflight = app.state.engine, app.state.inflight

    def abort_rest() -> None:
        if inflight.ids:
            logger.warning("shutdown timeout: aborting %d in-flight request(s)", len(inflight.ids))
        app.state.abort_task = asyncio.ensure_future(inflight.abort_all(engine))

    asyncio.get_running_loop().call_later(abort_after_s, abort_rest)


def _model_card(app: FastAPI, engine: Any) -> ModelCard:
    return ModelCard(id=engine.model_name, created=app.state.started,
                     root=app.state.settings.model_root or engine.model_name,
                     max_model_len=engine.max_model_len)


def _add_openai_routes(app: FastAPI, engine: Any) -> None:
    @app.get("/v1/models")
    async def list_models() -> Response:
        body = ModelList(data=[_model_card(app, engine)])
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        check_model(engine, model_id)
        return Response(_model_card(app, engine).model_dump_json(),
                        media_type="application/json")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        _refuse_if_draining(app)
        return await create_completion(req, raw, engine, app.state.inflight)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        _refuse_if_draining(app)
        return await create_chat_completion(req, raw, engine, app.state.inflight)


def _refuse_if_draining(app: FastAPI) -> None:
    if app.state.draining:
        raise APIError(503, "The server is shutting down.", type="server_error",
                       code="shutting_down", headers={"Retry-After": "1", "Connection": "close"})


def _add_service_routes(app: FastAPI, engine: Any, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        alive = False
        try:
            alive = bool(engine.is_alive())
        except Exception:
            logger.exception("engine liveness check failed")
        if alive and not app.state.draining:
            return JSONResponse({"status": "ok"})
        reason = "shutting down" if app.state.draining else "engine is not running"
        return JSONResponse(error_body(f"Unhealthy: {reason}.", "server_error"), status_code=503)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__, "name": PROJECT_NAME})

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.refresh(engine)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        check_model(engine, req.model)
        if req.messages is None and req.prompt is None:
            raise APIError(400, "Give either `prompt` or `messages`.", param="prompt")

        def run(tokenizer: Any) -> list[int]:
            if req.messages is not None:
                return render_chat(tokenizer, req.messages, req.add_generation_prompt is not False)
            return list(tokenizer.encode(req.prompt,
                                         add_special_tokens=req.add_special_tokens is not False))
        tokens = await engine.run_tokenizer(run)
        body = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        return Response(json.dumps(body), media_type="application/json")

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        check_model(engine, req.model)

        def run(tokenizer: Any) -> str:
            if req.tokens:
                check_token_ids(req.tokens, vocab_size_of(tokenizer), "tokens")
            return tokenizer.decode(req.tokens)
        return JSONResponse({"prompt": await engine.run_tokenizer(run)})

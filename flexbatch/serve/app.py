"""The FastAPI application: state, API-key check, routers, error objects, start and stop.

    state = ServerState.start(llm, data_dir, model_name, defaults, api_key)
    app = create_app(state)          # uvicorn.run(app, host="127.0.0.1", port=8000)
"""
from __future__ import annotations

import hmac
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request

from ..config import SamplingParams
from .batch_worker import BatchWorker
from .engine import Engine
from .errors import error_response, install_error_handlers
from .store import Store

DEFAULT_MAX_UPLOAD_BYTES = 512 << 20


@dataclass
class ServerState:
    engine: Engine
    store: Store
    worker: BatchWorker
    model_name: str
    defaults: SamplingParams
    api_key: str | None
    max_upload_bytes: int
    started_at: int
    expire_batches: bool = False  # batches expire when their completion window closes (OpenAI's rule)

    @classmethod
    def start(cls, llm, data_dir: Path, model_name: str, defaults: SamplingParams, api_key: str | None,
              max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, collect_seconds: float = 0.01,
              pool=None, expire_batches: bool = False) -> "ServerState":
        """`pool`: the compute thread the LLM was loaded on (serve/engine.py says why)."""
        store = Store(data_dir)
        removed = store.remove_orphan_files()
        if removed:
            print(f"removed {removed} unregistered file(s) left by an interrupted run", file=sys.stderr)
        engine = Engine(llm, collect_seconds, pool)
        worker = BatchWorker(store, engine, model_name, defaults)
        resumed = store.active_batches()
        if resumed:
            print(f"resuming {len(resumed)} unfinished batch(es)", file=sys.stderr)
        return cls(engine, store, worker, model_name, defaults, api_key, max_upload_bytes, int(time.time()),
                   expire_batches)

    def stop(self) -> None:
        self.worker.stop()
        self.engine.close()
        self.store.close()


def create_app(state: ServerState) -> FastAPI:
    from .routes_batches import router as batches
    from .routes_files import router as files
    from .routes_online import router as online

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.worker.start()
        yield
        state.stop()

    app = FastAPI(title="flexbatch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)
    for router in (online, files, batches):
        app.include_router(router)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        # Every path, known or not, needs the key: nothing about the server shows without it.
        if state.api_key is not None and not key_matches(request.headers.get("authorization"), state.api_key):
            return error_response(401, "Incorrect or missing API key: send the header "
                                       "'Authorization: Bearer <key>' (flexbatch serve --api-key).",
                                  code="invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.max_upload_bytes + (1 << 20):
            return error_response(413, f"the request body is larger than this server's limit of "
                                       f"{state.max_upload_bytes} bytes", code="request_too_large")
        return await call_next(request)

    return app


def key_matches(header: str | None, api_key: str) -> bool:
    """Constant-time comparison of a 'Bearer <key>' header with the server's key."""
    given = header[7:] if header and header[:7].lower() == "bearer " else ""
    return hmac.compare_digest(given.strip().encode("utf-8"), api_key.encode("utf-8"))

"""The REST edge: an OpenAI-compatible FastAPI app over the pipeline.

A chat completion's path, top to bottom: auth.py (with `api_keys` set, a 401 before the body is
read) -> limits.py (the body's size) -> schemas.py (the body's shape) -> chat.py (the route) ->
openai_format.py (REST -> ChatRequest) -> pipeline.py (resolve, cache, encode, generate) -> chat.py
and openai_format.py (the answer, whole or streamed). Every error leaves in OpenAI's shape with a
fitting status code (errors.py). The other routes are in routes.py (uploads streamed to the video
store: uploads.py, video_store.py); what the app holds while it runs, in runtime.py; the demo
page, in demo.py and static/.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import chat, routes
from gateway.auth import APIKeyAuth
from gateway.demo import PAGE_PATHS, install_demo
from gateway.errors import install_error_handlers
from gateway.limits import BodySizeLimit
from gateway.metrics import GatewayMetrics
from gateway.runtime import Runtime
from videollm.settings import GatewaySettings

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    runtime = Runtime(settings, GatewayMetrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runtime.start()
        yield
        await runtime.close()

    app = FastAPI(title="videollm", version="1.0", summary="Video question answering, OpenAI-compatible",
                  lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, upload_path=routes.UPLOAD_PATH,
                       max_upload_body_bytes=settings.max_upload_body_bytes, max_upload_bytes=settings.max_upload_bytes)
    if settings.api_keys:  # added last = outermost: a 401 goes out before the body is read or size-checked
        app.add_middleware(APIKeyAuth, keys=settings.api_keys, open_paths=PAGE_PATHS)
        log.info("API keys required on every route but /health, /ready, /metrics and the demo page's files "
                 "(%d configured)", len(settings.api_keys))
    app.state.settings = settings
    app.state.metrics = runtime.metrics
    app.state.runtime = runtime
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(routes.router)
    install_demo(app)
    return app

"""The routes around chat completions: uploads, models, health, readiness, settings and metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import uploads
from gateway.runtime import Runtime
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.settings import public_settings

router = APIRouter()
UPLOAD_PATH = "/v1/videos"


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.post(UPLOAD_PATH, openapi_extra=uploads.OPENAPI)
async def upload_video(request: Request):
    """Store a video (multipart field `file`) under its id, `video-<sha256>`, for questions by id."""
    rt = runtime(request)
    upload = await uploads.store_upload(request, rt.video_store, rt.settings.max_upload_bytes)
    rt.metrics.requests.labels(UPLOAD_PATH, "200").inc()
    created = int(time.time())
    return {"id": upload.id, "object": "video", "bytes": upload.size, "sha256": upload.sha256,
            "filename": upload.filename, "created_at": created, "expires_at": created + rt.settings.upload_ttl_s}


@router.get("/v1/models")
async def list_models(request: Request):
    """The served model, then its compression presets: a request names one as its `model`."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "videollm",
                                        "videollm_compression": overrides}
                                       for name, overrides in runtime(request).settings.preset_models().items()]}


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    rt = runtime(request)
    encoders, llms = rt.encoders, rt.llms
    encoder_up = await asyncio.gather(*(r.serving() for r in encoders.replicas))
    llm_up = await asyncio.gather(*(r.serving() for r in llms.replicas))
    redis = "disabled" if not rt.settings.redis_url else ("ok" if await rt.store.ping() else "unavailable")
    serving = any(encoder_up) and any(llm_up)
    degraded = redis == "unavailable" or not all(encoder_up) or not all(llm_up)
    body = {
        "status": "unavailable" if not serving else "degraded" if degraded else "ready",
        "encoders": dict(zip((r.address for r in encoders.replicas), encoder_up)),
        "llms": dict(zip((r.address for r in llms.replicas), llm_up)),
        "redis": redis,
    }
    return JSONResponse(body, status_code=200 if serving else 503)


@router.get("/info")
async def server_info(request: Request):
    """Every setting in effect: the gateway's own and each replica's (secrets left out)."""
    rt = runtime(request)
    encoders = await asyncio.gather(*(r.reported_settings(encoder_pb2.InfoRequest()) for r in rt.encoders.replicas))
    llms = await asyncio.gather(*(r.reported_settings(llm_pb2.LLMInfoRequest()) for r in rt.llms.replicas))
    return {"gateway": public_settings(rt.settings),
            "encoders": dict(zip((r.address for r in rt.encoders.replicas), encoders)),
            "llms": dict(zip((r.address for r in rt.llms.replicas), llms))}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    return Response(generate_latest(runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""The routes around chat completions: uploads, models, health, readiness, settings and metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.errors import bad_request
from gateway.runtime import Runtime
from gateway.videos import Video, probe_video, too_large
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.settings import public_settings

router = APIRouter()


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.post("/v1/videos")
async def upload_video(request: Request, file: UploadFile = File(..., description="the video file")):
    rt = runtime(request)
    data = await file.read()
    if len(data) > rt.settings.max_upload_bytes:
        raise too_large(len(data), rt.settings.max_upload_bytes)
    if not data:
        raise bad_request("the uploaded file is empty", "file")
    await asyncio.to_thread(probe_video, data)
    video = Video.of(data)
    await rt.uploads.put(video)
    rt.metrics.requests.labels("/v1/videos", "200").inc()
    return {"id": video.id, "object": "video", "bytes": len(data), "sha256": video.sha256,
            "filename": file.filename, "created_at": int(time.time())}


@router.get("/v1/models")
async def list_models(request: Request):
    model = runtime(request).settings.model_name
    return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "videollm"}]}


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

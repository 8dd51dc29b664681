"""The REST edge: OpenAI-compatible routes that translate HTTP to the pipeline and back.

Routes only parse, validate and format; the pipeline does the work. Every error leaves in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) with a fitting status code.
With `api_keys` set, gateway/auth.py answers 401 to requests without a valid Bearer key first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.auth import APIKeyAuth
from gateway.backends import ReplicaPool, llm_stub
from gateway.cache import RedisStore, TokenCache
from gateway.errors import APIError, bad_request
from gateway.fetch import FetchPolicy, fetch_video
from gateway.limits import BodySizeLimit
from gateway.metrics import GatewayMetrics
from gateway.pipeline import ChatRequest, Outcome, Pipeline, VideoRequest
from gateway.schemas import ChatCompletionRequest, TextPart, VideoPart
from gateway.videos import VIDEO_ID, UploadStore, Video, decode_data_url, probe_video, too_large
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2
from videollm.proto_mapping import compression_from_proto, describe_errors, inner_to_proto
from videollm.settings import CompressionSettings, GatewaySettings, MiB, public_settings

log = logging.getLogger(__name__)


class Runtime:
    """What the gateway holds while it runs: Redis, replica pools, the pipeline."""

    in_flight = 0  # chat completions in progress

    def start(self, settings: GatewaySettings) -> None:
        self.store = RedisStore(settings.redis_url)
        self.uploads = UploadStore(self.store, settings.upload_ttl_s)
        grpc_message_bytes = settings.max_upload_bytes + MiB
        tls = ReplicaPool.credentials(settings.grpc_tls_ca, settings.grpc_tls_cert, settings.grpc_tls_key)
        self.encoders = ReplicaPool.connect("encoder", settings.encoders, encoder_pb2_grpc.EncoderStub,
                                            grpc_message_bytes, tls)
        self.llms = ReplicaPool.connect("llm", settings.llms, llm_stub, 16 * MiB, tls)
        cache = TokenCache(self.store, settings.cache_ttl_s, settings.cache_max_entry_bytes)
        self.pipeline = Pipeline(settings, self.encoders, self.llms, cache)

    async def close(self) -> None:
        await self.pipeline.close()
        await self.encoders.close()
        await self.llms.close()
        await self.store.close()


COMPRESSION = ("videollm", "compression")  # where REST's compression settings sit in a chat body


def _body_path(error: dict) -> tuple:
    return tuple(p for p in error.get("loc", ()) if p != "body")


def compression_settings_dict(message) -> dict:
    """The encoder's resolved compression settings, as the request's `videollm.compression` spells them."""
    settings = compression_from_proto(message, CompressionSettings()) if message.method else None
    return settings.model_dump() if settings is not None else {}


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    rt = Runtime()
    fetch_policy = FetchPolicy.parse(settings.fetch_urls, settings.max_upload_bytes, settings.fetch_timeout_s,
                                     settings.fetch_allow)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # gRPC aio channels and the Redis client belong to the server's event loop: create them here.
        rt.start(settings)
        app.state.runtime = rt
        if settings.redis_url and not await rt.store.ping():
            log.warning("starting without the cache: Redis at %s is unreachable", settings.redis_url)
        yield
        await rt.close()

    app = FastAPI(title="videollm", version="1.0", summary="Video question answering, OpenAI-compatible",
                  lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.api_keys:  # added last = outermost: a 401 goes out before the body is read or size-checked
        app.add_middleware(APIKeyAuth, keys=settings.api_keys)
        log.info("API keys required on every route but /health, /ready and /metrics (%d configured)",
                 len(settings.api_keys))
    app.state.settings = settings
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        path = _body_path(first)
        where = ".".join(str(p) for p in path)
        if not where and first.get("type") == "missing":
            message = "the request body is missing: send a JSON object"
        elif path[:2] == COMPRESSION and len(path) > 2:  # a compression setting: state its range, as the encoder does
            under = [{**e, "loc": _body_path(e)[2:]} for e in errors if _body_path(e)[:2] == COMPRESSION]
            message = describe_errors([e for e in under if e["loc"]], ".".join(COMPRESSION))
        else:
            message = f"{where}: {first['msg']}" if where else first["msg"]
        return await api_error(request, bad_request(message, where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        type_ = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(err.status_code, str(err.detail), type_))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return await api_error(request, APIError(500, "internal error; see the gateway's log", "api_error"))

    # -- chat completions ----------------------------------------------------------------------

    async def resolve_video(url: str) -> Video:
        if url.startswith("data:"):
            return await asyncio.to_thread(decode_data_url, url, settings.max_upload_bytes)
        if VIDEO_ID.match(url):
            video = await rt.uploads.get(url)
            if video is None:
                raise APIError(404, f"no uploaded video with id {url!r} (it may have expired)", "not_found_error",
                               param="messages", code="video_not_found")
            return video
        if url.startswith(("http://", "https://")):
            return Video.of(await fetch_video(url, fetch_policy))
        raise bad_request("video_url.url must be a data:video/...;base64, URL or a video id from /v1/videos",
                          "messages")

    async def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
        messages, video_url = [], None
        for message in body.messages:
            parts = [message.content] if isinstance(message.content, str) else message.content
            out = llm_pb2.ChatMessage(role=message.role)
            for part in parts:
                if isinstance(part, str):
                    out.content.add(text=part)
                elif isinstance(part, TextPart):
                    out.content.add(text=part.text)
                elif isinstance(part, VideoPart):
                    if video_url is not None:
                        raise bad_request("at most one video per request is supported", "messages")
                    video_url = part.video_url.url
                    out.content.add(video=True)
            messages.append(out)
        video = None
        if video_url is not None:
            options = body.videollm
            overrides = options.compression.encoder_fields() if options.compression else {}
            video = VideoRequest(await resolve_video(video_url), options.num_frames, overrides)
        elif any(value is not None for value in body.videollm.model_dump().values()):
            raise bad_request("videollm options need a video_url content part", "videollm")
        inner = body.videollm.inner_compression
        inner = inner_to_proto(inner) if inner is not None else None
        sampling = llm_pb2.SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens or 0,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop_list(),
        )
        if body.seed is not None:
            sampling.seed = body.seed
        return ChatRequest(messages, sampling, video, inner)

    def since(start: float | None, end: float | None) -> float | None:
        return round((end - start) * 1e3, 3) if start is not None and end is not None else None

    def videollm_object(outcome: Outcome, received_at: float) -> dict:
        header, final = outcome.header, outcome.final
        now = time.perf_counter()
        ttft = (outcome.first_token_at or now) - received_at
        encoded = header is not None and outcome.cache == "miss"
        timings = {
            "encode": round(header.timings.total_ms, 3) if encoded else 0.0,
            "prefill": round(final.timings.prefill_ms, 3) if final else None,
            "ttft": round(ttft * 1e3, 3),
            "llm_ttft": round(final.timings.ttft_ms, 3) if final else None,  # LLM call start -> first token
            "total": round((now - received_at) * 1e3, 3),
            "llm_queue": round(final.timings.queue_ms, 3) if final else None,
            # from the LLM call's start until the whole visual tensor arrived there and was checked
            "handoff": round(final.timings.receive_ms, 3) if final else None,
            # the gateway's hops: request in -> Encode call (validation, hashing, cache lookup), the
            # Encode call until its header (encoder and gRPC), request in -> Generate call
            "gateway_in": since(received_at, outcome.encode_called_at),
            "encode_call": since(outcome.encode_called_at, outcome.encode_header_at),
            "to_llm_call": since(received_at, outcome.llm_called_at),
        }
        body = {
            "cache": outcome.cache,
            "frames": header.frames_sampled if header is not None else 0,
            "visual_tokens": final.usage.visual_tokens if final else 0,
            "timings_ms": timings,
            "decode_tokens_per_s": round(final.timings.decode_tokens_per_s, 2) if final else None,
        }
        if header is not None:
            body["source"] = {
                "duration_s": round(header.source_duration_s, 3),
                "fps": round(header.source_fps, 3),
                "frames": header.source_frames,
                "frame_indices": list(header.frame_indices),
            }
            info = header.compression
            body["frames_after_merge"] = info.frames_after_merge
            body["segments"] = [[s.first, s.last] for s in info.segments]
            body["kept"] = [list(k.positions) for k in info.kept]
            body["compression"] = {
                "method": info.method,
                "tokens_per_frame": info.tokens_per_frame,
                "uncompressed_tokens": header.uncompressed_tokens,
                "layer_frames": list(info.layer_frames),
                "settings": compression_settings_dict(info.settings),
            }
            body["encoder_timings_ms"] = {
                name: round(getattr(header.timings, name + "_ms"), 3)
                for name in ("decode", "preprocess", "queue", "vision", "stage1", "importance", "projector",
                             "stage2", "total")
            }
            # the requests whose frames shared the vision tower's pass with this one's (itself included)
            body["encoder_batch"] = {"requests": header.batch_requests, "frames": header.batch_frames}
            body["flops"] = {
                "encoder": header.flops.encoder,
                "encoder_uncompressed": header.flops.encoder_uncompressed,
                "prefill": final.flops.prefill if final else None,
                "prefill_uncompressed": final.flops.prefill_uncompressed if final else None,
            }
        return body

    def usage_object(final: llm_pb2.GenerateFinal | None) -> dict | None:
        if final is None:
            return None
        prompt = final.usage.prompt_tokens + final.usage.visual_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": final.usage.completion_tokens,
            "total_tokens": prompt + final.usage.completion_tokens,
        }

    def record(outcome: Outcome, received_at: float, status: str) -> None:
        metrics.requests.labels("/v1/chat/completions", status).inc()
        metrics.total.observe(time.perf_counter() - received_at)
        if outcome.cache:
            metrics.cache.labels(outcome.cache).inc()
        if outcome.first_token_at is not None:
            metrics.ttft.labels(outcome.cache or "none").observe(outcome.first_token_at - received_at)
        if outcome.header is not None and outcome.cache == "miss":
            metrics.encode.observe(outcome.header.timings.total_ms / 1e3)
        if outcome.final is not None:
            metrics.queue.observe(outcome.final.timings.queue_ms / 1e3)
            metrics.completion_tokens.inc(outcome.final.usage.completion_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        received_at = time.perf_counter()
        if body.model != settings.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; use {settings.model_name!r}",
                           "not_found_error", param="model", code="model_not_found")
        if rt.in_flight >= settings.max_in_flight:
            raise APIError(429, f"the gateway has {settings.max_in_flight} requests in progress; retry shortly",
                           "rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
        chat = await to_chat_request(body)
        chat.received_at = received_at
        chat.deadline = time.monotonic() + settings.request_timeout_s
        outcome = Outcome()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        metrics.in_flight.inc()
        rt.in_flight += 1
        try:
            responses = await rt.pipeline.start(chat, outcome)
        except BaseException:
            metrics.in_flight.dec()
            rt.in_flight -= 1
            raise
        headers = {"x-videollm-cache": outcome.cache or "none"}

        if not body.stream:
            text = []

            async def collect():
                async for response in responses:
                    if response.WhichOneof("item") == "delta":
                        text.append(response.delta.text)

            try:
                collecting = asyncio.ensure_future(collect())
                while not collecting.done():
                    await asyncio.wait({collecting}, timeout=0.5)
                    if not collecting.done() and await request.is_disconnected():
                        collecting.cancel()  # the client left: stop decoding and free the LLM
                        await asyncio.gather(collecting, return_exceptions=True)
                        record(outcome, received_at, "499")
                        return Response(status_code=499)
                collecting.result()
            finally:
                metrics.in_flight.dec()
                rt.in_flight -= 1
            record(outcome, received_at, "200")
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": settings.model_name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(text)},
                            "finish_reason": outcome.final.finish_reason if outcome.final else "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage_object(outcome.final),
                    "videollm": videollm_object(outcome, received_at),
                },
                headers=headers,
            )

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra,
            }
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events():
            status = "200"
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for response in responses:
                    if response.WhichOneof("item") == "delta":
                        yield chunk({"content": response.delta.text})
                final = outcome.final
                yield chunk({}, final.finish_reason if final else "stop",
                            videollm=videollm_object(outcome, received_at))
                if include_usage:
                    payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": settings.model_name, "choices": [], "usage": usage_object(final)}
                    yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            except APIError as err:
                status = str(err.status)
                yield f"data: {json.dumps(err.body())}\n\n"
            except asyncio.CancelledError:
                status = "499"
                raise
            finally:
                metrics.in_flight.dec()
                rt.in_flight -= 1
                record(outcome, received_at, status)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    # -- uploads, models, health ----------------------------------------------------------------

    @app.post("/v1/videos")
    async def upload_video(file: UploadFile = File(..., description="the video file")):
        data = await file.read()
        if len(data) > settings.max_upload_bytes:
            raise too_large(len(data), settings.max_upload_bytes)
        if not data:
            raise bad_request("the uploaded file is empty", "file")
        await asyncio.to_thread(probe_video, data)
        video = Video.of(data)
        await rt.uploads.put(video)
        metrics.requests.labels("/v1/videos", "200").inc()
        return {"id": video.id, "object": "video", "bytes": len(data), "sha256": video.sha256,
                "filename": file.filename, "created_at": int(time.time())}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list",
                "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "videollm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        encoders, llms = rt.encoders, rt.llms
        encoder_up = await asyncio.gather(*(r.serving() for r in encoders.replicas))
        llm_up = await asyncio.gather(*(r.serving() for r in llms.replicas))
        redis = "disabled" if not settings.redis_url else ("ok" if await rt.store.ping() else "unavailable")
        serving = any(encoder_up) and any(llm_up)
        degraded = redis == "unavailable" or not all(encoder_up) or not all(llm_up)
        body = {
            "status": "unavailable" if not serving else "degraded" if degraded else "ready",
            "encoders": dict(zip((r.address for r in encoders.replicas), encoder_up)),
            "llms": dict(zip((r.address for r in llms.replicas), llm_up)),
            "redis": redis,
        }
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/info")
    async def server_info():
        """Every setting in effect: the gateway's own and each replica's (secrets left out)."""
        encoders = await asyncio.gather(*(r.reported_settings(encoder_pb2.InfoRequest()) for r in rt.encoders.replicas))
        llms = await asyncio.gather(*(r.reported_settings(llm_pb2.LLMInfoRequest()) for r in rt.llms.replicas))
        return {"gateway": public_settings(settings),
                "encoders": dict(zip((r.address for r in rt.encoders.replicas), encoders)),
                "llms": dict(zip((r.address for r in rt.llms.replicas), llms))}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

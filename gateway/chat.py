"""POST /v1/chat/completions: check the request, hand it to the pipeline, answer whole or streamed.

A whole answer stops the LLM and is recorded as 499 when the client leaves before it is done; a
stream ends with the finish reason and the `videollm` object (then the usage, if asked, and
[DONE]), or with an error event when the stack fails mid-answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gateway.body import ChatRoute
from gateway.errors import APIError
from gateway.openai_format import Completion, sse, to_chat_request
from gateway.requests import Outcome
from gateway.runtime import Runtime
from gateway.schemas import ChatCompletionRequest

log = logging.getLogger(__name__)
router = APIRouter(route_class=ChatRoute)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    received_at = time.perf_counter()
    rt: Runtime = request.app.state.runtime
    models = rt.settings.preset_models()
    if body.model not in models:
        raise APIError(404, f"the model {body.model!r} does not exist; use one of {', '.join(models)} (GET /v1/models)",
                       "not_found_error", param="model", code="model_not_found")
    model = body.model
    rt.check_capacity()
    chat = await to_chat_request(body, rt.videos, models[model])
    chat.received_at = received_at
    chat.deadline = time.monotonic() + rt.settings.request_timeout_s
    outcome = Outcome(arrived_at=request.state.arrived_at)
    if chat.video is not None:
        outcome.images = len(chat.video.video.image_sizes)
    completion = Completion(model, received_at)
    rt.enter()
    try:
        responses = await rt.pipeline.start(chat, outcome)
    except BaseException:
        rt.leave()
        raise
    headers = {"x-videollm-cache": outcome.cache or "none"}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream(rt, responses, outcome, completion, include_usage),
                                 media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    text: list[str] = []
    try:
        answered = await until_done_or_gone(request, collect(responses, text))
    finally:
        rt.leave()
    if not answered:
        finished(rt, completion, outcome, "499")
        return Response(status_code=499)
    finished(rt, completion, outcome, "200")
    return JSONResponse(completion.whole("".join(text), outcome), headers=headers)


def finished(rt: Runtime, completion: Completion, outcome: Outcome, status: str) -> None:
    """Metrics and one log line per answered chat: the model (or preset) asked for and the
    compression the encoder applied, so that an evaluation's requests can be read back from the logs."""
    rt.metrics.record_chat(outcome, completion.received_at, status)
    header = outcome.header
    if header is None:
        log.info("chat %s model=%s status=%s video=none", completion.id, completion.model, status)
        return
    settings = header.compression.settings
    compression = (f"earlytom retain_ratio={settings.retain_ratio:g}" if header.compression.method == "earlytom"
                   else header.compression.method)
    ttft = (outcome.first_token_at - completion.received_at) * 1e3 if outcome.first_token_at else float("nan")
    log.info("chat %s model=%s status=%s video=%s cache=%s frames=%d frames_after_merge=%d visual_tokens=%d "
             "compression=%s ttft_ms=%.0f", completion.id, completion.model, status,
             f"{outcome.images}-images" if outcome.images else "file", outcome.cache, header.frames_sampled,
             header.compression.frames_after_merge, header.tensor.shape[0] if header.tensor.shape else 0, compression,
             ttft)


async def collect(responses: AsyncIterator, text: list[str]) -> None:
    async for response in responses:
        if response.WhichOneof("item") == "delta":
            text.append(response.delta.text)


async def until_done_or_gone(request: Request, work) -> bool:
    """Run `work` to the end (its error raised here); False, with the work cancelled, when the client
    disconnected first: that stops decoding and frees the LLM."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return False
    task.result()
    return True


async def stream(rt: Runtime, responses: AsyncIterator, outcome: Outcome, completion: Completion,
                 include_usage: bool) -> AsyncIterator[str]:
    status = "200"
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        async for response in responses:
            if response.WhichOneof("item") == "delta":
                yield completion.chunk({"content": response.delta.text})
        for chunk in completion.closing_chunks(outcome, include_usage):
            yield chunk
    except APIError as err:
        status = str(err.status)
        yield sse(err.body())
    except asyncio.CancelledError:
        status = "499"
        raise
    finally:
        rt.leave()
        finished(rt, completion, outcome, status)

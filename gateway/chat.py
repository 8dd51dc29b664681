"""POST /v1/chat/completions: check the request, hand it to the pipeline, answer whole or streamed.

A whole answer stops the LLM and is recorded as 499 when the client leaves before it is done; a
stream ends with the finish reason and the `videollm` object (then the usage, if asked, and
[DONE]), or with an error event when the stack fails mid-answer.
"""

from __future__ import annotations

import asyncio
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

router = APIRouter(route_class=ChatRoute)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    received_at = time.perf_counter()
    rt: Runtime = request.app.state.runtime
    model = rt.settings.model_name
    if body.model != model:
        raise APIError(404, f"the model {body.model!r} does not exist; use {model!r}", "not_found_error",
                       param="model", code="model_not_found")
    rt.check_capacity()
    chat = await to_chat_request(body, rt.videos)
    chat.received_at = received_at
    chat.deadline = time.monotonic() + rt.settings.request_timeout_s
    outcome = Outcome(arrived_at=request.state.arrived_at)
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
        rt.metrics.record_chat(outcome, received_at, "499")
        return Response(status_code=499)
    rt.metrics.record_chat(outcome, received_at, "200")
    return JSONResponse(completion.whole("".join(text), outcome), headers=headers)


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
        rt.metrics.record_chat(outcome, completion.received_at, status)

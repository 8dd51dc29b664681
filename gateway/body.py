"""The chat completion's body on its way in: parsed from its raw bytes, and timed.

FastAPI's default parse of a body with a 40 MB data URL costs many copies of the video: stdlib json
decodes the whole body to a str and builds another str of the URL, the URL's payload is then sliced
out of it and encoded again for base64. Here pydantic's JSON parser reads the bytes, and the base64
payload of an inline data URL is left where it is in the body: the parser reads a copy of the body
with the payload cut out and an unguessable marker in its place, and the VideoURL that ends with the
marker gets a memoryview of the payload for the decoder (videos.decode_data_url). A payload with a
JSON escape in it, or a body whose first ";base64," is not a video URL's, is parsed whole as usual.

A body that does not validate goes the way FastAPI always takes, so its errors keep their wording.
The route also stamps when the request arrived, before the body is read, so that the answer's
`timings_ms.body` can say what receiving, parsing and validating it cost.
"""

from __future__ import annotations

import json
import secrets
import time

from fastapi import Request
from fastapi.routing import APIRoute
from pydantic import ValidationError

from gateway.schemas import ChatCompletionRequest, VideoPart

BASE64_MARK = b";base64,"


def parse_chat_body(raw: bytes) -> ChatCompletionRequest | object:
    """The validated request, an inline data URL's payload left in `raw`; when the body does not
    validate, its plain JSON value (or json's error), for FastAPI to validate and word the error."""
    request = _parse_with_payload_left_in(raw)
    if request is not None:
        return request
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError:
        return json.loads(raw)


def _parse_with_payload_left_in(raw: bytes) -> ChatCompletionRequest | None:
    """None when there is no payload to leave out, or when this one is not a video URL's."""
    start = raw.find(BASE64_MARK)
    if start < 0:
        return None
    start += len(BASE64_MARK)
    end = raw.find(b'"', start)  # without a backslash before it, the string's closing quote
    if end < 0 or raw.find(b"\\", start, end) >= 0:
        return None
    marker = secrets.token_hex(16)  # a client cannot put it anywhere itself
    try:
        request = ChatCompletionRequest.model_validate_json(b"".join((raw[:start], marker.encode(), raw[end:])))
    except ValidationError:
        return None
    for message in request.messages:
        for part in message.content if isinstance(message.content, list) else ():
            if isinstance(part, VideoPart) and part.video_url.url.endswith(marker):
                part.video_url.leave_payload_in_body(part.video_url.url[: -len(marker)], memoryview(raw)[start:end])
                return request
    return None  # the marker landed in some other string: a question that quotes a data URL, say


class ChatBodyRequest(Request):
    async def body(self) -> bytes | bytearray:
        """The body, grown in one buffer as its messages arrive (realloc moves a large buffer's pages
        without copying them); Starlette keeps the messages and joins them at the end, one more copy
        of the whole body into fresh memory."""
        if not hasattr(self, "_body"):
            body = bytearray()
            async for message in self.stream():
                body += message
            self._body = body
        return self._body

    async def json(self):  # FastAPI calls it for a JSON body, once the body is read
        if not hasattr(self, "_json"):
            self._json = parse_chat_body(await self.body())
        return self._json


class ChatRoute(APIRoute):
    """The chat completion's route: its body parsed by parse_chat_body, and `request.state.arrived_at`
    (time.perf_counter()) stamped before the body is read."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def parsed_here(request: Request):
            request.state.arrived_at = time.perf_counter()
            return await handler(ChatBodyRequest(request.scope, request.receive))

        return parsed_here

"""Request body size limits, enforced before the body is parsed (pure ASGI middleware).

Chat bodies get `max_body_bytes` (which follows the inline video limit); the upload route gets its
own, larger limit: the largest upload plus room for the multipart envelope. The upload route also
counts the video's own bytes as they stream in (uploads.py); this bound covers the rest of the body.
A declared Content-Length over the limit is refused at once; a body without one is counted as it
arrives.
"""

from __future__ import annotations

import json


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, upload_path: str, max_upload_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_path = upload_path
        self.max_upload_body_bytes = max_upload_body_bytes
        self.max_upload_bytes = max_upload_bytes

    def _limit(self, scope) -> int:
        return self.max_upload_body_bytes if scope.get("path") == self.upload_path else self.max_bytes

    def _message(self, scope, size: int | None, limit: int) -> str:
        got = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        if scope.get("path") == self.upload_path:
            return f"the upload is {got}; the limit is {self.max_upload_bytes} bytes of video"
        return (f"the request body is {got}; the limit is {limit} bytes. Upload a large video with "
                f"POST {self.upload_path} and ask about it by the id it returns")

    async def _reject(self, scope, send, size: int | None, limit: int) -> None:
        body = json.dumps({"error": {
            "message": self._message(scope, size, limit),
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = None
                if size is not None and size > limit:
                    return await self._reject(scope, send, size, limit)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(scope, send, None, limit)


class _TooLarge(Exception):
    pass

"""Optional API keys: `Authorization: Bearer <key>` checked before anything else (pure ASGI middleware).

It runs outside the routes and never calls `receive`, so a request without a valid key gets its
401 before a byte of its body is read or parsed. Every path needs a key except OPEN_PATHS (the
probes and the metrics scrape) and the paths the app adds (the demo page's static files). Keys are compared in constant time: SHA-256 digests of the key
sent and of every configured key go through hmac.compare_digest, all of them, with no early exit,
so neither which key matched nor a key's length shows in the timing. The key sent is never logged
nor echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import json

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})

HOW = "send your API key in the Authorization header: 'Authorization: Bearer <key>'"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class APIKeyAuth:
    def __init__(self, app, keys: list[str], open_paths: frozenset[str] = frozenset()):
        if not keys:
            raise ValueError("APIKeyAuth needs at least one key")
        self.app = app
        self.open_paths = OPEN_PATHS | open_paths
        self._digests = [_digest(key.encode()) for key in keys]

    def authorized(self, headers) -> str | None:
        """None when the request carries a valid key, else the reason (which never quotes the key)."""
        value = next((v for name, v in headers if name == b"authorization"), None)
        if value is None:
            return f"no API key was provided; {HOW}"
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer":
            return f"the Authorization header must use the Bearer scheme; {HOW}"
        if not token:
            return f"the API key is empty; {HOW}"
        sent = _digest(token)
        valid = False
        for digest in self._digests:  # every key, no early exit
            valid |= hmac.compare_digest(sent, digest)
        return None if valid else f"incorrect API key provided; {HOW}"

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        reason = self.authorized(scope.get("headers", []))
        if reason is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
            return
        body = json.dumps({"error": {"message": reason, "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

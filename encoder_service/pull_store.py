"""Token tensors of recent encodes, kept briefly so that an LLM service can pull them once.

The gateway still receives every encode (it caches it and replays it on retries); the copy here
lets the LLM take the tokens straight from the encoder, one hop instead of two. Entries leave on
their pull, after `ttl_s`, or oldest first when `max_bytes` would be exceeded. Thread-safe.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict


class PullStore:
    def __init__(self, max_bytes: int, ttl_s: float):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, memoryview]] = OrderedDict()  # ticket -> (expiry, payload)
        self._bytes = 0
        self._lock = threading.Lock()
        self.pulled = 0

    def put(self, payload: memoryview) -> str:
        """Keep payload; return its ticket, or "" when it does not fit (or the store is off)."""
        if len(payload) > self.max_bytes or self.ttl_s <= 0:
            return ""
        ticket = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while self._bytes + len(payload) > self.max_bytes:
                _, (_, oldest) = self._entries.popitem(last=False)
                self._bytes -= len(oldest)
            self._entries[ticket] = (now + self.ttl_s, payload)
            self._bytes += len(payload)
        return ticket

    def take(self, ticket: str) -> memoryview | None:
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.pop(ticket, None)
            if entry is None:
                return None
            self._bytes -= len(entry[1])
            self.pulled += 1
            return entry[1]

    def _expire(self, now: float) -> None:
        while self._entries:
            ticket, (expiry, payload) = next(iter(self._entries.items()))
            if expiry > now:
                return
            del self._entries[ticket]
            self._bytes -= len(payload)

"""Token tensors of recent encodes, kept briefly so that an LLM service can pull them once.

The gateway still receives every encode (it caches it and replays it on retries); the copy here
lets the LLM take the tokens straight from the encoder, one hop instead of two. With a shared
memory directory (`shm_dir`, see videollm.pull_files) the copy is a file there, which an LLM on
the same host takes without any gRPC; Encoder.Pull serves the same file to an LLM elsewhere.
Entries leave on their pull, after `ttl_s`, or oldest first when `max_bytes` would be exceeded.
Thread-safe.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from videollm import pull_files

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    expiry: float
    size: int
    payload: memoryview | None  # None when the bytes are in the ticket's shared-memory file


class PullStore:
    def __init__(self, max_bytes: int, ttl_s: float, shm_dir: Path | None = None):
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.shm_dir = shm_dir if pull_files.usable(shm_dir) else None
        if shm_dir is not None and self.shm_dir is None:
            log.warning("pull_shm_dir %s is not a writable directory; tokens are pulled over gRPC only", shm_dir)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.pulled = 0
        self._closed = threading.Event()
        if self.shm_dir is not None and ttl_s > 0:
            pull_files.sweep(self.shm_dir, older_than_s=max(ttl_s, 60.0))  # left by a service that was killed
            # files of an idle store expire too, not only at its next put or take
            threading.Thread(target=self._expire_until_closed, name="pull-expiry", daemon=True).start()

    def put(self, payload: memoryview) -> str:
        """Keep payload; return its ticket, or "" when it does not fit (or the store is off)."""
        if len(payload) > self.max_bytes or self.ttl_s <= 0:
            return ""
        ticket = secrets.token_hex(16)
        kept: memoryview | None = payload
        if self.shm_dir is not None:
            try:
                pull_files.write(self.shm_dir, ticket, payload)
                kept = None
            except OSError as err:  # full or gone: keep the bytes here instead
                log.warning("could not write a pull file in %s (%s); keeping the tokens in memory", self.shm_dir, err)
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            while self._bytes + len(payload) > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[ticket] = _Entry(now + self.ttl_s, len(payload), kept)
            self._bytes += len(payload)
        return ticket

    def take(self, ticket: str) -> memoryview | bytearray | None:
        """The ticket's bytes, once; None when unknown, expired, or already taken from shared memory."""
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.pop(ticket, None)
            if entry is None:
                return None
            self._bytes -= entry.size
        payload = entry.payload
        if payload is None:
            payload = pull_files.take(self.shm_dir, ticket, entry.size)
            if payload is None:
                return None
        with self._lock:
            self.pulled += 1
        return payload

    def close(self) -> None:
        """Remove every file left in shared memory."""
        self._closed.set()
        with self._lock:
            while self._entries:
                self._drop(next(iter(self._entries)))

    def _expire_until_closed(self) -> None:
        while not self._closed.wait(min(self.ttl_s, 5.0)):
            with self._lock:
                self._expire(time.monotonic())

    def _drop(self, ticket: str) -> None:
        entry = self._entries.pop(ticket)
        self._bytes -= entry.size
        if entry.payload is None:
            pull_files.remove(pull_files.path_for(self.shm_dir, ticket))

    def _expire(self, now: float) -> None:
        while self._entries:
            ticket, entry = next(iter(self._entries.items()))
            if entry.expiry > now:
                return
            self._drop(ticket)

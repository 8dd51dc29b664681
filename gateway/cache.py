"""Redis cache of encoded videos, and single flight for concurrent identical misses.

An entry holds the encoder's header (shape, dtype, CRC-32, metadata) and the raw token bytes:
`MAGIC | u32 header length | EncodeHeader | payload`. A read checks length and checksum; a bad
entry is deleted and reported as a miss, so a corrupted value can never reach the LLM. The key
covers the model identity, the video's sha256 and the resolved sampling and compression settings.
When Redis is unreachable every call degrades to a miss (or a no-op) and the error is logged once
per outage; `healthy` tells /ready.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis_async
from redis.exceptions import RedisError

from google.protobuf.message import DecodeError

from protos.videollm.v1 import encoder_pb2

log = logging.getLogger(__name__)

MAGIC = b"VLLMTOK1"
_LEN = struct.Struct("<I")
PEEK_BYTES = 64 * 1024  # enough for any header: the metadata grows with frames, not with tokens


@dataclass(frozen=True)
class EncodedVideo:
    """Visual tokens as they travel: the encoder's header and the raw little-endian payload."""

    header: encoder_pb2.EncodeHeader
    payload: bytes | memoryview  # a view into the Redis value on a hit: no copy of the tokens

    def to_bytes(self) -> bytes:
        header = self.header.SerializeToString()
        return b"".join([MAGIC, _LEN.pack(len(header)), header, self.payload])

    @staticmethod
    def parse_header(blob: bytes) -> tuple[encoder_pb2.EncodeHeader, int]:
        """The header of an entry (or of its first bytes) and where the payload starts; ValueError if damaged."""
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _LEN.size:
            raise ValueError("not a videollm token entry")
        (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
        start = len(MAGIC) + _LEN.size
        if header_len == 0 or len(blob) < start + header_len:
            raise ValueError("entry truncated inside its header")
        try:
            header = encoder_pb2.EncodeHeader.FromString(blob[start : start + header_len])
        except DecodeError as err:
            raise ValueError(f"entry header unreadable: {err}") from err
        if not header.HasField("tensor") or not header.tensor.dtype:
            raise ValueError("entry header describes no tensor")
        return header, start + header_len

    @classmethod
    def from_bytes(cls, blob: bytes) -> EncodedVideo:
        """Parse and verify a stored entry; raises ValueError when it is damaged."""
        header, start = cls.parse_header(blob)
        payload = memoryview(blob)[start:]
        if len(payload) != header.tensor.num_bytes:
            raise ValueError(f"entry truncated: {len(payload)} of {header.tensor.num_bytes} bytes")
        if zlib.crc32(payload) != header.tensor.crc32:
            raise ValueError("entry checksum mismatch")
        return cls(header, payload)


def cache_key(model_id: str, video_sha256: str, sampling: dict, compression: dict, max_visual_tokens: int = 0) -> str:
    """sampling, compression: the resolved settings' cache_fields (equivalent spellings give one key)."""
    settings = json.dumps({"sampling": sampling, "compression": compression, "max_visual_tokens": max_visual_tokens},
                          sort_keys=True)
    digest = hashlib.sha256(f"{model_id}\n{video_sha256}\n{settings}".encode()).hexdigest()
    return f"videollm:v1:tokens:{digest}"


class RedisStore:
    """A Redis client that degrades to 'unavailable' instead of failing the request."""

    def __init__(self, url: str | None):
        self.url = url
        self.client = (
            redis_async.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=5.0, health_check_interval=10)
            if url
            else None
        )
        self.healthy = self.client is not None
        self._last_error_logged = 0.0

    def _failed(self, err: Exception) -> None:
        now = time.monotonic()
        if self.healthy or now - self._last_error_logged > 30:
            log.warning("Redis at %s is unavailable, continuing without the cache: %s", self.url, err)
            self._last_error_logged = now
        self.healthy = False

    def _ok(self) -> None:
        if not self.healthy and self.client is not None:
            log.info("Redis at %s is reachable again", self.url)
        self.healthy = self.client is not None

    async def get(self, key: str) -> bytes | None:
        if self.client is None:
            return None
        try:
            value = await self.client.get(key)
        except (RedisError, OSError) as err:
            self._failed(err)
            return None
        self._ok()
        return value

    async def get_prefix(self, key: str, length: int) -> tuple[bytes, int] | None:
        """The first `length` bytes of the value and its whole length, in one round trip (b"", 0 when
        the key is missing)."""
        if self.client is None:
            return None
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                value, total = await pipe.getrange(key, 0, length - 1).strlen(key).execute()
        except (RedisError, OSError) as err:
            self._failed(err)
            return None
        self._ok()
        return value, total

    async def set(self, key: str, value: bytes, ttl_s: int) -> bool:
        if self.client is None:
            return False
        try:
            await self.client.set(key, value, ex=ttl_s)
        except (RedisError, OSError) as err:
            self._failed(err)
            return False
        self._ok()
        return True

    async def delete(self, key: str) -> None:
        if self.client is None:
            return
        try:
            await self.client.delete(key)
        except (RedisError, OSError) as err:
            self._failed(err)

    async def ping(self) -> bool:
        if self.client is None:
            return False
        try:
            await self.client.ping()
        except (RedisError, OSError) as err:
            self._failed(err)
            return False
        self._ok()
        return True

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class TokenCache:
    def __init__(self, store: RedisStore, ttl_s: int, max_entry_bytes: int, skipped: Callable[[], None] = lambda: None):
        """skipped(): called for each encoding too large to cache (a metric counts them); such an
        entry is never truncated, only left out."""
        self.store = store
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.skipped = skipped
        self._writes: set[asyncio.Task] = set()

    async def get(self, key: str) -> EncodedVideo | None:
        blob = await self.store.get(key)
        if blob is None:
            return None
        try:
            return EncodedVideo.from_bytes(blob)
        except ValueError as err:
            log.warning("dropping a damaged cache entry %s: %s", key, err)
            await self.store.delete(key)
            return None

    async def peek(self, key: str) -> encoder_pb2.EncodeHeader | None:
        """The entry's header without its payload (for a request whose LLM likely holds the tokens
        already); None when there is no usable header or the length is wrong. The payload's
        checksum is checked when it is read."""
        peeked = await self.store.get_prefix(key, PEEK_BYTES)
        if not peeked or not peeked[0]:
            return None
        blob, total = peeked
        try:
            header, start = EncodedVideo.parse_header(blob)
        except ValueError:
            return None  # damaged, or a header longer than the peek: the full read decides
        if total != start + header.tensor.num_bytes:
            return None  # truncated or padded: the full read deletes it and the video is encoded again
        return header

    async def put(self, key: str, video: EncodedVideo) -> bool:
        if len(video.payload) > self.max_entry_bytes:
            log.info("not caching %s: %d bytes exceed the entry cap of %d", key, len(video.payload), self.max_entry_bytes)
            self.skipped()
            return False
        return await self.store.set(key, video.to_bytes(), self.ttl_s)

    def put_when_verified(self, key: str, encoded: asyncio.Future) -> asyncio.Task:
        """Store the tokens in the background once `encoded` (-> EncodedVideo) completes, i.e. the
        tensor arrived whole and verified; a failed encode is never cached. Returns the write."""

        async def store():
            try:
                video = await encoded
            except BaseException:  # noqa: BLE001 - a failed encode is never cached
                return
            await self.put(key, video)

        task = asyncio.create_task(store())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    @property
    def writes_pending(self) -> int:
        return len(self._writes)

    async def close(self) -> None:
        """Wait for the writes in progress."""
        for task in list(self._writes):
            await asyncio.gather(task, return_exceptions=True)


class SingleFlight:
    """Runs one producer per key at a time; concurrent callers for the same key share its result."""

    def __init__(self):
        self._inflight: dict[str, asyncio.Future] = {}

    def leader_or_wait(self, key: str) -> asyncio.Future | None:
        """None if the caller is now the leader for key; otherwise the future to await."""
        future = self._inflight.get(key)
        if future is not None:
            return future
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def finish_with(self, key: str, done: asyncio.Future) -> None:
        """Hand the followers the leader's result (-> EncodedVideo) once it is known."""
        done.add_done_callback(
            lambda done: self.finish(key, result=None if done.exception() else done.result(), error=done.exception())
        )

    def finish(self, key: str, result: EncodedVideo | None = None, error: BaseException | None = None) -> None:
        future = self._inflight.pop(key, None)
        if future is None or future.done():
            return
        if error is not None:
            future.set_exception(error)
            future.exception()  # mark retrieved: followers may be gone
        else:
            future.set_result(result)

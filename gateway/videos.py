"""Where a request's video comes from: an inline data URL, the id of an uploaded video, or (when
enabled) an http(s) URL the gateway fetches (fetch.py).

Uploaded videos are kept in Redis under their content hash (so every gateway replica sees them)
and in a small in-process LRU, so that uploads keep working while Redis is down. A question by id
needs only the hash, which is in the id: the bytes are read (and checked against the id) only when
the encoder needs them, on a cache miss. So a hit by id costs the same whatever the video's size,
and is answered while the tokens are cached even if the upload itself has expired.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import io
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import pybase64

from gateway.cache import RedisStore
from gateway.errors import APIError, bad_request
from gateway.fetch import FetchPolicy, fetch_video

log = logging.getLogger(__name__)

VIDEO_ID = re.compile(r"^video-[0-9a-f]{64}$")
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


@dataclass(frozen=True)
class Video:
    """A request's video: its sha256, all that the cache key needs, and its bytes, at hand or read
    from the uploads when an encode needs them (read())."""

    sha256: str
    data: bytes | None = None  # None: an uploaded video, read on a cache miss only
    uploads: UploadStore | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, data: bytes) -> Video:
        return cls(hashlib.sha256(data).hexdigest(), data)

    @classmethod
    def uploaded(cls, video_id: str, uploads: UploadStore) -> Video:
        return cls(video_id.removeprefix("video-"), uploads=uploads)

    @property
    def id(self) -> str:
        return f"video-{self.sha256}"

    async def read(self) -> bytes:
        """The bytes to encode; an uploaded video's raise 404 when it is gone or damaged."""
        if self.data is not None:
            return self.data
        return await self.uploads.read(self.id)


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the video is {size} bytes; the limit is {limit} bytes", code="video_too_large")


def decode_data_url(url: str, max_bytes: int, payload: memoryview | None = None) -> Video:
    """payload: the base64 text when the body parser left it in the request's bytes (`url` then ends
    with ";base64,")."""
    match = DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise bad_request("malformed data URL: expected data:video/<type>;base64,<data>", "messages")
    mime = (match.group("mime") or "").lower()
    if not (mime.startswith("video/") or mime == "application/octet-stream"):
        raise bad_request(f"the data URL's media type must be video/*, got {mime or 'none'!r}", "messages")
    encoded = url[match.end() :] if payload is None else payload
    if len(encoded) * 3 // 4 > max_bytes + 3:
        raise too_large(len(encoded) * 3 // 4, max_bytes)
    try:
        # pybase64: SIMD, 10-20x the stdlib, and it reads the body's memoryview without a copy
        data = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"malformed data URL: the base64 payload is invalid ({err})", "messages") from err
    if not data:
        raise bad_request("the video in the data URL is empty", "messages")
    return Video.of(data)


def probe_video(data: bytes) -> None:
    """Cheap check that bytes are a video: a container with a video stream whose first frame decodes."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise bad_request("the file has no video stream", "file")
            first = next(container.decode(video=0), None)
            if first is None or first.width == 0 or first.height == 0:
                raise bad_request("the file has no decodable video frame", "file")
    except (av.FFmpegError, ValueError) as err:
        raise bad_request(f"the file is not a readable video: {err}", "file") from err


class UploadStore:
    def __init__(self, store: RedisStore, ttl_s: int, memory_bytes: int = 512 << 20):
        self.store = store
        self.ttl_s = ttl_s
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_used = 0

    @staticmethod
    def _key(video_id: str) -> str:
        return f"videollm:v1:video:{video_id}"

    async def put(self, video: Video) -> None:
        await self.store.set(self._key(video.id), video.data, self.ttl_s)
        self._remember(video.id, video.data)

    def _remember(self, video_id: str, data: bytes) -> None:
        if video_id in self._memory or len(data) > self.memory_bytes:
            return
        self._memory[video_id] = data
        self._memory_used += len(data)
        while self._memory_used > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_used -= len(dropped)

    async def read(self, video_id: str) -> bytes:
        """An uploaded video's bytes, for an encode. 404 when it expired; a copy in Redis whose hash is
        not the id's is deleted and refused the same way, so its tokens never reach the cache."""
        data = self._memory.get(video_id)
        if data is not None:  # the very bytes hashed at upload, never out of this process: no check
            self._memory.move_to_end(video_id)
            return data
        data = await self.store.get(self._key(video_id))
        if data is None:
            raise APIError(404, f"no uploaded video with id {video_id!r} (it may have expired); upload it again",
                           "not_found_error", param="messages", code="video_not_found")
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if f"video-{digest}" != video_id:
            log.warning("deleting the damaged upload %s: its bytes hash to %s", video_id, digest)
            await self.store.delete(self._key(video_id))
            raise APIError(404, f"the stored copy of the video {video_id!r} was damaged and has been deleted; "
                                "upload it again", "not_found_error", param="messages", code="video_not_found")
        return data


@dataclass
class VideoSources:
    """Resolves a request's video_url to a Video."""

    uploads: UploadStore
    fetch_policy: FetchPolicy
    max_bytes: int

    async def resolve(self, url: str, payload: memoryview | None = None) -> Video:
        """payload: an inline data URL's base64 text, when the body parser left it out of `url`."""
        if url.startswith("data:"):
            return await asyncio.to_thread(decode_data_url, url, self.max_bytes, payload)
        if VIDEO_ID.match(url):  # nothing read yet: a hit needs only the hash
            return Video.uploaded(url, self.uploads)
        if url.startswith(("http://", "https://")):
            return Video.of(await fetch_video(url, self.fetch_policy))
        raise bad_request("video_url.url must be a data:video/...;base64, URL or a video id from /v1/videos",
                          "messages")

"""Where a request's video comes from: an inline data URL, the id of an uploaded video, or (when
enabled) an http(s) URL the gateway fetches (fetch.py) or a file:// URL it reads (local_files.py);
or its frames, sent as images (data: or file:// URLs), taken together as one video.

Inline and fetched videos are held in memory, so they are bounded by `max_inline_bytes`; a larger
video is uploaded (POST /v1/videos, streamed to the video store on disk, video_store.py) and asked
about by id. A question by id needs only the hash, which is in the id: the stored file is opened
(and its bytes checked against the id) only when the encoder needs them, on a cache miss. So a hit
by id costs the same whatever the video's size, and is answered while the tokens are cached even if
the upload itself has expired.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pybase64

from gateway.errors import APIError, bad_request
from gateway.fetch import FetchPolicy, fetch_video
from gateway.local_files import LocalFiles
from gateway.video_store import StoredVideo, VideoStore

VIDEO_ID = re.compile(r"^video-[0-9a-f]{64}$")
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.ASCII)


@dataclass(frozen=True)
class Video:
    """A request's video: its sha256, all that the cache key needs, and its bytes, in memory or in
    the video store, opened when an encode needs them (open())."""

    sha256: str
    data: bytes | None = None  # None: an uploaded video, opened on a cache miss only
    store: VideoStore | None = field(default=None, repr=False, compare=False)
    image_sizes: tuple[int, ...] = ()  # frames sent as images: `data` is these images back to back

    @classmethod
    def of(cls, data: bytes) -> Video:
        return cls(hashlib.sha256(data).hexdigest(), data)

    @classmethod
    def of_images(cls, images: list[bytes]) -> Video:
        """Frames as images, one video: hashed with their sizes and a prefix of their own, so that
        neither another split of the same bytes nor a video file of those bytes shares its tokens."""
        sizes = tuple(len(image) for image in images)
        data = b"".join(images)
        digest = hashlib.sha256(f"videollm frames as images {','.join(map(str, sizes))}\n".encode())
        digest.update(data)
        return cls(digest.hexdigest(), data, image_sizes=sizes)

    @classmethod
    def uploaded(cls, video_id: str, store: VideoStore) -> Video:
        return cls(video_id.removeprefix("video-"), store=store)

    @property
    def id(self) -> str:
        return f"video-{self.sha256}"

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[bytes | StoredVideo]:
        """What to encode: the bytes, or an upload's stored file, open for the block (404 when it is
        gone). A stored file's bytes are checked against the id as they are read."""
        if self.data is not None:
            yield self.data
            return
        stored = await self.store.open(self.id)
        try:
            yield stored
        finally:
            stored.close()


def too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the video is {size} bytes; the limit for a video sent inline is {limit} bytes: upload "
                         "larger videos with POST /v1/videos and ask about them by the id it returns",
                    code="video_too_large")


def decode_data_url(url: str, max_bytes: int, payload: memoryview | None = None, kind: str = "video") -> bytes:
    """The bytes of a data:<kind>/...;base64, URL (kind "video" or "image"). payload: the base64 text
    when the body parser left it in the request's bytes (`url` then ends with ";base64,")."""
    match = DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise bad_request(f"malformed data URL: expected data:{kind}/<type>;base64,<data>", "messages")
    mime = (match.group("mime") or "").lower()
    if not (mime.startswith(f"{kind}/") or mime == "application/octet-stream"):
        raise bad_request(f"the data URL's media type must be {kind}/*, got {mime or 'none'!r}", "messages")
    encoded = url[match.end() :] if payload is None else payload
    if len(encoded) * 3 // 4 > max_bytes + 3:
        raise too_large(len(encoded) * 3 // 4, max_bytes)
    try:
        # pybase64: SIMD, 10-20x the stdlib, and it reads the body's memoryview without a copy
        data = pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"malformed data URL: the base64 payload is invalid ({err})", "messages") from err
    if not data:
        raise bad_request(f"the {kind} in the data URL is empty", "messages")
    return data


def probe_video(path: Path) -> None:
    """Cheap check that a file is a video: a container with a video stream whose first frame decodes.
    FFmpeg reads the file as it needs it (the header and the first frame's packets), not all of it."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise bad_request("the file has no video stream", "file")
            first = next(container.decode(video=0), None)
            if first is None or first.width == 0 or first.height == 0:
                raise bad_request("the file has no decodable video frame", "file")
    except (av.FFmpegError, ValueError) as err:
        raise bad_request(f"the file is not a readable video: {err}", "file") from err


@dataclass
class VideoSources:
    """Resolves a request's video_url to a Video."""

    store: VideoStore
    fetch_policy: FetchPolicy
    local_files: LocalFiles
    max_inline_bytes: int

    async def resolve(self, url: str, payload: memoryview | None = None) -> Video:
        """payload: an inline data URL's base64 text, when the body parser left it out of `url`."""
        if url.startswith("data:"):
            return Video.of(await asyncio.to_thread(decode_data_url, url, self.max_inline_bytes, payload))
        if VIDEO_ID.fullmatch(url):  # nothing read yet: a hit needs only the hash
            return Video.uploaded(url, self.store)
        if url.startswith(("http://", "https://")):
            return Video.of(await fetch_video(url, self.fetch_policy))
        if url.startswith("file:"):
            return Video.of(await asyncio.to_thread(self.local_files.read, url))
        raise bad_request("video_url.url must be a data:video/...;base64, URL, a video id from /v1/videos, or a "
                          "file:// URL under the server's local_video_roots", "messages")

    async def resolve_images(self, urls: list[str]) -> Video:
        """Frames sent as images (data:image/... or file:// URLs), in order, as one video; together
        they are held to the inline limit."""
        def read_all() -> list[bytes]:
            images, total = [], 0
            for url in urls:
                if url.startswith("data:"):
                    image = decode_data_url(url, self.max_inline_bytes, kind="image")
                elif url.startswith("file:"):
                    image = self.local_files.read(url)
                else:
                    raise bad_request("image_url.url must be a data:image/...;base64, URL or a file:// URL under "
                                      "the server's local_video_roots", "messages")
                total += len(image)
                if total > self.max_inline_bytes:
                    raise APIError(413, f"the images are over {self.max_inline_bytes} bytes together, the limit "
                                        "for frames sent as images: send fewer or smaller frames, or the video",
                                   code="video_too_large")
                images.append(image)
            return images

        return Video.of_images(await asyncio.to_thread(read_all))

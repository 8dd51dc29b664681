"""POST /v1/videos: the multipart body streamed into the video store, never held in memory.

FastAPI's UploadFile would not do for videos of a gigabyte: Starlette's form parser spools a file
part to a temporary file of its own with no limit on its size (its `max_part_size` bounds only the
parts that are not files), and the route would then copy that file into the store and hash it in
another pass. Here the body goes through python-multipart's streaming parser as it arrives: the
bytes of the `file` part go to a partial file in the store, hashed on the way (video_store.py), and
the upload is refused with 413 the moment it passes `max_upload_bytes`, its partial file deleted.
Other parts are read past and dropped. The body as a whole is bounded before it gets here
(limits.py: `max_upload_bytes` plus room for the multipart envelope).

Once the file is whole it is checked to be a video (its container opened and its first frame
decoded, from the file: FFmpeg reads what it needs) and only then renamed to its id.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import ClientDisconnect
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import APIError, bad_request
from gateway.video_store import VideoStore
from gateway.videos import probe_video

FIELD = "file"

# The route reads its body itself, so FastAPI cannot derive its schema: this is what /openapi.json shows.
OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "string", "format": "binary", "description": "the video file"}}}}}}}


@dataclass(frozen=True)
class StoredUpload:
    sha256: str
    size: int
    filename: str | None

    @property
    def id(self) -> str:
        return f"video-{self.sha256}"


def upload_too_large(limit: int) -> APIError:
    return APIError(413, f"the uploaded video is over the limit of {limit} bytes", code="video_too_large",
                    param=FIELD)


class _FilePart:
    """python-multipart's callbacks: the `file` part's bytes queued for the store, the rest dropped."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.queued: list[memoryview | bytes] = []  # for the store, written once parser.write returns
        self.size = 0
        self.filename: str | None = None
        self.seen = self.ended = self.finished = False
        self._in_file = False
        self._header = b""
        self._value = b""
        self._disposition = b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._part_end, "on_end": self._end}

    def _begin(self) -> None:
        self._in_file, self._disposition = False, b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header = self._value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != FIELD.encode():
            return
        if self.seen:
            raise bad_request(f"send one video per upload (one `{FIELD}` field)", FIELD)
        self.seen = self._in_file = True
        filename = options.get(b"filename")
        self.filename = filename.decode("utf-8", "replace") if filename is not None else None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise upload_too_large(self.max_bytes)
        # a view of the received chunk (immutable); a copy of the parser's own look-behind buffer
        self.queued.append(memoryview(data)[start:end] if isinstance(data, bytes) else bytes(data[start:end]))

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self.ended = False, True

    def _end(self) -> None:
        self.finished = True


async def store_upload(request: Request, store: VideoStore, max_bytes: int) -> StoredUpload:
    """Stream the request's `file` part into the store; the stored video, or 400/413 with nothing stored."""
    mime, params = parse_options_header(request.headers.get("content-type"))
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise bad_request(f"send the video as multipart/form-data, in the field `{FIELD}`", FIELD)
    part = _FilePart(max_bytes)
    writer = store.writer()
    try:
        try:
            parser = MultipartParser(params[b"boundary"], part.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
                for piece in part.queued:
                    await writer.write(piece)
                part.queued.clear()
            parser.finalize()
        except FormParserError as err:
            raise bad_request(f"the multipart body is malformed ({err})", FIELD) from err
        except ClientDisconnect as err:  # nobody to answer; not a server error either
            raise APIError(499, "the client went away during the upload", "cancelled", code="cancelled") from err
        if not part.seen:
            raise bad_request(f"the upload has no `{FIELD}` field: send the video as the form field `{FIELD}`", FIELD)
        if not (part.ended and part.finished):
            raise bad_request("the multipart body ended before its closing boundary", FIELD)
        if part.size == 0:
            raise bad_request("the uploaded file is empty", FIELD)
        sha256 = await writer.finish()
        await asyncio.to_thread(probe_video, writer.partial)
        upload = StoredUpload(sha256, part.size, part.filename)
        await writer.commit(upload.id)
        return upload
    except BaseException:  # refused, malformed, over the limit, or the client went away: nothing stays
        writer.abort()
        raise


"""The video of an Encode call, as bytes or a mapped file, whichever way it came (see EncodeInput in
protos/videollm/v1/encoder.proto):

- a stored upload: the gateway names the video's id and the encoder maps `<video_store_dir>/<id>`,
  when it sees the gateway's store (same host, or the same volume): nothing travels;
- a file in shared memory under a one-time ticket (videollm/pull_files.py);
- the bytes in the request itself (a small video);
- the bytes in chunks after the request. The announced size is checked against max_video_bytes
  before any chunk is read, and the chunks are written to an unlinked temporary file (in $TMPDIR)
  that is then mapped: the kernel may page a 2 GiB video out under memory pressure, which it could
  not do with a buffer in this process.

Refusals are InputError with the gRPC status to answer. FAILED_PRECONDITION means "this encoder
cannot take the video this way, send its bytes": the caller falls back to chunks.
"""

from __future__ import annotations

import mmap
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from protos.videollm.v1 import encoder_pb2
from videollm import pull_files

STORED_VIDEO_ID = re.compile(r"video-[0-9a-f]{64}")


class InputError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class ReceivedVideo:
    data: bytes | mmap.mmap | bytearray
    taken: bool  # mapped from a file that a sender on this host left (shared memory, the video store)


class VideoInputs:
    def __init__(self, max_video_bytes: int, shm_dir: Path | None, store_dir: Path | None):
        self.max_video_bytes = max_video_bytes
        self.shm_dir = shm_dir
        self.store_dir = store_dir

    def receive(self, first: encoder_pb2.EncodeInput, rest: Iterator) -> ReceivedVideo:
        """The video of the call whose first message is `first`; `rest` yields the messages after it."""
        request = first.request
        if first.stored_video:
            return ReceivedVideo(self._stored(first.stored_video, request.video_size), taken=True)
        if request.video_ticket:
            return ReceivedVideo(self._in_shared_memory(request.video_ticket, request.video_size), taken=True)
        if request.video or not request.video_size:
            return ReceivedVideo(request.video, taken=False)  # the engine refuses an empty one
        return ReceivedVideo(self._chunks(request.video_size, rest), taken=False)

    def _check_size(self, size: int) -> None:
        if size > self.max_video_bytes:
            raise InputError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"the video is {size} bytes; the limit is {self.max_video_bytes} bytes")

    def _stored(self, video_id: str, size: int) -> mmap.mmap:
        if not STORED_VIDEO_ID.fullmatch(video_id):
            raise InputError(grpc.StatusCode.INVALID_ARGUMENT, "stored_video must be a video id, video-<sha256>")
        self._check_size(size)
        if self.store_dir is None:
            raise InputError(grpc.StatusCode.FAILED_PRECONDITION,
                             "this encoder has no video store (video_store_dir is off); send the video's bytes")
        try:
            with open(self.store_dir / video_id, "rb", buffering=0) as file:
                if os.fstat(file.fileno()).st_size != size or size == 0:
                    raise FileNotFoundError  # another store's file, or one being replaced: not the caller's
                # read-only: the store's file is the gateway's, and a mapping never copies it
                return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
        except (FileNotFoundError, NotADirectoryError):
            raise InputError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"no stored video {video_id} of {size} bytes in this encoder's video_store_dir "
                             f"({self.store_dir}): it does not share the gateway's store; send the video's "
                             "bytes") from None

    def _in_shared_memory(self, ticket: str, size: int) -> mmap.mmap | bytearray:
        self._check_size(size)
        try:
            video = pull_files.take(self.shm_dir, ticket, size, pull_files.VIDEO_PREFIX) if self.shm_dir else None
        except pull_files.PullFileError as err:
            raise InputError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        if video is None:
            raise InputError(grpc.StatusCode.FAILED_PRECONDITION,
                             "no video file under this ticket in this encoder's shared memory (another host, or "
                             "pull_shm_dir is off); send the video's bytes instead")
        return video

    def _chunks(self, size: int, rest: Iterator) -> mmap.mmap:
        self._check_size(size)  # before a single chunk is read
        with tempfile.TemporaryFile(prefix="videollm-encode-", buffering=0) as file:
            received = 0
            try:
                for message in rest:
                    data = message if isinstance(message, memoryview) else _chunk_of(message)
                    received += len(data)
                    if received > size:
                        raise InputError(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"more video bytes arrived than the {size} announced in video_size")
                    file.write(data)
            except grpc.RpcError as err:  # the caller cancelled (or went away) while sending
                raise InputError(grpc.StatusCode.CANCELLED, "the caller ended the call while sending the video") \
                    from err
            if received < size:
                raise InputError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the call ended after {received} of the {size} video bytes announced")
            # the mapping outlives the file object (and the file, unlinked since its creation)
            return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)


def _chunk_of(message: encoder_pb2.EncodeInput) -> bytes:
    if message.WhichOneof("item") != "video_chunk":
        raise InputError(grpc.StatusCode.INVALID_ARGUMENT,
                         "an Encode call has one request, first; only video chunks may follow it")
    return message.video_chunk.data

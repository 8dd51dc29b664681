"""How a miss's video reaches an encoder, never as one gRPC message of the whole video.

Encode takes a stream (EncodeInput): the request first, then the video's bytes in chunks when they
travel. Per replica, the cheapest way it takes:

1. An uploaded video, to an encoder that sees the gateway's video store (same host, or the same
   volume): only its id; the encoder maps the file. Meanwhile the gateway reads the file once to
   check it against its id, and a damaged file is answered 404 (and deleted) before its tokens are
   used.
2. A video in memory (inline or fetched), to an encoder on this host: a file in shared memory
   (video_handoff.py).
3. Otherwise the bytes, in chunks of transport.VIDEO_CHUNK_BYTES; an upload's are read from its
   file as they go and hashed on the way. That check ends before the call's request stream does,
   and the encoder starts only once the stream has ended, so it never encodes a damaged file.

An encoder that answers FAILED_PRECONDITION to 1 or 2 (another host, or that way is off there)
gets the chunks, then and from then on: each replica's answer is remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from gateway.backends import Replica
from gateway.errors import APIError
from gateway.video_handoff import VideoHandoff
from gateway.video_store import StoredVideo
from protos.videollm.v1 import encoder_pb2
from videollm import transport


class EncodeCalls:
    def __init__(self, handoff: VideoHandoff | None):
        self.handoff = handoff

    async def start(self, replica: Replica, request: encoder_pb2.EncodeRequest, video: bytes | StoredVideo,
                    timeout_s: float):
        """Encode `video` on one replica: (call, its first response)."""
        if isinstance(video, StoredVideo):
            if replica.shares_video_store is not False:
                answered = await self._by_store(replica, request, video, timeout_s)
                if answered is not None:
                    return answered
            return await self._by_chunks(replica, request, video.size, video.pieces(transport.VIDEO_CHUNK_BYTES),
                                         timeout_s)
        if self.handoff is not None and replica.takes_video_files is not False:
            answered = await self._by_shared_memory(replica, request, video, timeout_s)
            if answered is not None:
                return answered
        return await self._by_chunks(replica, request, len(video), _pieces(video), timeout_s)

    async def _by_store(self, replica: Replica, request: encoder_pb2.EncodeRequest, video: StoredVideo,
                        timeout_s: float):
        """The encoder maps the stored file; None when it does not see our store."""
        first = encoder_pb2.EncodeInput(request=_with(request, video_size=video.size), stored_video=video.video_id)
        checking = asyncio.ensure_future(video.verify())
        try:
            call, response = await _single(replica, first, timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                _drop(checking)  # the chunks are checked as they are read
                replica.shares_video_store = False  # learnt once: it does not see our store
                return None
            await checking  # a damaged file explains a failed encode better (404) than the encoder's error
            raise
        except BaseException:
            _drop(checking)
            raise
        replica.shares_video_store = True
        try:
            await checking
        except BaseException:
            call.cancel()  # a damaged file's tokens are never read
            raise
        return call, response

    async def _by_shared_memory(self, replica: Replica, request: encoder_pb2.EncodeRequest, video: bytes,
                                timeout_s: float):
        """The encoder takes the video's file from shared memory; None when it cannot."""
        ticket = await self.handoff.leave(video)
        if ticket is None:
            return None
        try:
            first = encoder_pb2.EncodeInput(request=_with(request, video_ticket=ticket, video_size=len(video)))
            answered = await _single(replica, first, timeout_s)
            replica.takes_video_files = True
            return answered
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            replica.takes_video_files = False  # learnt once: it does not share our shared memory
            return None
        finally:
            self.handoff.discard(ticket)

    async def _by_chunks(self, replica: Replica, request: encoder_pb2.EncodeRequest, size: int,
                         pieces: AsyncIterator[bytes | memoryview], timeout_s: float):
        """The request with the video's size, then its bytes in chunks (written pre-serialized)."""
        call = replica.stub.Encode(timeout=timeout_s)
        try:
            async with contextlib.aclosing(pieces):
                await _write(call, encoder_pb2.EncodeInput(request=_with(request, video_size=size)))
                async for piece in pieces:  # a stored file's check raises after its last piece
                    await _write(call, transport.chunk_message(piece, transport.VIDEO_CHUNK_FIELD))
            await call.done_writing()
            return call, await call.read()
        except BaseException:
            call.cancel()
            raise


async def _single(replica: Replica, first: encoder_pb2.EncodeInput, timeout_s: float):
    """An Encode call of one message (the video by file): (call, its first response)."""
    call = replica.stub.Encode(timeout=timeout_s)
    try:
        await _write(call, first)
        await call.done_writing()
        return call, await call.read()
    except BaseException:
        call.cancel()
        raise


async def _write(call, message) -> None:
    try:
        await call.write(message)
    except asyncio.InvalidStateError:  # the encoder ended the call already (a refusal): its status says why
        await call.read()  # raises the call's AioRpcError
        raise APIError(502, "the encoder ended the Encode call before taking the whole video", "api_error",
                       code="backend_error") from None


async def _pieces(video: bytes) -> AsyncIterator[memoryview]:
    for piece in transport.pieces(memoryview(video), transport.VIDEO_CHUNK_BYTES):
        yield piece


def _with(request: encoder_pb2.EncodeRequest, **video) -> encoder_pb2.EncodeRequest:
    message = encoder_pb2.EncodeRequest(**video)
    message.MergeFrom(request)
    return message


def _drop(task: asyncio.Future) -> None:
    """Cancel a check whose answer is no longer wanted, without a 'never retrieved' warning later."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())

"""How a request's visual tokens travel through the gateway to the LLM.

On a cache miss the encoder's token chunks are relayed to the LLM as they arrive, without being
decoded, while the same bytes are collected (for Redis and for concurrent identical requests) and
verified against the header's length and CRC-32 (EncodeRelay). A hit replays the tokens from
memory, or reads them only if the LLM asks (VisualSource). The Generate call's request stream is
the setup followed by the chunks (GenerateRequests).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from gateway.cache import EncodedVideo
from gateway.errors import APIError, from_grpc
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm import transport


class EncodeRelay:
    """Reads one Encode stream to the end, handing chunks on and collecting them.

    With `hold`, reading waits for release(): while an LLM pulls the same tokens from the encoder,
    the gateway's copy (for the cache) does not compete with it."""

    def __init__(self, call, header: encoder_pb2.EncodeHeader, hold: bool = False):
        self.header = header
        self._call = call
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.done: asyncio.Future[EncodedVideo] = asyncio.get_running_loop().create_future()
        self._released = asyncio.Event()
        if not hold:
            self._released.set()
        self._task = asyncio.create_task(self._pump())

    def release(self) -> None:
        self._released.set()

    async def _pump(self) -> None:
        parts, crc, size = [], 0, 0
        try:
            await self._released.wait()
            # read() rather than `async for`: the header was already taken with read()
            while (response := await self._call.read()) is not grpc.aio.EOF:
                data = response.chunk.data
                parts.append(data)
                crc = zlib.crc32(data, crc)
                size += len(data)
                self._queue.put_nowait(data)
            expected = self.header.tensor
            if size != expected.num_bytes or crc != expected.crc32:
                raise APIError(502, "the encoder's token stream arrived damaged", "api_error", code="backend_error")
            self.done.set_result(EncodedVideo(self.header, b"".join(parts)))
        except grpc.aio.AioRpcError as err:
            self.done.set_exception(from_grpc(err, "encoder"))
        except BaseException as err:  # noqa: BLE001 - handed to whoever awaits the result
            self.done.set_exception(err)
        finally:
            self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        while (data := await self._queue.get()) is not None:
            yield data


async def _memory_chunks(payload: bytes | memoryview) -> AsyncIterator[memoryview]:
    for piece in transport.pieces(memoryview(payload)):
        yield piece


@dataclass
class VisualSource:
    """Where one request's visual tokens come from, and the complete tensor once it is known."""

    key: str
    header: encoder_pb2.EncodeHeader
    chunks: AsyncIterator[bytes] | None  # for the first LLM attempt (None: replay() reads them lazily)
    encoded: asyncio.Future  # -> EncodedVideo; retries replay from it
    relay: EncodeRelay | None = None  # set on a cache miss that this request encodes
    fetch: Callable[[], Awaitable[EncodedVideo]] | None = None  # reads the tokens when first needed
    pull: llm_pb2.VisualPull | None = None  # where an LLM can take the tokens straight from the encoder
    lease: object | None = None  # shared_flight.Lease of a miss this gateway encodes, until handed on

    def __post_init__(self):
        if self.chunks is None:
            self.chunks = self.replay()

    @classmethod
    def in_memory(cls, key: str, encoded: EncodedVideo) -> VisualSource:
        done = asyncio.get_running_loop().create_future()
        done.set_result(encoded)
        return cls(key, encoded.header, _memory_chunks(encoded.payload), done)

    @classmethod
    def deferred(cls, key: str, header: encoder_pb2.EncodeHeader,
                 fetch: Callable[[], Awaitable[EncodedVideo]]) -> VisualSource:
        """Tokens that are read only if an LLM asks for them."""
        return cls(key, header, None, asyncio.get_running_loop().create_future(), fetch=fetch)

    @classmethod
    def relayed(cls, key: str, call, header: encoder_pb2.EncodeHeader, encoder_address: str) -> VisualSource:
        """The tokens of an Encode call this request made; an LLM may pull them itself when the header
        names a ticket (the gateway then reads its copy only once released)."""
        pull = llm_pb2.VisualPull(address=encoder_address, ticket=header.pull_ticket) if header.pull_ticket else None
        relay = EncodeRelay(call, header, hold=pull is not None)
        return cls(key, header, relay.chunks(), relay.done, relay, pull=pull)

    async def replay(self) -> AsyncIterator[bytes]:
        if self.fetch is not None and not self.encoded.done():
            fetch, self.fetch = self.fetch, None
            try:
                self.encoded.set_result(await fetch())
            except BaseException as err:
                self.encoded.set_exception(err)
                raise
        async for data in _memory_chunks((await self.encoded).payload):
            yield data

    def release(self) -> None:
        """Let the gateway's copy of a miss's tokens be read (for the cache, for followers)."""
        if self.relay is not None:
            self.relay.release()

    def failed(self) -> BaseException | None:
        """The encoder's error when the tokens' stream broke off."""
        return self.encoded.exception() if self.encoded.done() else None


def generate_setup(request, source: VisualSource | None) -> llm_pb2.GenerateSetup:
    """The first message of a Generate call: the prompt, the sampling, and the visual tokens' header."""
    setup = llm_pb2.GenerateSetup(messages=request.messages, sampling=request.sampling, inner=request.inner)
    if source is not None:
        setup.visual.CopyFrom(source.header.tensor)
        setup.uncompressed_visual_tokens = source.header.uncompressed_tokens
        if request.inner is None:  # Stage III never shares a prefix
            setup.video_key = source.key
        if source.pull is not None:
            setup.pull.CopyFrom(source.pull)
    return setup


class GenerateRequests:
    """The request stream of one Generate call: the setup, then the visual tokens, at once or, with
    `ask_first`, once the LLM has said it needs them (it may hold the video's prefix or pull the
    tokens itself; the answer costs one round trip)."""

    def __init__(self, setup: llm_pb2.GenerateSetup, chunks: AsyncIterator[bytes] | None, ask_first: bool):
        self._setup = setup
        self._chunks = chunks
        self._need_visual = asyncio.get_running_loop().create_future() if ask_first else None

    def need_visual(self, needed: bool) -> None:
        """The LLM's answer (GenerateAccepted.need_visual)."""
        if self._need_visual is not None:
            self._need_visual.set_result(needed)

    def __aiter__(self):
        return self._messages()

    async def _messages(self):
        yield llm_pb2.GenerateRequest(setup=self._setup)
        if self._chunks is not None and (self._need_visual is None or await self._need_visual):
            async for data in self._chunks:
                yield transport.chunk_message(data, transport.VISUAL_CHUNK_FIELD)  # serialized directly: one copy

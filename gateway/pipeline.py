"""One chat completion through the stack: cache or encoder -> LLM, as a stream of events.

On a cache miss the encoder's token chunks are relayed to the LLM as they arrive, without being
decoded, while the same bytes are collected for Redis. The entry is written only once the tensor
is verified (length and CRC-32) and the LLM has accepted the request, so a failed request never
leaves anything in the cache. Concurrent identical misses encode once (SingleFlight).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from pydantic import ValidationError

from gateway.backends import ReplicaPool
from gateway.cache import EncodedVideo, SingleFlight, TokenCache, cache_key
from gateway.errors import APIError, bad_request, from_grpc
from gateway.videos import Video
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.proto_mapping import (
    compression_from_proto,
    compression_to_proto,
    describe_validation_error,
    error_path,
)
from videollm.settings import CompressionSettings, GatewaySettings, frames_to_sample
from videollm import wire
from videollm.wire import CHUNK_BYTES

VISUAL_CHUNK_FIELD = llm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["visual_chunk"].number

log = logging.getLogger(__name__)

PREFIX_HOLDERS_KEPT = 100_000  # video -> LLM replica entries for prefix-aware routing


@dataclass
class VideoRequest:
    video: Video
    num_frames: int | None
    compression: dict  # overrides of the encoder's default compression settings


@dataclass
class ChatRequest:
    messages: list[llm_pb2.ChatMessage]
    sampling: llm_pb2.SamplingParams
    video: VideoRequest | None
    inner: llm_pb2.InnerCompression | None = None  # EarlyTom Stage III in the LLM
    received_at: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # time.monotonic() by which the whole request must be done

    def remaining_s(self) -> float:
        """What is left of the request's deadline: the gRPC deadline of the next downstream call."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise APIError(504, "the request ran out of time", "timeout", code="deadline_exceeded")
        return left


@dataclass
class Outcome:
    """What the response's `videollm` object reports."""

    cache: str | None = None  # "hit" | "miss" | None without a video
    header: encoder_pb2.EncodeHeader | None = None
    final: llm_pb2.GenerateFinal | None = None
    first_token_at: float | None = None
    # time.perf_counter() marks of the gateway's own hops (None when the hop did not happen)
    encode_called_at: float | None = None  # Encode call made (a miss)
    encode_header_at: float | None = None  # its header arrived: the tokens exist
    llm_called_at: float | None = None  # Generate call made on the replica that answered


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
    view = memoryview(payload)
    for start in range(0, len(view), CHUNK_BYTES):
        yield view[start : start + CHUNK_BYTES]


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


async def _generate_requests(setup: llm_pb2.GenerateSetup, chunks: AsyncIterator[bytes] | None,
                             need_visual: asyncio.Future | None):
    """The setup, then the visual tokens: at once, or once the LLM has said it lacks the video's
    prefix (`need_visual` is given when it may hold it; the answer costs one round trip)."""
    yield llm_pb2.GenerateRequest(setup=setup)
    if chunks is not None and (need_visual is None or await need_visual):
        async for data in chunks:
            yield wire.chunk_message(data, VISUAL_CHUNK_FIELD)  # serialized directly: one copy


class Pipeline:
    def __init__(self, settings: GatewaySettings, encoders: ReplicaPool, llms: ReplicaPool, cache: TokenCache):
        self.settings = settings
        self.encoders = encoders
        self.llms = llms
        self.cache = cache
        self.single_flight = SingleFlight()
        self._encoder_info: encoder_pb2.EncoderInfo | None = None
        self._background: set[asyncio.Task] = set()
        # which LLM replica last answered about a video: it holds that video's prefix KV cache
        self.prefix_holders: OrderedDict[str, str] = OrderedDict()

    def _remember_holder(self, key: str, address: str) -> None:
        self.prefix_holders[key] = address
        self.prefix_holders.move_to_end(key)
        while len(self.prefix_holders) > PREFIX_HOLDERS_KEPT:
            self.prefix_holders.popitem(last=False)

    # -- encoder side -------------------------------------------------------------------------

    async def encoder_info(self) -> encoder_pb2.EncoderInfo:
        if self._encoder_info is None:
            errors = []
            for replica in self.encoders.replicas:
                try:
                    self._encoder_info = await replica.stub.Info(encoder_pb2.InfoRequest(), timeout=5.0)
                    break
                except grpc.aio.AioRpcError as err:
                    errors.append(f"{replica.address}: {err.code().name}")
            else:
                raise APIError(
                    503, f"no encoder replica is reachable ({'; '.join(errors)})", "service_unavailable",
                    code="backend_unavailable", headers={"Retry-After": "1"},
                )
        return self._encoder_info

    async def resolve(self, request: VideoRequest) -> tuple[int, CompressionSettings]:
        """The request's frame count and compression settings, with the encoder's defaults filled in."""
        info = await self.encoder_info()
        try:
            frames = frames_to_sample(request.num_frames, info.default_frames, info.max_frames)
        except ValueError as err:
            raise bad_request(str(err), "videollm.num_frames") from err
        defaults = compression_from_proto(info.default_compression, CompressionSettings())
        try:
            compression = defaults.overridden(request.compression)
        except ValidationError as err:
            raise bad_request(describe_validation_error(err, "videollm.compression"),
                              error_path(err, "videollm.compression")) from err
        return frames, compression

    async def _open_encode(self, request: VideoRequest, frames: int, compression: CompressionSettings,
                           timeout_s: float, offer_pull: bool = False):
        """Start Encode on some replica and return (call, header, its address); retries another replica
        when one is down. offer_pull: ask the encoder to keep the tokens for the LLM to take."""
        message = encoder_pb2.EncodeRequest(
            video=request.video.data,
            sampling=encoder_pb2.FrameSampling(num_frames=frames),
            compression=compression_to_proto(compression),
            offer_pull=offer_pull,
        )
        tried: set[str] = set()
        while (replica := self.encoders.pick(exclude=tried)) is not None:
            tried.add(replica.address)
            try:
                with self.encoders.use(replica):
                    call = replica.stub.Encode(message, timeout=timeout_s)
                    first = await call.read()
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    log.warning("encoder %s unavailable, trying another replica", replica.address)
                    continue
                raise from_grpc(err, "encoder") from err
            if first is grpc.aio.EOF or first.WhichOneof("item") != "header":
                raise APIError(502, "the encoder sent no header", "api_error", code="backend_error")
            return call, first.header, replica.address
        raise APIError(503, "no encoder replica is available", "service_unavailable",
                       code="backend_unavailable", headers={"Retry-After": "1"})

    async def visual_source(self, request: VideoRequest, outcome: Outcome, timeout_s: float) -> VisualSource:
        """The request's visual tokens, from the cache, a concurrent identical encode, or the encoder."""
        frames, compression = await self.resolve(request)
        info = await self.encoder_info()
        key = cache_key(info.model_id, request.video.sha256, frames, compression.cache_fields())
        if key in self.prefix_holders:  # an LLM likely holds this video's prefix: read the tokens only if asked
            header = await self.cache.peek(key)
            if header is not None:
                outcome.cache = "hit"
                return VisualSource.deferred(
                    key, header,
                    lambda: self._read_or_encode(key, header, request, frames, compression, timeout_s, outcome))
        cached = await self.cache.get(key)
        if cached is not None:
            outcome.cache = "hit"
            return VisualSource.in_memory(key, cached)
        outcome.cache = "miss"
        waiting = self.single_flight.leader_or_wait(key)
        if waiting is not None:  # someone is encoding the same video with the same settings
            return VisualSource.in_memory(key, await asyncio.shield(waiting))
        try:
            outcome.encode_called_at = time.perf_counter()
            call, header, address = await self._open_encode(
                request, frames, compression, timeout_s,
                offer_pull=self.settings.direct_pull and self.settings.grpc_tls_ca is None)
            outcome.encode_header_at = time.perf_counter()
        except BaseException as err:
            self.single_flight.finish(key, error=err)
            raise
        pull = None
        if header.pull_ticket:
            pull = llm_pb2.VisualPull(address=address, ticket=header.pull_ticket)
        relay = EncodeRelay(call, header, hold=pull is not None)
        relay.done.add_done_callback(
            lambda done: self.single_flight.finish(
                key, result=None if done.exception() else done.result(), error=done.exception()
            )
        )
        return VisualSource(key, header, relay.chunks(), relay.done, relay, pull=pull)

    async def _read_or_encode(self, key: str, header: encoder_pb2.EncodeHeader, request: VideoRequest, frames: int,
                              compression: CompressionSettings, timeout_s: float, outcome: Outcome) -> EncodedVideo:
        """The tokens of a deferred hit: from Redis, or encoded again if the entry is gone or damaged."""
        cached = await self.cache.get(key)
        if cached is not None:
            return cached
        outcome.cache = "miss"
        call, fresh, _ = await self._open_encode(request, frames, compression, timeout_s)
        if list(fresh.tensor.shape) != list(header.tensor.shape) or fresh.tensor.dtype != header.tensor.dtype:
            call.cancel()
            raise APIError(503, "the video's cached tokens changed while the request was routed; retry",
                           "service_unavailable", code="cache_entry_changed", headers={"Retry-After": "0"})
        relay = EncodeRelay(call, fresh)
        self._cache_when_verified(key, relay)
        return await relay.done

    def _cache_when_verified(self, key: str, relay: EncodeRelay) -> None:
        async def store():
            try:
                encoded = await relay.done
            except BaseException:  # noqa: BLE001 - a failed encode is never cached
                return
            await self.cache.put(key, encoded)

        task = asyncio.create_task(store())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- LLM side -----------------------------------------------------------------------------

    async def start(self, request: ChatRequest, outcome: Outcome) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Send the request to an LLM and wait for its first response; return the response stream.

        Errors before the first response (bad video, bad prompt, overload) raise APIError here, so
        the HTTP layer can still answer with a proper status code. An unreachable LLM replica is
        retried on another one, replaying the visual tokens from memory.
        """
        source = None
        setup = llm_pb2.GenerateSetup(messages=request.messages, sampling=request.sampling, inner=request.inner)
        if request.video is not None:
            source = await self.visual_source(request.video, outcome, request.remaining_s())
            outcome.header = source.header
            setup.visual.CopyFrom(source.header.tensor)
            setup.uncompressed_visual_tokens = source.header.uncompressed_tokens
            if request.inner is None:  # Stage III never shares a prefix
                setup.video_key = source.key
            if source.pull is not None:
                setup.pull.CopyFrom(source.pull)
        chunks = source.chunks if source is not None else None
        holder = self.prefix_holders.get(source.key) if setup.video_key else None
        try:
            tried: set[str] = set()
            while (replica := self.llms.pick(exclude=tried, prefer=holder)) is not None:
                tried.add(replica.address)
                self.llms.acquire(replica)
                # Wait for the LLM's answer before sending the tokens when it may not need them: it may hold
                # the video's prefix (only the replica that answered about it last can) or pull them itself.
                ask_first = replica.address == holder or setup.HasField("pull")
                need_visual = asyncio.get_running_loop().create_future() if ask_first else None
                outcome.llm_called_at = time.perf_counter()
                call = replica.stub.Generate(_generate_requests(setup, chunks, need_visual),
                                             timeout=request.remaining_s())
                try:
                    first = await call.read()
                    if source is not None and source.relay is not None:
                        source.relay.release()  # the LLM has the tokens or wants them from us: read on
                    if first is not grpc.aio.EOF and first.WhichOneof("item") == "accepted":
                        if need_visual is not None:
                            need_visual.set_result(first.accepted.need_visual)
                        first = await call.read()
                    if first is grpc.aio.EOF:
                        raise APIError(502, "the LLM closed the stream without an answer", "api_error",
                                       code="backend_error")
                except grpc.aio.AioRpcError as err:
                    self.llms.release(replica, err)
                    if source is not None and source.encoded.done() and source.encoded.exception() is not None:
                        raise source.encoded.exception() from err  # the encoder failed mid-stream
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        log.warning("LLM %s unavailable, trying another replica", replica.address)
                        chunks = source.replay() if source is not None else None
                        setup.ClearField("pull")  # the ticket may be spent: send the tokens
                        continue
                    raise from_grpc(err, "LLM") from err
                except BaseException:
                    call.cancel()
                    self.llms.release(replica)
                    raise
                if source is not None and source.relay is not None:
                    self._cache_when_verified(source.key, source.relay)
                if setup.video_key:
                    self._remember_holder(source.key, replica.address)
                return self._responses(call, first, replica, outcome)
            raise APIError(503, "no LLM replica is available", "service_unavailable", code="backend_unavailable",
                           headers={"Retry-After": "1"})
        finally:  # however this ends, the gateway's copy of a miss's tokens is read (for the cache, for followers)
            if source is not None and source.relay is not None:
                source.relay.release()

    async def _responses(self, call, first, replica, outcome: Outcome) -> AsyncIterator[llm_pb2.GenerateResponse]:
        try:
            response = first
            while response is not grpc.aio.EOF:
                if response.WhichOneof("item") == "delta" and outcome.first_token_at is None:
                    outcome.first_token_at = time.perf_counter()
                if response.WhichOneof("item") == "final":
                    outcome.final = response.final
                    if outcome.first_token_at is None:
                        outcome.first_token_at = time.perf_counter()
                yield response
                response = await call.read()
        except grpc.aio.AioRpcError as err:
            raise from_grpc(err, "LLM") from err
        finally:
            call.cancel()  # no-op when finished; stops decoding when the client went away
            self.llms.release(replica)

    async def close(self) -> None:
        for task in list(self._background):
            await asyncio.gather(task, return_exceptions=True)

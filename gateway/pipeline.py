"""One chat completion's walk through the stack, top to bottom: resolve -> cache -> encode -> generate.

1. resolve: the video's frame count and compression settings, the encoder's defaults filled in.
2. the visual tokens: from the cache, from a concurrent identical encode (single flight), or from
   the encoder, relayed to the LLM as they arrive (relay.py).
3. generate: the LLM's first answer, on another replica when one is unreachable (the tokens then
   replayed from memory); then the answer streams on.

The cache entry is written only once the tensor is verified (length and CRC-32) and the LLM has
accepted the request, so a failed request never leaves anything in the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from gateway.backends import PrefixHolders, Replica, ReplicaPool
from gateway.cache import EncodedVideo, SingleFlight, TokenCache
from gateway.shared_flight import SharedFlight
from gateway.encode_call import EncodeCalls
from gateway.errors import APIError, from_grpc
from gateway.relay import GenerateRequests, VisualSource, generate_setup
from gateway.requests import ChatRequest, EncodeJob, Outcome, VideoRequest, fitting_advice
from gateway.video_handoff import VideoHandoff
from gateway.video_store import StoredVideo
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.settings import GatewaySettings
from videollm.transport import VISUAL_FIT_METADATA


class Pipeline:
    def __init__(self, settings: GatewaySettings, encoders: ReplicaPool, llms: ReplicaPool, cache: TokenCache):
        self.settings = settings
        self.encoders = encoders
        self.llms = llms
        self.cache = cache
        self.single_flight = SingleFlight()
        self.shared_flight = SharedFlight(cache.store, cache)
        self.prefix_holders = PrefixHolders()
        self._encoder_info: encoder_pb2.EncoderInfo | None = None
        self.video_handoff = VideoHandoff.at(settings.pull_shm_dir, stale_after_s=settings.request_timeout_s)
        self.encode_calls = EncodeCalls(self.video_handoff)

    async def start(self, request: ChatRequest, outcome: Outcome) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Send the request to an LLM and wait for its first response; return the response stream.

        Errors before the first response (bad video, bad prompt, overload) raise APIError here, so
        the HTTP layer can still answer with a proper status code.
        """
        source = None
        if request.video is not None:
            job = await self.resolve(request.video)
            outcome.max_visual_tokens = job.max_visual_tokens
            source = await self.visual_source(job, outcome, request.remaining_s())
            outcome.header = source.header
        try:
            return await self.generate(request, source, outcome)
        finally:  # however this ends, the gateway's copy of a miss's tokens is read (for the cache, for followers)
            if source is not None:
                source.release()
                if source.lease is not None:  # no cache write to wait for: the other gateways may lead
                    self.shared_flight.release_after(source.lease, None)
                    source.lease = None

    # -- 1. settings ----------------------------------------------------------------------------

    async def resolve(self, request: VideoRequest) -> EncodeJob:
        """The request's frame count and compression settings, with the encoder's defaults filled in."""
        if self._encoder_info is None:
            self._encoder_info = await self.encoders.info(encoder_pb2.InfoRequest())
        return request.resolve(self._encoder_info)

    # -- 2. the visual tokens -------------------------------------------------------------------

    async def visual_source(self, job: EncodeJob, outcome: Outcome, timeout_s: float) -> VisualSource:
        """The request's visual tokens, from the cache, a concurrent identical encode, or the encoder."""
        key = job.key
        if key in self.prefix_holders:  # an LLM likely holds this video's prefix: read the tokens only if asked
            header = await self.cache.peek(key)
            if header is not None:
                outcome.cache = "hit"
                return VisualSource.deferred(key, header,
                                             lambda: self._read_or_encode(job, header, timeout_s, outcome))
        cached = await self.cache.get(key)
        if cached is not None:
            outcome.cache = "hit"
            return VisualSource.in_memory(key, cached)
        outcome.cache = "miss"
        waiting = self.single_flight.leader_or_wait(key)
        if waiting is not None:  # someone here is encoding the same video with the same settings
            return VisualSource.in_memory(key, await asyncio.shield(waiting))
        lease = None
        try:
            led = await self.shared_flight.lead_or_wait(key, timeout_s)
            if isinstance(led, EncodedVideo):  # another gateway encoded it meanwhile
                self.single_flight.finish(key, result=led)
                return VisualSource.in_memory(key, led)
            lease = led
            outcome.encode_called_at = time.perf_counter()
            offer_pull = self.settings.direct_pull and self.settings.grpc_tls_ca is None
            call, header, address = await self._open_encode(job, timeout_s, offer_pull)
            outcome.encode_header_at = time.perf_counter()
        except BaseException as err:
            self.single_flight.finish(key, error=err)
            if lease is not None:
                self.shared_flight.release_after(lease, None)
            raise
        source = VisualSource.relayed(key, call, header, address)
        source.lease = lease  # released once the entry is written (generate), or when the request ends
        self.single_flight.finish_with(key, source.encoded)
        return source

    async def _read_or_encode(self, job: EncodeJob, header: encoder_pb2.EncodeHeader, timeout_s: float,
                              outcome: Outcome) -> EncodedVideo:
        """The tokens of a deferred hit: from Redis, or encoded again if the entry is gone or damaged."""
        cached = await self.cache.get(job.key)
        if cached is not None:
            return cached
        outcome.cache = "miss"
        call, fresh, address = await self._open_encode(job, timeout_s)
        if list(fresh.tensor.shape) != list(header.tensor.shape) or fresh.tensor.dtype != header.tensor.dtype:
            call.cancel()
            raise APIError(503, "the video's cached tokens changed while the request was routed; retry",
                           "service_unavailable", code="cache_entry_changed", headers={"Retry-After": "0"})
        source = VisualSource.relayed(job.key, call, fresh, address)
        self.cache.put_when_verified(job.key, source.encoded)
        return await source.encoded

    async def _open_encode(self, job: EncodeJob, timeout_s: float, offer_pull: bool = False):
        """Start Encode of the job's video on some replica and return (call, header, its address); retries
        another replica when one is down. An uploaded video's file is opened only now, for a miss (404
        when it is gone), and closed once the encoder has it (the call's header)."""
        message = job.message(offer_pull)
        async with job.video.opened() as video:
            for replica in self.encoders.candidates():
                try:
                    with self.encoders.use(replica):
                        call, first = await self._encode_on(replica, message, video, timeout_s)
                except grpc.aio.AioRpcError as err:
                    if err.code() == grpc.StatusCode.UNAVAILABLE:
                        self.encoders.skipping(replica)
                        continue
                    raise from_grpc(err, "encoder") from err
                if first is grpc.aio.EOF or first.WhichOneof("item") != "header":
                    raise APIError(502, "the encoder sent no header", "api_error", code="backend_error")
                return call, first.header, replica.address
        raise self.encoders.none_available()

    async def _encode_on(self, replica: Replica, message: encoder_pb2.EncodeRequest, video: bytes | StoredVideo,
                         timeout_s: float):
        """Encode on one replica: (call, its first response). The video goes by file when this replica
        can take it (the video store, shared memory), else in chunks: encode_call.py."""
        return await self.encode_calls.start(replica, message, video, timeout_s)

    # -- 3. the LLM -----------------------------------------------------------------------------

    async def generate(self, request: ChatRequest, source: VisualSource | None,
                       outcome: Outcome) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """The LLM's response stream, once one replica has answered. An unreachable replica is retried
        on another one, replaying the visual tokens from memory."""
        setup = generate_setup(request, source)
        chunks = source.chunks if source is not None else None
        # The video's LLM: the one that answered about it last here, else the one every gateway picks
        # for it (ReplicaPool.home), so that a repeat question through any gateway finds its prefix.
        # Only a replica that may hold the prefix is asked before the tokens are sent: the one that
        # answered here, or the home replica of a video whose tokens were cached (answered before).
        remembered = self.prefix_holders.get(source.key) if setup.video_key else None
        home = remembered or (self.llms.home(source.key) if setup.video_key else None)
        holder = remembered or (home if outcome.cache == "hit" else None)
        for replica in self.llms.candidates(prefer=home):
            # Wait for the LLM's answer before sending the tokens when it may not need them: it may hold
            # the video's prefix or pull them itself.
            ask_first = replica.address == holder or setup.HasField("pull")
            answered = await self._first_response(replica, GenerateRequests(setup, chunks, ask_first), source,
                                                  outcome, request.remaining_s())
            if answered is None:  # unreachable
                chunks = source.replay() if source is not None else None
                setup.ClearField("pull")  # the ticket may be spent: send the tokens
                continue
            if source is not None and source.relay is not None:
                written = self.cache.put_when_verified(source.key, source.encoded)
                if source.lease is not None:  # the other gateways wait for this entry
                    self.shared_flight.release_after(source.lease, written)
                    source.lease = None
            if setup.video_key:
                self.prefix_holders.remember(source.key, replica.address)
            call, first = answered
            return self._responses(call, first, replica, outcome)
        raise self.llms.none_available()

    async def _first_response(self, replica: Replica, requests: GenerateRequests, source: VisualSource | None,
                              outcome: Outcome, timeout_s: float):
        """Call Generate on one replica and read its first response: (call, response), or None when the
        replica is unreachable. Other failures raise APIError."""
        self.llms.acquire(replica)
        outcome.llm_called_at = time.perf_counter()
        call = replica.stub.Generate(requests, timeout=timeout_s)
        try:
            first = await call.read()
            if source is not None:
                source.release()  # the LLM has the tokens or wants them from us: read on
            if first is not grpc.aio.EOF and first.WhichOneof("item") == "accepted":
                requests.need_visual(first.accepted.need_visual)
                first = await call.read()
            if first is grpc.aio.EOF:
                raise APIError(502, "the LLM closed the stream without an answer", "api_error", code="backend_error")
        except grpc.aio.AioRpcError as err:
            self.llms.release(replica, err)
            if source is not None and source.failed() is not None:
                raise source.failed() from err  # the encoder failed mid-stream
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                self.llms.skipping(replica)
                return None
            error = from_grpc(err, "LLM")
            fit = dict(err.trailing_metadata() or ()).get(VISUAL_FIT_METADATA)
            if fit is not None and source is not None:  # the prompt is over the context: say what fits
                error.message += "; " + fitting_advice(int(fit), source.header)
                error.param = "videollm.max_visual_tokens"
            raise error from err
        except BaseException:
            call.cancel()
            self.llms.release(replica)
            raise
        return call, first

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
        await self.shared_flight.close()
        await self.cache.close()

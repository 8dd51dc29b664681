"""What the gateway holds while it runs (the app's `state.runtime`): Redis, the uploads, the replica
pools, the pipeline, and the count of chat completions in progress."""

from __future__ import annotations

import logging

from gateway.backends import ReplicaPool
from gateway.cache import RedisStore, TokenCache
from gateway.errors import APIError
from gateway.fetch import FetchPolicy
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.videos import UploadStore, VideoSources
from protos.videollm.v1 import encoder_pb2_grpc
from videollm import transport
from videollm.settings import MiB, GatewaySettings

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        self.fetch_policy = FetchPolicy.parse(settings.fetch_urls, settings.max_upload_bytes, settings.fetch_timeout_s,
                                              settings.fetch_allow)
        self.in_flight = 0  # chat completions in progress

    async def start(self) -> None:
        """Connect; gRPC aio channels and the Redis client belong to the server's event loop."""
        settings = self.settings
        self.store = RedisStore(settings.redis_url)
        self.uploads = UploadStore(self.store, settings.upload_ttl_s)
        self.videos = VideoSources(self.uploads, self.fetch_policy, settings.max_upload_bytes)
        tls = ReplicaPool.credentials(settings.grpc_tls_ca, settings.grpc_tls_cert, settings.grpc_tls_key)
        self.encoders = ReplicaPool.connect("encoder", settings.encoders, encoder_pb2_grpc.EncoderStub,
                                            settings.max_upload_bytes + MiB, tls)
        self.llms = ReplicaPool.connect("LLM", settings.llms, transport.llm_stub, 16 * MiB, tls)
        cache = TokenCache(self.store, settings.cache_ttl_s, settings.cache_max_entry_bytes)
        self.pipeline = Pipeline(settings, self.encoders, self.llms, cache)
        if settings.redis_url and not await self.store.ping():
            log.warning("starting without the cache: Redis at %s is unreachable", settings.redis_url)

    async def close(self) -> None:
        await self.pipeline.close()
        await self.encoders.close()
        await self.llms.close()
        await self.store.close()

    def check_capacity(self) -> None:
        if self.in_flight >= self.settings.max_in_flight:
            raise APIError(429, f"the gateway has {self.settings.max_in_flight} requests in progress; retry shortly",
                           "rate_limit_error", code="overloaded", headers={"Retry-After": "1"})

    def enter(self) -> None:
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

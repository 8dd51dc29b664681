"""What the gateway holds while it runs (the app's `state.runtime`): Redis, the video store (and
its expiry sweep), the replica pools and their discovery, the pipeline, and the count of chat
completions in progress."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from gateway.backends import ReplicaPool
from gateway.cache import RedisStore, TokenCache
from gateway.discovery import Discovery, Resolver, Target, resolve_dns
from gateway.errors import APIError
from gateway.fetch import FetchPolicy
from gateway.local_files import LocalFiles
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.video_store import VideoStore
from gateway.videos import VideoSources
from videollm import transport
from videollm.settings import MiB, GatewaySettings

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 600.0  # how often expired uploads are deleted (a reader already treats them as gone)


class Runtime:
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        # a fetched video is held in memory, like an inline one
        self.fetch_policy = FetchPolicy.parse(settings.fetch_urls, settings.max_inline_bytes, settings.fetch_timeout_s,
                                              settings.fetch_allow)
        self.video_store = VideoStore(Path(settings.video_store_dir), settings.upload_ttl_s)  # fails early if unusable
        # a local file is read into memory, like an inline one
        self.local_files = LocalFiles.parse(settings.local_video_roots, settings.max_inline_bytes)
        self.encoder_targets = [Target.parse(a) for a in settings.encoders]  # a bad address fails here
        self.llm_targets = [Target.parse(a) for a in settings.llms]
        self.resolve: Resolver = resolve_dns  # what turns a name into replica addresses (tests swap it)
        self.in_flight = 0  # chat completions in progress
        self._sweeping: asyncio.Task | None = None

    async def start(self) -> None:
        """Connect; gRPC aio channels and the Redis client belong to the server's event loop."""
        settings = self.settings
        self.store = RedisStore(settings.redis_url)
        self.videos = VideoSources(self.video_store, self.fetch_policy, self.local_files, settings.max_inline_bytes)
        self._sweeping = asyncio.create_task(self.video_store.sweep_every(min(SWEEP_EVERY_S, settings.upload_ttl_s)))
        tls = ReplicaPool.credentials(settings.grpc_tls_ca, settings.grpc_tls_cert, settings.grpc_tls_key)
        # videos go to encoders in chunks (or by file), tokens come back in chunks: no message is large
        grace = settings.request_timeout_s  # a gone replica's calls in flight may finish
        self.encoders = ReplicaPool("encoder", transport.encoder_stub, 16 * MiB, tls, grace)
        self.llms = ReplicaPool("LLM", transport.llm_stub, 16 * MiB, tls, grace)
        self.discovery = Discovery([(self.encoders, self.encoder_targets), (self.llms, self.llm_targets)],
                                   settings.resolve_interval_s, self.resolve)
        await self.discovery.start()
        cache = TokenCache(self.store, settings.cache_ttl_s, settings.cache_max_entry_bytes,
                           self.metrics.cache_skipped.inc)
        self.pipeline = Pipeline(settings, self.encoders, self.llms, cache)
        if settings.redis_url and not await self.store.ping():
            log.warning("starting without the cache: Redis at %s is unreachable", settings.redis_url)

    async def close(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
        await self.discovery.close()
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

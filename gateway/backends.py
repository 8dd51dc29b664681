"""Replica pools: a gRPC channel to every encoder and LLM replica, and the choice of one per call.

Which replicas there are is discovery.py's job (it updates the pool as names resolve to other
addresses, and marks replicas that fail their health check). A call goes to the replica with the
fewest calls in flight from this gateway (ties broken round robin), skipping replicas that are not
serving or whose last call failed with UNAVAILABLE a short while ago; a call that finds its replica
unreachable moves on to the next candidate. A repeat question about a video prefers the LLM
replica that answered about it last (PrefixHolders), else the one every gateway computes for it
(home): it holds the video's prefix.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import APIError

log = logging.getLogger(__name__)

UNAVAILABLE_BACKOFF_S = 2.0
PREFIX_HOLDERS_KEPT = 100_000  # video -> LLM replica entries for prefix-aware routing
# a preferred replica (a prefix's holder) with this many more calls in flight than the least loaded
# one is passed over: a popular video must not pile its questions onto one replica
PREFER_SLACK = 8


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: object
    in_flight: int = 0
    down_until: float = 0.0  # after a call failed with UNAVAILABLE
    healthy: bool | None = None  # its last health check (discovery.py); None until the first
    takes_video_files: bool | None = None  # an encoder on this host? None until its first Encode says
    shares_video_store: bool | None = None  # an encoder that sees our video store? None until it says

    async def serving(self, timeout_s: float = 1.0) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def reported_settings(self, info_request, timeout_s: float = 5.0) -> dict:
        """The settings in effect that this replica reports in its Info, or the error of the call."""
        try:
            info = await self.stub.Info(info_request, timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            return {"error": err.code().name}
        return json.loads(info.settings_json or "{}")


class ReplicaPool:
    def __init__(self, kind: str, stub_cls, max_message_bytes: int,
                 credentials: grpc.ChannelCredentials | None = None, close_grace_s: float = 600.0):
        self.kind = kind  # "encoder" | "LLM", for messages
        self.replicas: list[Replica] = []
        self._stub_cls = stub_cls
        self._credentials = credentials
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes)]
        self._close_grace_s = close_grace_s  # how long a gone replica's calls in flight may still finish
        self._closing: set[asyncio.Task] = set()
        self._turn = itertools.count()

    @staticmethod
    def credentials(ca, cert, key) -> grpc.ChannelCredentials | None:
        """TLS towards the services when a CA is given; a client certificate too for mutual TLS."""
        if ca is None:
            if cert is not None or key is not None:
                raise ValueError("grpc_tls_cert and grpc_tls_key need grpc_tls_ca as well")
            return None
        if (cert is None) != (key is None):
            raise ValueError("mutual TLS needs both grpc_tls_cert and grpc_tls_key")
        return grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )

    def update(self, addresses: dict[str, str]) -> None:
        """Make the replicas those of `addresses` (address -> the name TLS verifies, the one it was
        resolved from): new ones get a channel, gone ones get no more calls and their channels close
        once their calls in flight have finished (or after close_grace_s)."""
        kept = [r for r in self.replicas if r.address in addresses]
        for gone in (r for r in self.replicas if r.address not in addresses):
            log.info("%s %s is gone; it gets no more calls", self.kind, gone.address)
            self._close_later(gone)
        known = {r.address for r in kept}
        for address, name in addresses.items():
            if address not in known:
                kept.append(self._connect(address, name))
                log.info("%s %s joins", self.kind, address)
        self.replicas = kept

    def _connect(self, address: str, name: str) -> Replica:
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(address, options=self._options)
        else:  # the certificate names the service, not the pod's address
            channel = grpc.aio.secure_channel(address, self._credentials,
                                              options=[*self._options, ("grpc.ssl_target_name_override", name)])
        return Replica(address, channel, self._stub_cls(channel))

    def _close_later(self, replica: Replica) -> None:
        task = asyncio.create_task(replica.channel.close(grace=self._close_grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def pick(self, exclude: set[str] = frozenset(), prefer: str | None = None) -> Replica | None:
        """The least loaded replica; `prefer` (e.g. the holder of a cached prefix) wins when it is up
        and not overloaded (at most PREFER_SLACK calls in flight more than the least loaded)."""
        now = time.monotonic()
        candidates = [r for r in self.replicas if r.address not in exclude]
        if not candidates:
            return None
        # a replica that is not serving may still be the only one left: then it is tried anyway
        up = [r for r in candidates if r.down_until <= now and r.healthy is not False] or candidates
        turn = next(self._turn)
        position = {r.address: index for index, r in enumerate(candidates)}  # ties go round robin over these
        least = min(up, key=lambda r: (r.in_flight, (position[r.address] - turn) % len(candidates)))
        for replica in up:
            if replica.address == prefer and replica.in_flight <= least.in_flight + PREFER_SLACK:
                return replica
        return least

    def home(self, key: str) -> str | None:
        """The replica every gateway picks for `key` from the same replicas, whatever order it found them
        in: the highest of hash(key, address) (rendezvous hashing, so that a replica added or gone moves
        only its own share of keys). None while there is no replica."""
        return max(sorted(r.address for r in self.replicas),
                   key=lambda address: hashlib.blake2b(f"{key}\n{address}".encode(), digest_size=8).digest(),
                   default=None)

    def candidates(self, prefer: str | None = None) -> Iterator[Replica]:
        """The replicas to try one after another for a call, each at most once (see pick)."""
        tried: set[str] = set()
        while (replica := self.pick(exclude=tried, prefer=prefer)) is not None:
            tried.add(replica.address)
            yield replica

    def skipping(self, replica: Replica) -> None:
        log.warning("%s %s unavailable, trying another replica", self.kind, replica.address)

    def none_available(self) -> APIError:
        return APIError(503, f"no {self.kind} replica is available", "service_unavailable",
                        code="backend_unavailable", headers={"Retry-After": "1"})

    async def info(self, request, timeout_s: float = 5.0):
        """The Info of the first replica that answers; 503 when none does."""
        errors = []
        for replica in self.replicas:
            try:
                return await replica.stub.Info(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as err:
                errors.append(f"{replica.address}: {err.code().name}")
        raise APIError(503, f"no {self.kind} replica is reachable ({'; '.join(errors)})", "service_unavailable",
                       code="backend_unavailable", headers={"Retry-After": "1"})

    def acquire(self, replica: Replica) -> None:
        replica.in_flight += 1

    def release(self, replica: Replica, error: BaseException | None = None) -> None:
        replica.in_flight -= 1
        if isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE:
            replica.down_until = time.monotonic() + UNAVAILABLE_BACKOFF_S

    @contextmanager
    def use(self, replica: Replica):
        self.acquire(replica)
        try:
            yield replica
        except BaseException as err:
            self.release(replica, err)
            raise
        self.release(replica)

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.channel.close()
        for task in list(self._closing):
            task.cancel()


class PrefixHolders:
    """Which LLM replica last answered about a video (by its cache key): it holds that video's prefix
    KV cache, so the next question about it goes there. The oldest entries are forgotten first."""

    def __init__(self, kept: int = PREFIX_HOLDERS_KEPT):
        self.kept = kept
        self._holders: OrderedDict[str, str] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._holders

    def get(self, key: str) -> str | None:
        return self._holders.get(key)

    def remember(self, key: str, address: str) -> None:
        self._holders[key] = address
        self._holders.move_to_end(key)
        while len(self._holders) > self.kept:
            self._holders.popitem(last=False)

"""Discovery: which encoder and LLM replicas a gateway calls, kept current while it runs.

Each configured address is a target: `ip:port` is one replica; `host:port` (or gRPC's spelling
`dns:///host:port`) is a name the gateway resolves itself every `resolve_interval_s`, one replica
(one channel) per address it has. Behind a Kubernetes headless Service a name has one address per
ready pod, so each pod is a replica of its own: the gateway balances calls over pods by its own
count of calls in flight, retries a call on another pod, routes a video's questions to the pod
that holds its prefix and lets an LLM pull tokens from the very encoder pod that made them, none of
which a single channel balancing over the pods behind one name could do. A pod that appears gets
calls at the next resolution; one that goes is dropped from the choice at once, and its channel
closes once its calls in flight have finished.

Each round also asks every replica's grpc.health.v1 status: a replica that answers NOT_SERVING
(loading weights, draining after SIGTERM) or not at all gets no new calls while another is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.backends import ReplicaPool

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0

# (host, port) -> the replica addresses "ip:port" it stands for now
Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class Target:
    host: str  # a name, or an IP literal (IPv6 without brackets)
    port: int

    @classmethod
    def parse(cls, text: str) -> Target:
        """`host:port`, `[v6]:port` or `dns:///host:port`; a ValueError says what is wrong."""
        spec = text.strip()
        if spec.startswith("dns:///"):
            spec = spec[len("dns:///"):]
        elif "://" in spec:
            raise ValueError(f"address {text!r}: the only scheme understood is dns:/// (e.g. dns:///llm:50052)")
        host, sep, port = spec.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address {text!r} is not host:port (e.g. 127.0.0.1:50051 or dns:///encoder:50051)")
        return cls(host, int(port))

    @property
    def literal(self) -> str | None:
        """The replica's address when the host is an IP literal (nothing to resolve), else None."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return None
        return f"[{ip}]:{self.port}" if ip.version == 6 else f"{ip}:{self.port}"

    def __str__(self) -> str:
        return self.literal or f"{self.host}:{self.port}"


async def resolve_dns(host: str, port: int) -> list[str]:
    """The name's IPv4 addresses, or its IPv6 ones when it has none: a dual-stack pod has one of each,
    and one channel per pod is the point."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({f"{info[4][0]}:{port}" for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({f"[{info[4][0]}]:{port}" for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


class Discovery:
    """Keeps each pool's replicas equal to what its targets resolve to, every interval_s."""

    def __init__(self, pools: list[tuple[ReplicaPool, list[Target]]], interval_s: float,
                 resolve: Resolver = resolve_dns):
        self.pools = pools
        self.interval_s = interval_s
        self.resolve = resolve
        self._known: dict[Target, list[str]] = {}  # the last good answer per name: kept through a DNS failure
        self._running: asyncio.Task | None = None

    async def start(self) -> None:
        """The first round (the gateway starts with what it finds; an empty pool answers 503), then one
        every interval in the background."""
        await self.refresh()
        self._running = asyncio.create_task(self._every_interval())

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # a round that fails must not end discovery
                log.exception("replica discovery round failed; the replicas stay as they were")

    async def refresh(self) -> None:
        for pool, targets in self.pools:
            addresses: dict[str, str] = {}  # address -> the name that TLS checks its certificate against
            for target in targets:
                for address in await self._addresses(target):
                    addresses.setdefault(address, target.host)
            pool.update(addresses)
            await asyncio.gather(*(self._check(replica) for replica in pool.replicas))

    async def _addresses(self, target: Target) -> list[str]:
        if target.literal is not None:
            return [target.literal]
        try:
            found = await self.resolve(target.host, target.port)
        except OSError as err:  # socket.gaierror included
            found = self._known.get(target, [])
            log.warning("cannot resolve %s (%s); keeping its %d known replicas", target, err, len(found))
            return found
        if found != self._known.get(target):
            log.info("%s resolves to %s", target, ", ".join(found) or "nothing")
        self._known[target] = found
        return found

    @staticmethod
    async def _check(replica) -> None:
        serving = await replica.serving(HEALTH_TIMEOUT_S)
        if serving != replica.healthy:
            log.log(logging.INFO if serving else logging.WARNING, "%s is %s", replica.address,
                    "serving" if serving else "not serving (starting, draining or gone)")
        replica.healthy = serving

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running

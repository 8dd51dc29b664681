"""Fetching a video from an http(s) URL, when enabled, without letting a request reach inside.

Off by default. When on, the host is resolved once, every address it resolves to must be public
(no loopback, private, link-local, multicast, reserved or unspecified address) unless it is in the
allow-list, and the connection goes to that checked address (no second lookup that DNS rebinding
could change). Redirects are followed by hand, each hop checked the same way. Size and time are
bounded; the body is read in chunks and the download stops at the limit.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from gateway.errors import APIError, bad_request

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool
    max_bytes: int
    timeout_s: float
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, enabled: bool, max_bytes: int, timeout_s: float, allow: list[str]) -> FetchPolicy:
        return cls(enabled, max_bytes, timeout_s, tuple(ipaddress.ip_network(a, strict=False) for a in allow))

    def permits(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in network for network in self.allow):
            return True
        return address.is_global and not address.is_multicast


def _refused(message: str) -> APIError:
    return APIError(400, message, param="messages", code="video_url_refused")


async def _resolve(host: str, port: int, policy: FetchPolicy) -> str:
    """One checked address for host (an IP literal or a name resolved once)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise bad_request(f"cannot resolve the video URL's host {host!r}", "messages") from err
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [a for a in addresses if not policy.permits(a)]
    if refused or not addresses:
        raise _refused(f"video URLs may not point at private, loopback or link-local addresses ({host!r})")
    return str(addresses[0])


async def fetch_video(url: str, policy: FetchPolicy) -> bytes:
    if not policy.enabled:
        raise bad_request("fetching videos from URLs is disabled; send a data: URL or upload to /v1/videos "
                          "(operators can enable it with VIDEOLLM_GATEWAY_FETCH_URLS)", "messages")
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise bad_request("video URLs must be http:// or https:// with a host", "messages")
        if parts.username or parts.password:
            raise bad_request("video URLs must not carry credentials", "messages")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = await _resolve(parts.hostname, port, policy)
        host_header = parts.netloc.rsplit("@", 1)[-1]
        # Connect to the checked address; keep the name for TLS (SNI and certificate) and Host.
        target = parts._replace(netloc=f"[{address}]:{port}" if ":" in address else f"{address}:{port}").geturl()
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise APIError(504, "fetching the video URL timed out", "timeout", code="fetch_timeout")
        async with httpx.AsyncClient(timeout=remaining, follow_redirects=False, verify=True) as client:
            try:
                async with client.stream("GET", target, headers={"Host": host_header},
                                         extensions=extensions) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"the video URL answered HTTP {response.status_code}", "messages")
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > policy.max_bytes:
                        raise APIError(413, f"the video at the URL is {declared} bytes; the limit is "
                                            f"{policy.max_bytes} bytes", code="video_too_large")
                    body = bytearray()
                    async for piece in response.aiter_bytes():
                        body += piece
                        if len(body) > policy.max_bytes:
                            raise APIError(413, f"the video at the URL exceeds the limit of {policy.max_bytes} "
                                                "bytes", code="video_too_large")
                        if time.monotonic() > deadline:
                            raise APIError(504, "fetching the video URL timed out", "timeout",
                                           code="fetch_timeout")
                    if not body:
                        raise bad_request("the video URL returned an empty body", "messages")
                    return bytes(body)
            except httpx.TimeoutException as err:
                raise APIError(504, "fetching the video URL timed out", "timeout", code="fetch_timeout") from err
            except httpx.HTTPError as err:
                raise bad_request(f"could not fetch the video URL: {type(err).__name__}", "messages") from err
    raise bad_request(f"the video URL redirected more than {MAX_REDIRECTS} times", "messages")

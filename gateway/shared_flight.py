"""Single flight across gateways: of identical concurrent misses on several gateway replicas, one
encodes and the others wait for its cache entry.

In front of it each gateway keeps its own single flight (cache.SingleFlight), so only one request
per gateway and key gets here. That request takes a short Redis lock on the key (SET NX PX with a
random token) before it encodes:
- It gets the lock: it leads. It renews the lock while it works and, once the tokens are in the
  cache (or the request has failed), deletes the lock (only if it still holds it: a compare and
  delete in one Lua script) and publishes on the key's channel.
- Another gateway holds it: it waits for that gateway's entry, woken by the channel and polling as
  a fallback, and reads the entry when it appears. When the lock goes away without an entry (the
  holder failed, or its encoding was too large to cache) or expires (the holder died: it renews no
  more), the waiter tries to lead itself.
Without Redis every gateway leads: the lock is only ever a saving, never a condition of an answer.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from redis.exceptions import RedisError

from gateway.cache import EncodedVideo, RedisStore, TokenCache

log = logging.getLogger(__name__)

LOCK_TTL_MS = 10_000  # a holder that dies blocks the others at most this long
RENEW_EVERY_S = 3.0
POLL_S = 0.25  # the waiters' fallback when a notification is lost

# delete / extend the lock only while it holds our token
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")


def lock_key(key: str) -> str:
    return f"videollm:v1:encoding:{key.rsplit(':', 1)[-1]}"


def channel(key: str) -> str:
    return f"videollm:v1:encoded:{key.rsplit(':', 1)[-1]}"


class Lease:
    """The lock of one key, held while this gateway encodes it (token None: held without Redis)."""

    def __init__(self, store: RedisStore, key: str, token: str | None):
        self.store = store
        self.key = key
        self.token = token
        self._renewing = asyncio.create_task(self._renew()) if token is not None else None

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self.store.client.eval(_RENEW, 1, lock_key(self.key), self.token, LOCK_TTL_MS)
            except (RedisError, OSError) as err:
                log.debug("could not renew the encoding lock of %s: %s", self.key, err)

    async def release(self) -> None:
        """Give the lock up and wake the waiters (after the cache entry is written, or on failure)."""
        if self._renewing is not None:
            self._renewing.cancel()
        if self.token is None:
            return
        try:
            await self.store.client.eval(_RELEASE, 1, lock_key(self.key), self.token)
            await self.store.client.publish(channel(self.key), b"1")
        except (RedisError, OSError) as err:
            log.warning("could not release the encoding lock of %s (it expires by itself): %s", self.key, err)


class SharedFlight:
    def __init__(self, store: RedisStore, cache: TokenCache):
        self.store = store
        self.cache = cache
        self._releases: set[asyncio.Task] = set()
        self.waited = 0  # misses served by another gateway's encode (a test and a metric can read it)

    async def lead(self, key: str) -> Lease | None:
        """The lock of `key` (this gateway encodes), or None when another gateway holds it."""
        if self.store.client is None or not self.store.healthy:  # no waiting on a Redis that is down
            return Lease(self.store, key, None)
        token = secrets.token_hex(16)
        try:
            taken = await self.store.client.set(lock_key(key), token, nx=True, px=LOCK_TTL_MS)
        except (RedisError, OSError) as err:
            log.debug("no encoding lock for %s (Redis unavailable): %s", key, err)
            return Lease(self.store, key, None)
        return Lease(self.store, key, token) if taken else None

    async def lead_or_wait(self, key: str, timeout_s: float) -> Lease | EncodedVideo:
        """Lead (the lease) or the tokens another gateway made, whichever comes first."""
        deadline = time.monotonic() + timeout_s
        while True:
            lease = await self.lead(key)
            if lease is not None:
                return lease
            made = await self._wait(key, deadline)
            if made is not None:
                self.waited += 1
                return made

    async def _wait(self, key: str, deadline: float) -> EncodedVideo | None:
        """The entry the lock's holder writes; None once the lock is gone without one (or on a
        Redis failure, or at the deadline): then the caller tries to lead."""
        pubsub = self.store.client.pubsub()
        try:
            await pubsub.subscribe(channel(key))  # before looking: a notification after it is not lost
            while time.monotonic() < deadline:
                made = await self.cache.get(key)
                if made is not None:
                    return made
                if not await self.store.client.exists(lock_key(key)):
                    return await self.cache.get(key)
                await pubsub.get_message(ignore_subscribe_messages=True,
                                         timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
        except (RedisError, OSError) as err:
            log.debug("stopped waiting for another gateway's encode of %s: %s", key, err)
        finally:
            await pubsub.aclose()
        return None

    def release_after(self, lease: Lease, written: asyncio.Future | None) -> None:
        """Release the lease once `written` (the cache write) is done, or now when there is none;
        in the background, so that a request that ends (or is cancelled) never leaves the lock held."""
        async def release():
            if written is not None:
                await asyncio.gather(written, return_exceptions=True)
            await lease.release()

        task = asyncio.create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def close(self) -> None:
        for task in list(self._releases):
            await asyncio.gather(task, return_exceptions=True)

"""The uploaded videos, on disk: one file per video in `video_store_dir`, named by its id
(`video-<sha256 of the bytes>`).

An upload is written to a hidden temporary name in the store while it is hashed (StoreWriter), and
renamed to its id only once it is whole and checked, so a reader never sees a partial file and the
same video uploaded twice is one file. Files expire `upload_ttl_s` after their upload: a reader
treats an older file as gone, and a sweep (every few minutes, and at start) deletes them and the
partial files of uploads that died. Several gateway replicas share one store (the same directory,
e.g. a ReadWriteMany volume): they see each other's uploads, renames are atomic, and a sweep by any
of them is harmless to the others.

A question by id needs only the hash, which is in the id, so a cache hit opens nothing. A miss
opens the file (StoredVideo) and its bytes are checked against the id as they are read (or in a
pass of their own when the encoder maps the file itself): a file that does not hash to its id is
deleted and answered 404, and the encoder never gets to finish with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.errors import APIError

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".upload-"
WRITE_BYTES = 4 << 20  # an upload's bytes are hashed and written in batches of this size, off the event loop
READ_BYTES = 8 << 20  # what one thread call reads (and hashes) of a stored file
PARTIAL_STALE_S = 24 * 3600  # a partial file this old belongs to an upload that died


def not_found(video_id: str) -> APIError:
    return APIError(404, f"no uploaded video with id {video_id!r} (it may have expired); upload it again",
                    "not_found_error", param="messages", code="video_not_found")


def damaged(video_id: str) -> APIError:
    return APIError(404, f"the stored copy of the video {video_id!r} was damaged and has been deleted; upload it "
                         "again", "not_found_error", param="messages", code="video_not_found")


class VideoStore:
    def __init__(self, directory: Path, ttl_s: float):
        self.directory = directory
        self.ttl_s = ttl_s
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise RuntimeError(f"cannot create the video store {directory} ({err.strerror}); set video_store_dir "
                               "(VIDEOLLM_GATEWAY_VIDEO_STORE_DIR) to a writable directory") from err
        if not os.access(directory, os.W_OK | os.X_OK):
            raise RuntimeError(f"the video store {directory} is not writable by this process; set video_store_dir "
                               "(VIDEOLLM_GATEWAY_VIDEO_STORE_DIR) to a writable directory")

    def path(self, video_id: str) -> Path:
        return self.directory / video_id  # video_id matched videos.VIDEO_ID: no separator, no '..'

    def writer(self) -> StoreWriter:
        return StoreWriter(self)

    async def open(self, video_id: str) -> StoredVideo:
        """The stored video, opened for an encode; 404 when it is not there or has expired."""
        return await asyncio.to_thread(self._open, video_id)

    def _open(self, video_id: str) -> StoredVideo:
        path = self.path(video_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise not_found(video_id) from None
        stat = os.fstat(fd)
        if time.time() - stat.st_mtime > self.ttl_s:
            os.close(fd)
            _unlink_if_same(path, stat.st_ino)
            raise not_found(video_id)
        return StoredVideo(self, video_id, fd, stat.st_size, stat.st_ino)

    def sweep(self, now: float | None = None) -> int:
        """Delete expired videos and partial files of dead uploads; returns how many."""
        now = time.time() if now is None else now
        removed = 0
        for path in self.directory.iterdir():
            if path.name.startswith(PARTIAL_PREFIX):
                max_age = max(self.ttl_s, PARTIAL_STALE_S)  # an upload in progress may take long
            elif path.name.startswith("video-"):
                max_age = self.ttl_s
            else:
                continue  # not ours
            try:
                if now - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # removed meanwhile (by another replica's sweep)
        return removed

    async def sweep_every(self, interval_s: float) -> None:
        """Sweep now and then every interval_s, until cancelled."""
        while True:
            try:
                removed = await asyncio.to_thread(self.sweep)
                if removed:
                    log.info("video store: removed %d expired or partial files", removed)
            except OSError as err:
                log.warning("video store: the sweep of %s failed (%s)", self.directory, err)
            await asyncio.sleep(interval_s)


class StoreWriter:
    """One upload on its way into the store: written to a partial file, hashed as it is written."""

    def __init__(self, store: VideoStore):
        self.store = store
        self.partial = store.directory / f"{PARTIAL_PREFIX}{secrets.token_hex(16)}"
        self._fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._hash = hashlib.sha256()
        self._pending = bytearray()
        self.size = 0

    async def write(self, data: bytes | memoryview) -> None:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= WRITE_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, bytearray()
        await asyncio.to_thread(self._write_and_hash, batch)

    def _write_and_hash(self, batch: bytearray) -> None:
        self._hash.update(batch)  # hashlib lets other threads run while it hashes a large buffer
        view = memoryview(batch)
        while view:
            view = view[os.write(self._fd, view):]

    async def finish(self) -> str:
        """Write what is pending; the video's sha256 (the file stays at its partial name until commit)."""
        await self._flush()
        return self._hash.hexdigest()

    async def commit(self, video_id: str) -> None:
        """Move the finished file to its id (atomically; an earlier copy of the same video is replaced,
        which renews its expiry)."""
        os.close(self._fd)
        self._fd = -1
        await asyncio.to_thread(os.replace, self.partial, self.store.path(video_id))

    def abort(self) -> None:
        """Delete the partial file (an upload refused, failed or cut off)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass


class StoredVideo:
    """A stored video opened for one encode; its bytes are checked against its id as they are read."""

    def __init__(self, store: VideoStore, video_id: str, fd: int, size: int, inode: int):
        self.store = store
        self.video_id = video_id
        self.fd = fd
        self.size = size
        self._inode = inode

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def pieces(self, piece_bytes: int) -> AsyncIterator[bytes]:
        """The file's bytes in pieces, hashed as they are read; after the last one, 404 (and the file
        deleted) when they do not hash to the id, so the caller can drop the encode before it ends."""
        digest = hashlib.sha256()
        for offset in range(0, self.size, piece_bytes):
            yield await asyncio.to_thread(self._read, offset, min(piece_bytes, self.size - offset), digest)
        self._check(digest)

    async def verify(self) -> None:
        """Read and hash the whole file (when the encoder maps it itself): 404 when it is damaged."""
        async for _ in self.pieces(READ_BYTES):
            pass

    def _read(self, offset: int, length: int, digest) -> bytes:
        piece = os.pread(self.fd, length, offset)
        if len(piece) != length:
            self._delete_damaged(f"it is shorter than the {self.size} bytes it had when opened")
        digest.update(piece)
        return piece

    def _check(self, digest) -> None:
        if f"video-{digest.hexdigest()}" != self.video_id:
            self._delete_damaged(f"its bytes hash to {digest.hexdigest()}")

    def _delete_damaged(self, why: str) -> None:
        log.warning("deleting the damaged upload %s: %s", self.video_id, why)
        _unlink_if_same(self.store.path(self.video_id), self._inode)
        raise damaged(self.video_id)


def _unlink_if_same(path: Path, inode: int) -> None:
    """Delete path if it is still the file we looked at (not a fresh upload of the same video)."""
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass

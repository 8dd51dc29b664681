"""Same-host hand-offs through files in shared memory (a tmpfs such as /dev/shm): the visual
tokens of an encode (encoder -> LLM, PREFIX) and the video of a miss (gateway -> encoder,
VIDEO_PREFIX).

The sender keeps the bytes under a one-time ticket. When both services share the directory (same
host, or a shared memory volume), the receiver takes the file instead of receiving the bytes over
gRPC: the sender writes them once, the receiver maps them, with no serialisation, gRPC hop or
reassembly (a 61 MB video took 300-370 ms through gRPC on the 2-core CPU, its file 20 ms). Nothing travels, so the size is checked and not a CRC.
Whoever takes a file first renames it (atomic, so exactly one party gets it), maps it and deletes
it; the other side then finds nothing and falls back. Files are created 0600, so
only the same user's services can read them. The ticket names the file; the directory is each
service's own setting, never something a request names.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
from pathlib import Path

PREFIX = "videollm-pull-"
VIDEO_PREFIX = "videollm-video-"
_TICKET = re.compile(r"[0-9a-f]{16,64}")


class PullFileError(ValueError):
    """A ticket that cannot name a pull file."""


def path_for(directory: Path, ticket: str, prefix: str = PREFIX) -> Path:
    if not _TICKET.fullmatch(ticket):
        raise PullFileError("a pull ticket is 16 to 64 lowercase hex digits")
    return directory / f"{prefix}{ticket}"


def usable(directory: Path | None) -> bool:
    """True when directory exists and this process can create files in it."""
    return directory is not None and directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def write(directory: Path, ticket: str, payload: memoryview | bytes, prefix: str = PREFIX) -> None:
    """Create the ticket's file holding payload (OSError when it cannot: the caller keeps the bytes itself)."""
    path = path_for(directory, ticket, prefix)
    view = memoryview(payload)  # slices of it are not copies
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    except BaseException:
        os.close(fd)
        remove(path)
        raise
    os.close(fd)


def take(directory: Path, ticket: str, size: int, prefix: str = PREFIX) -> mmap.mmap | bytearray | None:
    """The file's bytes, mapped (no copy), if this caller is first to take it and it holds exactly
    `size` bytes; else None. The file is gone afterwards either way; the mapping lives on until
    its last user lets go of it.
    """
    path = path_for(directory, ticket, prefix)
    claimed = path.with_name(f"{path.name}.taken-{os.getpid()}-{threading.get_ident()}")
    try:
        os.rename(path, claimed)
    except FileNotFoundError:
        return None  # another host, expired, or taken by the other side
    try:
        with open(claimed, "rb", buffering=0) as file:
            if os.fstat(file.fileno()).st_size != size:
                return None
            if size == 0:
                return bytearray()
            return mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)  # private: writes never reach the file
    finally:
        remove(claimed)


def sweep(directory: Path, older_than_s: float, prefix: str = PREFIX) -> int:
    """Delete hand-off files (taken or not) last written over older_than_s ago, such as those of a
    service that was killed; returns how many. Files of live services are younger than their TTL."""
    removed, now = 0, time.time()
    for path in directory.glob(f"{prefix}*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                path.unlink()
                removed += 1
        except OSError:
            continue  # taken or removed meanwhile, or not ours to delete
    return removed


def remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

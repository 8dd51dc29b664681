"""Same-host hand-off of a miss's video to the encoder, through a file in shared memory.

A 61 MB video took 300-370 ms to cross gRPC on the 2-core CPU (serialising the request alone
100 ms); its file in /dev/shm is written in about 20 ms and the encoder maps it without a copy.
The gateway leaves the file under a one-time ticket and names it in the EncodeRequest; an encoder
on another host (or with the hand-off off) answers FAILED_PRECONDITION, and the gateway sends the
bytes instead, in chunks, and remembers, per replica, not to try again (encode_call.py). Uploaded
videos do not come here: they are files already, in the video store (video_store.py).
videollm/pull_files.py has the file protocol (0600 files, taken by an atomic rename, so exactly one
party removes each).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from pathlib import Path

from videollm import pull_files

log = logging.getLogger(__name__)


class VideoHandoff:
    def __init__(self, directory: Path, stale_after_s: float):
        self.directory = directory
        # left by a gateway that was killed between writing a file and the encoder taking it
        pull_files.sweep(directory, older_than_s=stale_after_s, prefix=pull_files.VIDEO_PREFIX)

    @classmethod
    def at(cls, directory: str, stale_after_s: float) -> VideoHandoff | None:
        """The hand-off through `directory`, or None when it is off ('') or not a writable directory."""
        if not directory:
            return None
        if not pull_files.usable(Path(directory)):
            log.warning("pull_shm_dir %s is not a writable directory; videos go to encoders over gRPC", directory)
            return None
        return cls(Path(directory), stale_after_s)

    async def leave(self, video: bytes) -> str | None:
        """Write the video's file; its ticket, or None when it cannot be written (full, gone)."""
        ticket = secrets.token_hex(16)
        try:
            await asyncio.to_thread(pull_files.write, self.directory, ticket, video, pull_files.VIDEO_PREFIX)
        except OSError as err:
            log.warning("could not write a video file in %s (%s); sending the video over gRPC", self.directory, err)
            return None
        return ticket

    def discard(self, ticket: str) -> None:
        """Remove the ticket's file if the encoder did not take it."""
        pull_files.remove(pull_files.path_for(self.directory, ticket, pull_files.VIDEO_PREFIX))

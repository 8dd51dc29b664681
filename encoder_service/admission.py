"""How much work the encoder takes at once: requests, and their sampled frames.

Requests are admitted up to max_concurrent (more get RESOURCE_EXHAUSTED at once, so that a
client or the gateway can try another replica). Their frames are admitted apart, once a request
knows how many it samples and before it decodes any: up to max_frames_in_flight frames of all
requests being decoded, preprocessed or encoded. A request whose frames do not fit waits for
others to finish (its frames count once it has them, until its tokens are made), so memory stays
bounded however long the requests, and a long request never takes the room of everything else.
"""

from __future__ import annotations

import threading


class FramesInFlight:
    def __init__(self, limit: int):
        self.limit = limit
        self.taken = 0
        self.waiting = 0  # requests waiting for room: the queue a metric or a test can read
        self._room = threading.Condition()

    def take(self, frames: int) -> None:
        """Wait until `frames` more fit, then count them (a request of more than the limit is
        refused before it gets here: EncoderSettings keeps max_frames within the limit)."""
        with self._room:
            self.waiting += 1
            try:
                self._room.wait_for(lambda: self.taken + frames <= self.limit)
            finally:
                self.waiting -= 1
            self.taken += frames

    def give_back(self, frames: int) -> None:
        with self._room:
            self.taken -= frames
            self._room.notify_all()

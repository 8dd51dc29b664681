"""The decoding threads every request shares, handed out fairly between requests.

A request's keyframe runs are its tasks. A plain thread pool runs tasks in the order they came,
so the 200 runs of a 600-frame request would hold every worker until they are all done, and a
32-frame request arriving meanwhile would wait for all of them. Here each request queues its
tasks apart, and a free worker takes the next task of the next request in turn (round robin): a
request alone gets every worker, and a short request arriving beside a long one gets every other
task that starts from then on, so it waits for one task per worker at most, never for the whole
long request.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable


class _Request:
    def __init__(self, tasks: Iterable[Callable[[], None]]):
        self.pending = deque(tasks)
        self.running = 0
        self.error: BaseException | None = None
        self.done = threading.Event()


class DecodePool:
    def __init__(self, workers: int):
        self.workers = workers
        self._turns: deque[_Request] = deque()  # requests with tasks not yet started, in turn order
        self._wake = threading.Condition()
        for number in range(workers):
            threading.Thread(target=self._work, name=f"decode-{number}", daemon=True).start()

    def run(self, tasks: Iterable[Callable[[], None]]) -> None:
        """Run one request's tasks on the pool and wait for them all; raises the first error (the
        tasks not yet started are dropped then)."""
        request = _Request(tasks)
        if not request.pending:
            return
        with self._wake:
            self._turns.append(request)
            self._wake.notify(len(request.pending))
        request.done.wait()
        if request.error is not None:
            raise request.error

    def _next(self) -> tuple[_Request, Callable[[], None]]:
        with self._wake:
            while not self._turns:
                self._wake.wait()
            request = self._turns.popleft()
            task = request.pending.popleft()
            request.running += 1
            if request.pending:
                self._turns.append(request)  # its next task after the other requests' next ones
            return request, task

    def _work(self) -> None:
        while True:
            request, task = self._next()
            try:
                task()
            except BaseException as err:  # noqa: BLE001 - handed to the request's thread
                with self._wake:
                    if request.error is None:
                        request.error = err
                    if request.pending:  # drop what has not started
                        request.pending.clear()
                        self._turns.remove(request)
            with self._wake:
                request.running -= 1
                if request.running == 0 and not request.pending:
                    request.done.set()


# One pool for the decoding of every request: concurrent requests queue for the cores instead of
# each starting its own threads (16 requests x runs x FFmpeg threads would oversubscribe them).
POOL = DecodePool(os.cpu_count() or 1)

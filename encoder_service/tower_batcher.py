"""Frames of concurrent requests through the vision tower by one device worker: batched, and
interleaved a chunk at a time so that a short request never waits for a long one.

Requests decode and preprocess on their own threads, then wait here. A single worker thread owns
the device. Between any two steps it takes the waiting requests into passes: the oldest waiting
request and the other waiting requests with the same layer schedule (`VisionEncoder.schedule`), up
to `max_requests` requests and `max_frames` sampled frames in all (a longer request is a pass of
its own). Nothing waits for a batch to fill: a request that finds the device idle runs at once,
alone. A pass runs as steps of at most one chunk of frames (`VisionEncoder.encode_steps`), and the
worker always steps the pass with the fewest frames: a 32-frame request that arrives while a
600-frame one is in the tower waits for the chunk in progress, then runs to its end, and the long
one goes on after it. Frames never interact inside a SigLIP layer and EarlyTom's steps run per
request, so a request's tokens depend neither on its batch nor on what ran between its chunks; if
a batch fails, each of its requests is retried alone, so that one request's failure is its own.

Batching gains little in the tower itself, whose matrix products are already efficient at one
request's frames, and it costs end to end: the requests of a pass finish together and reach the
LLM in bursts, and each waits for the whole pass. So the service's default is one request per
pass (`EncoderSettings.batch_max_requests`); the measurements are in docs/bench/README.md.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field

import torch

from videollm.settings import CompressionSettings


@dataclass(eq=False)  # identity: jobs hold tensors
class TowerJob:
    pixels: torch.Tensor  # [T, 3, H, W]
    settings: CompressionSettings
    key: Hashable  # requests with equal keys may share a batch
    ready: torch.cuda.Event | None = None  # pixels are written once this event has passed (CUDA)
    submitted_at: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    result: object = None
    error: BaseException | None = None
    queue_ms: float = 0.0
    batch_requests: int = 0
    batch_frames: int = 0

    @property
    def frames(self) -> int:
        return self.pixels.shape[0]


RunBatch = Callable[[list[TowerJob]], Generator[None, None, list[object]]]


class _Pass:
    """A batch of jobs on its way through the tower, a step at a time."""

    def __init__(self, jobs: list[TowerJob], run_batch: RunBatch):
        self.jobs = jobs
        self.frames = sum(job.frames for job in jobs)
        self.run_batch = run_batch
        self.steps: Generator[None, None, list[object]] | None = None
        self.started = 0.0

    def step(self) -> list[object] | None:
        """One step (the first starts the pass); the results once the pass is done, else None."""
        if self.steps is None:
            self.started = time.perf_counter()
            self.steps = self.run_batch(self.jobs)
        try:
            next(self.steps)
        except StopIteration as done:
            return done.value
        return None


class TowerBatcher:
    def __init__(self, run_batch: RunBatch, max_frames: int, max_requests: int):
        """run_batch: jobs of one key -> a generator that yields between steps and returns one result
        per job, in order (it runs on the worker thread)."""
        self.run_batch = run_batch
        self.max_frames = max_frames
        self.max_requests = max_requests
        self._waiting: deque[TowerJob] = deque()
        self._passes: list[_Pass] = []  # taken from _waiting, in arrival order; the worker's alone
        self._wake = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._worker = threading.Thread(target=self._loop, name="tower-batcher", daemon=True)
        self._worker.start()

    def run(self, job: TowerJob) -> TowerJob:
        """Queue the job and wait for its pass; raises what its encode raised."""
        with self._wake:
            if self._closed:
                raise RuntimeError("the encoder is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job

    def close(self) -> None:
        """Finish the waiting requests, then stop the worker."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._worker.join()

    @property
    def waiting(self) -> int:
        """Requests waiting for the tower: queued, or in a pass not started."""
        return len(self._waiting) + sum(len(p.jobs) for p in list(self._passes) if p.steps is None)

    @property
    def frames_waiting(self) -> int:
        return (sum(job.frames for job in list(self._waiting))
                + sum(p.frames for p in list(self._passes) if p.steps is None))

    def _loop(self) -> None:
        passes = self._passes
        while True:
            with self._wake:
                while not self._waiting and not passes and not self._closed:
                    self._wake.wait()
                if not self._waiting and not passes:
                    return
                while self._waiting:
                    passes.append(_Pass(self._take(), self.run_batch))
            current = min(passes, key=lambda p: p.frames)  # the fewest frames; of equals the oldest
            try:
                results = current.step()
            except Exception as err:  # noqa: BLE001 - handed to the waiting request threads
                passes.remove(current)
                if len(current.jobs) > 1:
                    passes.extend(_Pass([job], self.run_batch) for job in current.jobs)
                else:
                    current.jobs[0].error = err
                    current.jobs[0].done.set()
                continue
            if results is not None:
                passes.remove(current)
                self._finish(current, results)

    def _take(self) -> list[TowerJob]:
        """The oldest job and the waiting jobs of its key that fit beside it, in arrival order."""
        first = self._waiting.popleft()
        batch, frames, others = [first], first.frames, deque()
        for job in self._waiting:
            if len(batch) < self.max_requests and job.key == first.key and frames + job.frames <= self.max_frames:
                batch.append(job)
                frames += job.frames
            else:
                others.append(job)
        self._waiting = others
        return batch

    def _finish(self, done: _Pass, results: list[object]) -> None:
        self.batches_run += 1
        for job, result in zip(done.jobs, results):
            job.result = result
            job.queue_ms = (done.started - job.submitted_at) * 1e3
            job.batch_requests, job.batch_frames = len(done.jobs), done.frames
            job.done.set()

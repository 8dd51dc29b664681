"""Frames of concurrent requests batched through the vision tower by one device worker.

Requests decode and preprocess on their own threads, then wait here. A single worker thread owns
the device: whenever it is free it takes the oldest waiting request and the other waiting
requests with the same layer schedule (`VisionEncoder.schedule`), up to `max_requests` requests
and `max_frames` sampled frames in all, and runs them as one batch (`VisionEncoder.encode_batch`). Nothing waits for a
batch to fill: a request that finds the device idle runs at once, alone. Frames never interact
inside a SigLIP layer and EarlyTom's steps run per request, so a request's tokens do not depend
on its batch; if a batch fails, each of its requests is retried alone, so that one request's
failure is its own.

Batching gains little in the tower itself, whose matrix products are already efficient at one
request's frames, and it costs end to end: the requests of a pass finish together and reach the
LLM in bursts, and each waits for the whole pass. So the service's default is one request per
pass (`EncoderSettings.batch_max_requests`); the measurements are in docs/bench/README.md.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
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


class TowerBatcher:
    def __init__(self, run_batch: Callable[[list[TowerJob]], list[object]], max_frames: int, max_requests: int):
        """run_batch: jobs of one key -> one result each, in order (runs on the worker thread)."""
        self.run_batch = run_batch
        self.max_frames = max_frames
        self.max_requests = max_requests
        self._waiting: deque[TowerJob] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches_run = 0
        self._worker = threading.Thread(target=self._loop, name="tower-batcher", daemon=True)
        self._worker.start()

    def run(self, job: TowerJob) -> TowerJob:
        """Queue the job and wait for its batch; raises what its encode raised."""
        if job.frames > self.max_frames:
            raise ValueError(f"{job.frames} frames exceed the batch limit of {self.max_frames}")
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

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if not self._waiting:
                    return
                batch = self._take()
            self._run(batch)

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

    def _run(self, batch: list[TowerJob]) -> None:
        started = time.perf_counter()
        try:
            results = self.run_batch(batch)
        except Exception as err:  # noqa: BLE001 - handed to the waiting request threads
            if len(batch) > 1:
                for job in batch:
                    self._run([job])
                return
            results, batch[0].error = [None], err
        self.batches_run += 1
        frames = sum(job.frames for job in batch)
        for job, result in zip(batch, results):
            job.result = result
            job.queue_ms = (started - job.submitted_at) * 1e3
            job.batch_requests, job.batch_frames = len(batch), frames
            job.done.set()

"""Continuous batching: one thread owns the model, admits requests between decode steps and
decodes every admitted request together.

Each loop turn prefills the requests waiting for a slot (one at a time, so a new request's first
token is not held behind the others' answers), then runs one decode step for all active ones and
hands each its token. A request leaves its slot when it reaches EOS or max_tokens, when its consumer
stops reading (stop string, closed stream) or when it is cancelled; the hole is filled at once so
the active requests stay in slots 0..n-1. Consumers read their tokens from their own queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_service.request import GenerationRequest
from llm_service.runner import ModelRunner
from llm_service.sampling import Sampler

log = logging.getLogger(__name__)


@dataclass
class First:
    token: int
    queue_ms: float
    prefill_ms: float
    ttft_ms: float


@dataclass
class Ended:
    """The batcher retired the sequence before its consumer finished it (cancelled or abandoned)."""


@dataclass
class Failed:
    error: Exception


@dataclass
class Sequence:
    """One request while the batcher works on it; `events` carries First, ints, Ended or Failed."""

    request: GenerationRequest
    ids: list[int]
    sampler: Sampler
    max_tokens: int
    eos_ids: frozenset[int]
    is_cancelled: Callable[[], bool]
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)  # the consumer needs no more tokens
    submitted_at: float = field(default_factory=time.perf_counter)
    generated: int = 0
    last: int = 0

    def finished(self) -> bool:
        return (self.last in self.eos_ids or self.generated >= self.max_tokens or self.done.is_set()
                or self.is_cancelled())


class Batcher:
    def __init__(self, runner: ModelRunner, prefill: Callable[[Sequence, int], torch.Tensor]):
        """prefill(sequence, slot) fills the slot with the request's prompt and returns its last logits [V]."""
        self.runner = runner
        self.prefill = prefill
        self._pending: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._active: list[Sequence] = []  # index = slot
        self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            self._pending.append(sequence)
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._active:
                    self._wake.wait()
                admitted = []
                while self._pending and len(self._active) + len(admitted) < self.runner.slots:
                    admitted.append(self._pending.popleft())
            for sequence in admitted:
                self._admit(sequence)
            self._retire()  # before the step: an answer may end at its first token
            if self._active:
                self._step()

    def _admit(self, sequence: Sequence) -> None:
        if sequence.done.is_set() or sequence.is_cancelled():
            sequence.events.put(Ended())
            return
        slot = len(self._active)
        queue_ms = (time.perf_counter() - sequence.submitted_at) * 1e3
        start = time.perf_counter()
        try:
            logits = self.prefill(sequence, slot)  # [V]
            token = sequence.sampler(logits)
        except Exception as err:  # noqa: BLE001 - the request's consumer raises it
            self.runner.free(slot)
            sequence.events.put(Failed(err))
            return
        now = time.perf_counter()
        sequence.generated, sequence.last = 1, token
        sequence.events.put(First(token, queue_ms, (now - start) * 1e3, (now - sequence.request.arrived_at) * 1e3))
        self._active.append(sequence)

    def _step(self) -> None:
        active = self._active
        try:
            logits = self.runner.decode(len(active), [s.last for s in active])  # [n, V]
            tokens = logits.argmax(dim=-1).tolist()
            for row, sequence in enumerate(active):
                if not sequence.sampler.greedy:
                    tokens[row] = sequence.sampler(logits[row])
        except Exception as err:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed for %d requests", len(active))
            for slot, sequence in enumerate(active):
                self.runner.free(slot)
                sequence.events.put(Failed(err))
            active.clear()
            return
        for sequence, token in zip(active, tokens):
            sequence.generated += 1
            sequence.last = token
            sequence.events.put(token)

    def _retire(self) -> None:
        active = self._active
        for slot in reversed(range(len(active))):
            sequence = active[slot]
            if not sequence.finished():
                continue
            last = len(active) - 1
            if slot != last:
                self.runner.move(last, slot)
                active[slot] = active[last]
            else:
                self.runner.free(slot)
            active.pop()
            sequence.events.put(Ended())

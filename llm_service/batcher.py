"""Continuous batching: one thread owns the model, admits requests between decode steps, decodes
every admitted request together, and alone decides when each one ends.

Each loop turn has the shape of nano-vllm's engine loop (schedule, run, postprocess):
  1. admit: prefill the sequences waiting for a slot, one at a time (so a new request's first token
     is not held behind the others' answers), and sample each one's first token;
  2. retire: end the cancelled sequences, and give back the slots of every sequence that ended; the
     hole is filled at once, so the active sequences stay in slots 0..n-1;
  3. step: one decode step for all active sequences, then each one's token is appended; retire again,
     so that the slots freed are free for the next turn's admissions.

Who decides what:
  - `_append` (postprocess) takes each new token: it turns the token into text (the sequence's
    TextOutput: detokenizer and stop strings) and decides whether the sequence ends with it: EOS ->
    "stop", a stop string -> "stop", max_tokens -> "length". EOS counts as a completion token.
  - `_retire` (and `_admit`, for a sequence still waiting) decides "cancelled": the request's
    is_cancelled() is true, or its consumer stopped reading (`Sequence.closed`, set by the consumer's
    thread: a signal, not a decision).
  - `_finish` is the one place a sequence ends: it records the reason and sends the last text and
    Finished(reason, completion tokens). `_fail` ends a sequence with an error (a failed prefill or
    decode step, or a tokenizer error) and sends Failed.
The consumer (LLMEngine._stream) decides nothing: it reads its sequence's events (Started, Text,
Finished, Failed) and turns them into the engine's deltas and final event; once its request is
cancelled it passes on no more text and waits for the batcher's Finished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from llm_service.detokenizer import TextOutput
from llm_service.request import GenerationRequest
from llm_service.runner import ModelRunner
from llm_service.sampling import Sampler

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Started:
    """The prompt is in its slot and the first token is sampled."""

    queue_ms: float
    prefill_ms: float
    ttft_ms: float


@dataclass
class Text:
    text: str


@dataclass
class Finished:
    reason: FinishReason
    completion_tokens: int


@dataclass
class Failed:
    error: Exception


SequenceEvent = Started | Text | Finished | Failed


@dataclass
class Sequence:
    """One request while the batcher works on it. The engine makes it; after `Batcher.submit` only the
    batcher thread changes it, except `closed`, which the consumer sets when it stops reading."""

    request: GenerationRequest
    ids: list[int]  # the prompt's token ids
    sampler: Sampler
    eos_ids: frozenset[int]
    text: TextOutput
    events: queue.SimpleQueue[SequenceEvent] = field(default_factory=queue.SimpleQueue)
    closed: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.perf_counter)
    generated: int = 0  # tokens sampled so far
    last: int = 0  # the latest of them: the input of the next decode step
    ended: bool = False  # finished or failed; its slot is given back at the next retire

    def cancelled(self) -> bool:
        return self.closed.is_set() or self.request.is_cancelled()


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
            for sequence in self._admissions():
                self._admit(sequence)
            self._retire()  # before the step: an answer may end at its first token
            if self._active:
                self._step()
                self._retire()

    def _admissions(self) -> list[Sequence]:
        """Wait until there is work; take the waiting sequences that fit the free slots."""
        with self._wake:
            while not self._pending and not self._active:
                self._wake.wait()
            free = self.runner.slots - len(self._active)
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _admit(self, sequence: Sequence) -> None:
        if sequence.cancelled():
            self._finish(sequence, "cancelled")
            return
        slot = len(self._active)
        queue_ms = (time.perf_counter() - sequence.submitted_at) * 1e3
        start = time.perf_counter()
        try:
            logits = self.prefill(sequence, slot)  # [V]
            token = sequence.sampler(logits)
        except Exception as err:  # noqa: BLE001 - the request's consumer raises it
            self.runner.free(slot)
            self._fail(sequence, err)
            return
        now = time.perf_counter()
        sequence.events.put(Started(queue_ms, (now - start) * 1e3, (now - sequence.request.arrived_at) * 1e3))
        self._active.append(sequence)
        self._append(sequence, token)

    def _step(self) -> None:
        active = self._active
        try:
            logits = self.runner.decode(len(active), [s.last for s in active])  # [n, V], row b = slot b
            tokens = logits.argmax(dim=-1).tolist()
            for slot, sequence in enumerate(active):
                if not sequence.sampler.greedy:
                    tokens[slot] = sequence.sampler(logits[slot])
        except Exception as err:  # noqa: BLE001 - fail the batch, keep serving
            log.exception("decode step failed for %d requests", len(active))
            for slot, sequence in enumerate(active):
                self.runner.free(slot)
                self._fail(sequence, err)
            active.clear()
            return
        for sequence, token in zip(active, tokens):
            self._append(sequence, token)

    def _append(self, sequence: Sequence, token: int) -> None:
        """Postprocess one sampled token: its text, and whether the sequence ends with it."""
        sequence.generated += 1
        sequence.last = token
        try:
            if token in sequence.eos_ids:
                self._finish(sequence, "stop", sequence.text.close())
                return
            text, stop_hit = sequence.text.add(token)
            if stop_hit:
                self._finish(sequence, "stop", text)
            elif sequence.generated >= sequence.request.sampling.max_tokens:
                self._finish(sequence, "length", text + sequence.text.close())
            elif text:
                sequence.events.put(Text(text))
        except Exception as err:  # noqa: BLE001 - a tokenizer error fails this request, not the batch
            log.exception("turning a token into text failed")
            self._fail(sequence, err)

    def _finish(self, sequence: Sequence, reason: FinishReason, text: str = "") -> None:
        """The one place a sequence ends; its slot (if it has one) is given back by `_retire`."""
        sequence.ended = True
        if text:
            sequence.events.put(Text(text))
        sequence.events.put(Finished(reason, sequence.generated))

    def _fail(self, sequence: Sequence, error: Exception) -> None:
        sequence.ended = True
        sequence.events.put(Failed(error))

    def _retire(self) -> None:
        """End the cancelled sequences; give back the slots of all that ended, keeping slots dense."""
        active = self._active
        for slot in reversed(range(len(active))):
            sequence = active[slot]
            if not sequence.ended:
                if not sequence.cancelled():
                    continue
                self._finish(sequence, "cancelled")
            last = len(active) - 1
            if slot != last:
                self.runner.move(last, slot)
                active[slot] = active[last]
            else:
                self.runner.free(slot)
            active.pop()

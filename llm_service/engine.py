"""The generation engine: validation, prefill of one request, and the streamed answer.

Knows nothing of gRPC. `generate` is a generator of events (text deltas, then one final event);
the caller stops consuming it, or its `is_cancelled` turns true, and decoding stops at the next
token. The batcher thread (llm_service/batcher.py) owns the model and every sequence's end: it
prefills each request into a slot of the static KV cache, decodes all admitted requests together,
turns their tokens into text (stop strings included) and decides when and why each ends. This
module validates requests, prefills them (on the batcher's thread) and turns a sequence's events
into deltas and the final event with the usage and timings. The time a request waits for a free
slot is `queue_ms`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llm_service.batcher import Batcher, Finished, FinishReason, Sequence, Started, Text
from llm_service.detokenizer import TextOutput
from llm_service.model import LanguageModel
from llm_service.prefix_cache import PrefixCache, PrefixKV
from llm_service.request import GenerationRequest
from llm_service.runner import ModelRunner, StageThree
from llm_service.prompt import VIDEO, PromptError, render
from llm_service.sampling import Sampler
from videollm.checkpoint import check_model_dir, model_identity
from videollm.flops import prefill_flops
from videollm.settings import LLMSettings

__all__ = ["Delta", "Final", "GenerateRequestError", "GenerationRequest", "LLMEngine", "Overloaded"]


class GenerateRequestError(ValueError):
    """The request cannot be served as given; the message says why."""


class ContextTooLong(GenerateRequestError):
    """The prompt, its visual tokens and max_tokens exceed the context; `visual_fit` visual tokens
    would fit with this prompt and max_tokens (0 or less: none would)."""

    def __init__(self, message: str, visual_fit: int):
        super().__init__(message)
        self.visual_fit = visual_fit


class Overloaded(RuntimeError):
    pass


@dataclass
class Delta:
    text: str


@dataclass
class Final:
    finish_reason: FinishReason  # as the batcher decided it
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int
    queue_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    receive_ms: float
    prefill_flops: float = 0.0
    prefill_flops_uncompressed: float = 0.0


def _ms_since(mark: float) -> float:
    return (time.perf_counter() - mark) * 1e3


class LLMEngine:
    def __init__(self, settings: LLMSettings):
        self.settings = settings
        model_dir = check_model_dir(settings.model)
        self.model_id = model_identity(model_dir)
        self.lm = LanguageModel(model_dir, settings.device, settings.torch_dtype_name())
        self.runner = ModelRunner(self.lm.model, settings.decode_slots, settings.max_context_tokens)
        self.runner.capture_graphs()
        self._admission = threading.BoundedSemaphore(settings.max_concurrent)
        self._count_lock = threading.Lock()
        self.generations_completed = 0
        self.requests_in_flight = 0
        self.prefixes = PrefixCache(settings.prefix_cache_entries)
        self.batcher = Batcher(self.runner, self._prefill)

    def prefix_key(self, request: GenerationRequest, ids: list[int]) -> str | None:
        """The key of this request's reusable prefix, or None when it has none (or uses Stage III)."""
        if (not request.video_key or request.inner is not None or self.lm.video_token_id not in ids
                or ids[-1] == self.lm.video_token_id or self.prefixes.max_entries <= 0):
            return None
        return PrefixCache.key(request.video_key, ids[: ids.index(self.lm.video_token_id)])

    def needs_visual(self, request: GenerationRequest) -> bool:
        """False when this replica holds the request's prefix, so the visual tokens need not travel.

        The entry is then held by the request, so an eviction while it waits cannot lose it.
        """
        try:
            ids = render(self.lm, request.messages)
        except (ValueError, PromptError):
            return True  # let prepare() report it
        key = self.prefix_key(request, ids)
        request.prefix_entry = self.prefixes.get(key) if key is not None else None
        return request.prefix_entry is None

    def prepare(self, request: GenerationRequest) -> list[int]:
        """Validate the request and return the prompt ids (raises GenerateRequestError)."""
        try:
            request.sampling.validate(self.settings.max_tokens_limit)
            ids = render(self.lm, request.messages)
        except (ValueError, PromptError) as err:
            raise GenerateRequestError(str(err)) from err
        video_parts = sum(part is VIDEO for m in request.messages for part in m.parts)
        placeholders = ids.count(self.lm.video_token_id)
        if video_parts > 1:
            raise GenerateRequestError("at most one video per request is supported")
        if video_parts != placeholders:
            raise GenerateRequestError(
                f"the text must not contain the video placeholder {self.lm.video_token!r}; "
                "pass the video as a video part instead"
            )
        prefix = self.prefix_key(request, ids)
        cached = prefix is not None and request.visual is None and (
            request.prefix_entry is not None or prefix in self.prefixes)
        if (request.visual is None and not cached) != (video_parts == 0):
            raise GenerateRequestError("visual tokens are needed exactly when a message has a video part")
        if request.visual is not None:
            if request.visual.ndim != 2 or request.visual.shape[1] != self.lm.hidden_size:
                raise GenerateRequestError(
                    f"visual tokens must have shape [N, {self.lm.hidden_size}], got {list(request.visual.shape)}"
                )
        if request.inner is not None:
            if request.visual is None:
                raise GenerateRequestError("inner compression (Stage III) needs a video")
            try:
                request.inner.resolve(self.lm.model.config.num_hidden_layers)
            except ValueError as err:
                raise GenerateRequestError(str(err)) from err
        visual = request.visual.shape[0] if request.visual is not None else request.visual_count
        context = len(ids) - placeholders + visual + request.sampling.max_tokens
        if context > self.settings.max_context_tokens:
            raise ContextTooLong(
                f"prompt ({len(ids) - placeholders} text + {visual} visual tokens) plus max_tokens "
                f"({request.sampling.max_tokens}) is {context} tokens; the limit is {self.settings.max_context_tokens}",
                self.settings.max_context_tokens - (context - visual))
        return ids

    def _embed(self, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
        lm = self.lm
        embeds = lm.model.get_input_embeddings()(torch.tensor(ids, device=lm.device))  # [L, D]
        if visual is None:
            return embeds
        at = ids.index(lm.video_token_id)
        visual = visual.to(lm.device, lm.dtype)  # [N, D]
        return torch.cat([embeds[:at], visual, embeds[at + 1 :]], dim=0)  # [L - 1 + N, D]

    @torch.inference_mode()
    def _prefill(self, sequence: Sequence, slot: int) -> torch.Tensor:
        """Runs on the batcher thread: the request's prompt into `slot` -> logits of its last token [V]."""
        request, ids, runner = sequence.request, sequence.ids, self.runner
        prefix = self.prefix_key(request, ids)
        if prefix is None:
            merge = None
            if request.inner is not None:
                # Stage III shortens this request's sequence inside the model; it depends on the
                # question, so its KV cache is never shared with another request.
                settings = request.inner.resolve(self.lm.model.config.num_hidden_layers)
                merge = StageThree(settings, ids.index(self.lm.video_token_id), request.visual.shape[0])
            return runner.prefill(slot, self._embed(ids, request.visual), 0, merge)
        # The chat up to and including the video is kept once per replica; repeat questions prefill only the rest.
        at = ids.index(self.lm.video_token_id)
        entry = request.prefix_entry or self.prefixes.get(prefix)
        if entry is None:
            if request.visual is None:
                raise GenerateRequestError("the video's prefix was evicted; send the visual tokens again")
            logits = runner.prefill(slot, self._embed(ids, request.visual), 0)  # the whole prompt, one pass
            self.prefixes.put(prefix, PrefixKV(*runner.read_prefix(slot, at + request.visual.shape[0])))
            return logits
        runner.write(slot, entry.layers, entry.position)
        return runner.prefill(slot, self._embed(ids[at + 1 :], None), entry.position)

    def generate(self, request: GenerationRequest) -> Iterator[Delta | Final]:
        ids = self.prepare(request)
        if not self._admission.acquire(blocking=False):
            raise Overloaded(f"the LLM has {self.settings.max_concurrent} requests in flight; retry later")
        sequence = Sequence(request, ids, Sampler(request.sampling, self.lm.device), frozenset(self.lm.eos_token_ids),
                            TextOutput(self.lm.tokenizer, request.sampling.stop))
        with self._count_lock:
            self.requests_in_flight += 1
        try:
            self.batcher.submit(sequence)
            yield from self._stream(request, sequence)
        finally:  # ended, or the consumer stopped reading: then the batcher ends it and frees its slot
            sequence.closed.set()
            with self._count_lock:
                self.generations_completed += 1
                self.requests_in_flight -= 1
            self._admission.release()

    def _stream(self, request: GenerationRequest, sequence: Sequence) -> Iterator[Delta | Final]:
        """The sequence's events as deltas and the final event; the batcher decides when and why it ends."""
        started, decode_start = None, time.perf_counter()
        while True:
            event = sequence.events.get()
            if isinstance(event, Text):
                if not request.is_cancelled():  # a cancelled request gets no more text; the batcher ends it
                    yield Delta(event.text)
            elif isinstance(event, Started):
                started, decode_start = event, time.perf_counter()
            elif isinstance(event, Finished):
                finished = event
                break
            else:
                raise event.error
        if started is None:  # cancelled while waiting for a slot
            waited = _ms_since(request.arrived_at)
            started, decode_start = Started(waited, 0.0, waited), time.perf_counter()
        decode_ms = _ms_since(decode_start)
        completion = finished.completion_tokens
        lm = self.lm
        has_video = lm.video_token_id in sequence.ids
        visual_tokens = request.visual.shape[0] if request.visual is not None else request.visual_count
        text_tokens = len(sequence.ids) - has_video
        uncompressed = request.uncompressed_visual_tokens or visual_tokens
        yield Final(
            finish_reason=finished.reason,
            prompt_tokens=text_tokens,
            visual_tokens=visual_tokens,
            completion_tokens=completion,
            queue_ms=started.queue_ms,
            prefill_ms=started.prefill_ms,
            ttft_ms=started.ttft_ms,
            decode_ms=decode_ms,
            decode_tokens_per_s=(completion - 1) / (decode_ms / 1e3) if completion > 1 and decode_ms > 0 else 0.0,
            receive_ms=request.receive_ms,
            prefill_flops=prefill_flops(lm.model.config, text_tokens + visual_tokens),
            prefill_flops_uncompressed=prefill_flops(lm.model.config, text_tokens + uncompressed),
        )

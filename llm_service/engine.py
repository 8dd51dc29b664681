"""The generation engine: validation, prefill of one request, and the streamed answer.

Knows nothing of gRPC. `generate` is a generator of events (text deltas, then one final event);
the caller stops consuming it, or its `is_cancelled` turns true, and decoding stops at the next
token. The batcher thread (llm_service/batcher.py) owns the model: it prefills each request into a
slot of the static KV cache and decodes all admitted requests together; this module turns a
request's tokens into text, applies stop strings and reports the timings. The time a request
waits for a free slot is `queue_ms`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llm_service.batcher import Batcher, Ended, Failed, First, Sequence
from llm_service.detokenizer import IncrementalDetokenizer
from llm_service.model import LanguageModel
from llm_service.prefix_cache import PrefixCache, PrefixKV
from llm_service.request import GenerationRequest
from llm_service.runner import ModelRunner, StageThree
from llm_service.prompt import VIDEO, PromptError, render
from llm_service.sampling import Sampler
from videollm.checkpoint import check_model_dir, model_identity
from videollm.flops import prefill_flops
from videollm.settings import LLMSettings

__all__ = ["Delta", "Final", "GenerateRequestError", "GenerationRequest", "LLMEngine", "Overloaded", "StopMatcher"]


class GenerateRequestError(ValueError):
    """The request cannot be served as given; the message says why."""


class Overloaded(RuntimeError):
    pass


@dataclass
class Delta:
    text: str


@dataclass
class Final:
    finish_reason: str  # "stop" | "length" | "cancelled"
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


class StopMatcher:
    """Holds back text that may be the start of a stop string; cuts the text at the first stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Append piece; return (text safe to emit now, whether a stop string was hit)."""
        self.text += piece
        search_from = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stops) if i >= 0]
        if hits:
            out = self.text[self.emitted : min(hits)]
            self.emitted = len(self.text)
            return out, True
        safe_end = max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : safe_end]
        self.emitted = safe_end
        return out, False

    def rest(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


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
            raise GenerateRequestError(
                f"prompt ({len(ids) - placeholders} text + {visual} visual tokens) plus max_tokens "
                f"({request.sampling.max_tokens}) is {context} tokens; the limit is {self.settings.max_context_tokens}"
            )
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
        sequence = Sequence(request, ids, Sampler(request.sampling, self.lm.device), request.sampling.max_tokens,
                            frozenset(self.lm.eos_token_ids), request.is_cancelled)
        try:
            self.batcher.submit(sequence)
            yield from self._stream(request, sequence)
        finally:  # finished, stopped, cancelled or abandoned: the batcher frees its slot
            sequence.done.set()
            with self._count_lock:
                self.generations_completed += 1
            self._admission.release()

    def _stream(self, request: GenerationRequest, sequence: Sequence) -> Iterator[Delta | Final]:
        lm, params = self.lm, request.sampling
        detok = IncrementalDetokenizer(lm.tokenizer)
        stops = StopMatcher(params.stop)
        first = sequence.events.get()
        if isinstance(first, Failed):
            raise first.error
        decode_start = time.perf_counter()
        if isinstance(first, Ended):  # cancelled while waiting for a slot
            first = First(0, _ms_since(request.arrived_at), 0.0, _ms_since(request.arrived_at))
            completion, finish, stop_hit = 0, "cancelled", False
        else:
            completion, finish, stop_hit = 0, "length", False
            token = first.token
            while True:
                completion += 1
                if token in lm.eos_token_ids:
                    finish = "stop"
                    break
                text, hit = stops.feed(detok.add(token))
                if text:
                    yield Delta(text)
                if hit:
                    finish, stop_hit = "stop", True
                    break
                if completion >= params.max_tokens:
                    break
                if request.is_cancelled():
                    finish = "cancelled"
                    break
                event = sequence.events.get()
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Ended):
                    finish = "cancelled"
                    break
                token = event
        if not stop_hit and finish != "cancelled":
            tail, hit = stops.feed(detok.flush())
            if not hit:
                tail += stops.rest()
            if tail:
                yield Delta(tail)
        decode_ms = _ms_since(decode_start)
        has_video = lm.video_token_id in sequence.ids
        visual_tokens = request.visual.shape[0] if request.visual is not None else request.visual_count
        text_tokens = len(sequence.ids) - has_video
        uncompressed = request.uncompressed_visual_tokens or visual_tokens
        yield Final(
            finish_reason=finish,
            prompt_tokens=text_tokens,
            visual_tokens=visual_tokens,
            completion_tokens=completion,
            queue_ms=first.queue_ms,
            prefill_ms=first.prefill_ms,
            ttft_ms=first.ttft_ms,
            decode_ms=decode_ms,
            decode_tokens_per_s=(completion - 1) / (decode_ms / 1e3) if completion > 1 and decode_ms > 0 else 0.0,
            receive_ms=request.receive_ms,
            prefill_flops=prefill_flops(lm.model.config, text_tokens + visual_tokens),
            prefill_flops_uncompressed=prefill_flops(lm.model.config, text_tokens + uncompressed),
        )

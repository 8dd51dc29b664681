"""The generation engine: prompt + visual tokens -> one prefill with a KV cache -> streamed decode.

Knows nothing of gRPC. `generate` is a generator of events (text deltas, then one final event);
the caller stops consuming it, or its `is_cancelled` turns true, and decoding stops at the next
token. One request at a time holds the device; the time spent waiting for it is `queue_ms`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llm_service.detokenizer import IncrementalDetokenizer
from llm_service.inner_merge import InnerMerge, InnerMergeSettings
from llm_service.prefix_cache import PrefixCache, PrefixKV
from llm_service.model import LanguageModel
from llm_service.prompt import VIDEO, Message, PromptError, render
from llm_service.sampling import Sampler, SamplingParams
from videollm.checkpoint import check_model_dir, model_identity
from videollm.flops import prefill_flops
from videollm.settings import LLMSettings


class GenerateRequestError(ValueError):
    """The request cannot be served as given; the message says why."""


class Overloaded(RuntimeError):
    pass


@dataclass
class GenerationRequest:
    messages: list[Message]
    sampling: SamplingParams
    visual: torch.Tensor | None = None  # [N, D] visual tokens, or None for a text-only chat
    is_cancelled: Callable[[], bool] = lambda: False
    arrived_at: float = field(default_factory=time.perf_counter)
    receive_ms: float = 0.0
    uncompressed_visual_tokens: int = 0  # what the video would cost without compression (FLOPs estimate)
    inner: tuple[int, float] | None = None  # EarlyTom Stage III (layer, drop ratio; 0 = defaults), or None
    video_key: str = ""  # identity of the visual tokens; enables reuse of this prefix's KV cache
    visual_count: int = 0  # rows of the visual tensor when it was not sent (the prefix is cached here)
    prefix_entry: PrefixKV | None = None  # the cached prefix, held from the moment the tokens were declined


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
        self._device_lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(settings.max_concurrent)
        self._count_lock = threading.Lock()
        self.generations_completed = 0
        self.prefixes = PrefixCache(settings.prefix_cache_entries)

    def prefix_key(self, request: GenerationRequest, ids: list[int]) -> str | None:
        """The key of this request's reusable prefix, or None when it has none (or uses Stage III)."""
        if (not request.video_key or request.inner is not None or self.lm.video_token_id not in ids
                or self.prefixes.max_entries <= 0):
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
                InnerMergeSettings.resolve(self.lm.model.config.num_hidden_layers, *request.inner)
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
        ids_t = torch.tensor(ids, device=lm.device)
        embeds = lm.model.get_input_embeddings()(ids_t)  # [L, D]
        if visual is None:
            return embeds[None]
        at = ids.index(lm.video_token_id)
        visual = visual.to(lm.device, lm.dtype)  # [N, D]
        return torch.cat([embeds[:at], visual, embeds[at + 1 :]], dim=0)[None]  # [1, L - 1 + N, D]

    def generate(self, request: GenerationRequest) -> Iterator[Delta | Final]:
        ids = self.prepare(request)
        if not self._admission.acquire(blocking=False):
            raise Overloaded(f"the LLM has {self.settings.max_concurrent} requests in flight; retry later")
        try:
            queued = time.perf_counter()
            with self._device_lock:
                queue_ms = _ms_since(queued)
                try:
                    yield from self._generate(request, ids, queue_ms)
                finally:  # finished, stopped, cancelled or abandoned: the device is free again
                    with self._count_lock:
                        self.generations_completed += 1
        finally:
            self._admission.release()

    def _generate(self, request: GenerationRequest, ids: list[int], queue_ms: float) -> Iterator[Delta | Final]:
        with contextlib.ExitStack() as stack:
            if request.inner is not None:
                # Stage III shortens this request's sequence inside the model; it depends on the
                # question, so its KV cache is never shared with another request.
                settings = InnerMergeSettings.resolve(self.lm.model.config.num_hidden_layers, *request.inner)
                stack.enter_context(InnerMerge(
                    self.lm.model.model.layers, settings, ids.index(self.lm.video_token_id), request.visual.shape[0]
                ))
            yield from self._decode(request, ids, queue_ms)

    @torch.inference_mode()
    def _decode(self, request: GenerationRequest, ids: list[int], queue_ms: float) -> Iterator[Delta | Final]:
        from transformers import DynamicCache

        lm, params = self.lm, request.sampling
        sampler = Sampler(params, lm.device)
        detok = IncrementalDetokenizer(lm.tokenizer)
        stops = StopMatcher(params.stop)

        start = time.perf_counter()
        cache = DynamicCache(config=lm.model.config)
        prefix = self.prefix_key(request, ids)
        if prefix is None:
            out = lm.model(
                inputs_embeds=self._embed(ids, request.visual), **{lm.cache_arg: cache}, use_cache=True,
                logits_to_keep=1,
            )
        else:  # prefill the prefix (chat up to the video) once per replica; then only the rest
            at = ids.index(lm.video_token_id)
            entry = request.prefix_entry or self.prefixes.get(prefix)
            if entry is None:
                if request.visual is None:
                    raise GenerateRequestError("the video's prefix was evicted; send the visual tokens again")
                lm.model(inputs_embeds=self._embed(ids[: at + 1], request.visual), **{lm.cache_arg: cache},
                         use_cache=True, logits_to_keep=1)
                self.prefixes.put(prefix, PrefixKV.from_cache(cache))
            else:
                entry.seed(cache)
            out = lm.model(input_ids=torch.tensor([ids[at + 1 :]], device=lm.device), **{lm.cache_arg: cache},
                           use_cache=True, logits_to_keep=1)
        token = sampler(out.logits[0, -1])
        prefill_ms = _ms_since(start)
        ttft_ms = _ms_since(request.arrived_at)

        decode_start = time.perf_counter()
        completion, finish, stop_hit = 0, "length", False
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
            out = lm.model(input_ids=torch.tensor([[token]], device=lm.device), **{lm.cache_arg: cache}, use_cache=True)
            token = sampler(out.logits[0, -1])
        if not stop_hit and finish != "cancelled":
            tail, hit = stops.feed(detok.flush())
            if not hit:
                tail += stops.rest()
            if tail:
                yield Delta(tail)
        del cache
        decode_ms = _ms_since(decode_start)
        has_video = lm.video_token_id in ids
        visual_tokens = request.visual.shape[0] if request.visual is not None else request.visual_count
        text_tokens = len(ids) - has_video
        uncompressed = request.uncompressed_visual_tokens or visual_tokens
        yield Final(
            finish_reason=finish,
            prompt_tokens=text_tokens,
            visual_tokens=visual_tokens,
            completion_tokens=completion,
            queue_ms=queue_ms,
            prefill_ms=prefill_ms,
            ttft_ms=ttft_ms,
            decode_ms=decode_ms,
            decode_tokens_per_s=(completion - 1) / (decode_ms / 1e3) if completion > 1 and decode_ms > 0 else 0.0,
            receive_ms=request.receive_ms,
            prefill_flops=prefill_flops(lm.model.config, text_tokens + visual_tokens),
            prefill_flops_uncompressed=prefill_flops(lm.model.config, text_tokens + uncompressed),
        )

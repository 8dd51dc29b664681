"""What a caller asks of the LLM engine: one chat to answer, with its sampling and its video."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_service.prefix_cache import PrefixKV
from llm_service.prompt import Message
from llm_service.sampling import SamplingParams
from videollm.settings import InnerCompressionSettings


@dataclass
class GenerationRequest:
    messages: list[Message]
    sampling: SamplingParams
    visual: torch.Tensor | None = None  # [N, D] visual tokens, or None for a text-only chat
    is_cancelled: Callable[[], bool] = lambda: False
    arrived_at: float = field(default_factory=time.perf_counter)
    receive_ms: float = 0.0
    uncompressed_visual_tokens: int = 0  # what the video would cost without compression (FLOPs estimate)
    inner: InnerCompressionSettings | None = None  # EarlyTom Stage III, or None
    video_key: str = ""  # identity of the visual tokens; enables reuse of this prefix's KV cache
    visual_count: int = 0  # rows of the visual tensor when it was not sent (the prefix is cached here)
    prefix_entry: PrefixKV | None = None  # the cached prefix, held from the moment the tokens were declined

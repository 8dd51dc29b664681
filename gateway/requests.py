"""A chat completion as the gateway handles it: the request in its own terms, and what happened to it.

openai_format.py makes a ChatRequest of the REST body; the pipeline fills the Outcome; the
response's `videollm` object reports it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.cache import cache_key
from gateway.errors import APIError, bad_request
from gateway.videos import Video
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.frame_sampling import FrameSampling, SamplingError, retain_for_budget, worst_case_tokens
from videollm.proto_mapping import (compression_from_proto, compression_to_proto, describe_validation_error,
                                    error_path, sampling_to_proto)
from videollm.settings import CompressionSettings


@dataclass(frozen=True)
class EncodeJob:
    """A video with its sampling and compression settings resolved: what the encoder is asked for,
    and the cache key of the tokens it makes."""

    video: Video
    sampling: FrameSampling  # resolved
    max_visual_tokens: int  # 0 = no ceiling
    compression: CompressionSettings
    key: str

    def message(self, offer_pull: bool = False) -> encoder_pb2.EncodeRequest:
        """The request without its video (the pipeline adds the bytes, or the ticket of their file);
        offer_pull: ask the encoder to keep the tokens for the LLM to take."""
        return encoder_pb2.EncodeRequest(
            sampling=sampling_to_proto(self.sampling),
            compression=compression_to_proto(self.compression),
            offer_pull=offer_pull,
            max_visual_tokens=self.max_visual_tokens,
            image_sizes=self.video.image_sizes,
        )


@dataclass
class VideoRequest:
    video: Video
    sampling: FrameSampling  # as asked
    compression: dict  # overrides of the encoder's default compression settings
    max_visual_tokens: int | None = None

    def resolve(self, info: encoder_pb2.EncoderInfo) -> EncodeJob:
        """The encoder's defaults (from its Info) filled in and every check made that needs no video;
        400 when one fails (the encoder checks the rest against the video before decoding it)."""
        if self.video.image_sizes and len(self.video.image_sizes) > info.max_frames:
            raise bad_request(f"{len(self.video.image_sizes)} images were sent as a video's frames; the encoder takes "
                              f"at most {info.max_frames} frames a request", "messages")
        try:
            sampling = self.sampling.resolve(info.default_frames, info.max_frames)
        except SamplingError as err:
            raise bad_request(str(err), err.param) from err
        defaults = compression_from_proto(info.default_compression, CompressionSettings())
        try:
            compression = defaults.overridden(self.compression)
        except ValidationError as err:
            raise bad_request(describe_validation_error(err, "videollm.compression"),
                              error_path(err, "videollm.compression")) from err
        budget = self.max_visual_tokens or 0
        key = cache_key(info.model_id, self.video.sha256, sampling.cache_fields(), compression.cache_fields(), budget)
        return EncodeJob(self.video, sampling, budget, compression, key)


def fitting_advice(visual_fit: int, header: encoder_pb2.EncodeHeader) -> str:
    """What to ask for so that a video's tokens fit the LLM's context, when `visual_fit` visual
    tokens would (the LLM says so when the prompt is too long): the budget, the retain ratio at
    these frames, or the frame count at this retain ratio."""
    frames = header.frames_sampled
    if visual_fit < 3 or frames == 0:
        return "no video fits beside this prompt and max_tokens: shorten them"
    per_frame = (header.uncompressed_tokens - 1) // frames
    retain = header.compression.settings.retain_ratio if header.compression.method == "earlytom" else 1.0
    fewer = max((n for n in range(1, frames) if worst_case_tokens(retain, n, per_frame) <= visual_fit), default=0)
    advice = [f"at most {visual_fit} visual tokens fit beside this prompt and max_tokens: ask for "
              f"videollm.max_visual_tokens {visual_fit}"]
    if visual_fit >= frames + 2:
        ratio = retain_for_budget(visual_fit, frames, per_frame, "earlytom", 1.0)
        advice.append(f"retain_ratio {math.floor(ratio * 1e4) / 1e4:g} at these {frames} frames")
    if fewer:
        advice.append(f"at most {fewer} frames at retain_ratio {retain:g}")
    return ", or ".join(advice)


@dataclass
class ChatRequest:
    messages: list[llm_pb2.ChatMessage]
    sampling: llm_pb2.SamplingParams
    video: VideoRequest | None
    inner: llm_pb2.InnerCompression | None = None  # EarlyTom Stage III in the LLM
    received_at: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # time.monotonic() by which the whole request must be done

    def remaining_s(self) -> float:
        """What is left of the request's deadline: the gRPC deadline of the next downstream call."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise APIError(504, "the request ran out of time", "timeout", code="deadline_exceeded")
        return left


@dataclass
class Outcome:
    """What the response's `videollm` object reports."""

    cache: str | None = None  # "hit" | "miss" | None without a video
    images: int = 0  # frames sent as that many images (0: a video file, or no video)
    max_visual_tokens: int = 0  # the request's token budget (0: none)
    header: encoder_pb2.EncodeHeader | None = None
    final: llm_pb2.GenerateFinal | None = None
    first_token_at: float | None = None
    # time.perf_counter() marks of the gateway's own hops (None when the hop did not happen)
    arrived_at: float | None = None  # the request's headers in, before its body was read and parsed
    encode_called_at: float | None = None  # Encode call made (a miss)
    encode_header_at: float | None = None  # its header arrived: the tokens exist
    llm_called_at: float | None = None  # Generate call made on the replica that answered

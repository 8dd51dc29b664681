"""A chat completion as the gateway handles it: the request in its own terms, and what happened to it.

openai_format.py makes a ChatRequest of the REST body; the pipeline fills the Outcome; the
response's `videollm` object reports it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from gateway.cache import cache_key
from gateway.errors import APIError, bad_request
from gateway.videos import Video
from protos.videollm.v1 import encoder_pb2, llm_pb2
from videollm.proto_mapping import compression_from_proto, compression_to_proto, describe_validation_error, error_path
from videollm.settings import CompressionSettings, frames_to_sample


@dataclass(frozen=True)
class EncodeJob:
    """A video with its frame count and compression settings resolved: what the encoder is asked
    for, and the cache key of the tokens it makes."""

    video: Video
    frames: int
    compression: CompressionSettings
    key: str

    def message(self, offer_pull: bool = False) -> encoder_pb2.EncodeRequest:
        """The request without its video (the pipeline adds the bytes, or the ticket of their file);
        offer_pull: ask the encoder to keep the tokens for the LLM to take."""
        return encoder_pb2.EncodeRequest(
            sampling=encoder_pb2.FrameSampling(num_frames=self.frames),
            compression=compression_to_proto(self.compression),
            offer_pull=offer_pull,
        )


@dataclass
class VideoRequest:
    video: Video
    num_frames: int | None
    compression: dict  # overrides of the encoder's default compression settings

    def resolve(self, info: encoder_pb2.EncoderInfo) -> EncodeJob:
        """The encoder's defaults (from its Info) filled in and its limits checked; 400 when one is broken."""
        try:
            frames = frames_to_sample(self.num_frames, info.default_frames, info.max_frames)
        except ValueError as err:
            raise bad_request(str(err), "videollm.num_frames") from err
        defaults = compression_from_proto(info.default_compression, CompressionSettings())
        try:
            compression = defaults.overridden(self.compression)
        except ValidationError as err:
            raise bad_request(describe_validation_error(err, "videollm.compression"),
                              error_path(err, "videollm.compression")) from err
        key = cache_key(info.model_id, self.video.sha256, frames, compression.cache_fields())
        return EncodeJob(self.video, frames, compression, key)


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
    header: encoder_pb2.EncodeHeader | None = None
    final: llm_pb2.GenerateFinal | None = None
    first_token_at: float | None = None
    # time.perf_counter() marks of the gateway's own hops (None when the hop did not happen)
    arrived_at: float | None = None  # the request's headers in, before its body was read and parsed
    encode_called_at: float | None = None  # Encode call made (a miss)
    encode_header_at: float | None = None  # its header arrived: the tokens exist
    llm_called_at: float | None = None  # Generate call made on the replica that answered

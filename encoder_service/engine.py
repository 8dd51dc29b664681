"""The encoder engine: video bytes -> sampled frames -> pixels -> visual tokens, with timings.

Knows nothing of gRPC. Decoding and preprocessing run on the calling thread (CPU), so several
requests decode at once while one at a time holds the device.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from encoder_service.video_decode import DecodedVideo, VideoLimits, decode_video
from encoder_service.vision import CompressionTrace, VisionEncoder
from videollm.checkpoint import check_model_dir, model_identity
from videollm.flops import encoder_flops
from videollm.settings import CompressionSettings, EncoderSettings


class EncodeRequestError(ValueError):
    """The request's settings are invalid; the message says which and why."""


class Overloaded(RuntimeError):
    """Too many requests in flight; the caller should retry later."""


@dataclass
class EncodeTimings:
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    projector_ms: float = 0.0
    queue_ms: float = 0.0
    total_ms: float = 0.0
    stage1_ms: float = 0.0
    importance_ms: float = 0.0
    stage2_ms: float = 0.0


@dataclass
class EncodeResult:
    tokens: torch.Tensor  # [N, D_llm] on the CPU
    video: DecodedVideo
    settings: CompressionSettings  # as resolved and applied
    trace: CompressionTrace
    flops: float  # encoder FLOPs as run
    flops_uncompressed: float
    uncompressed_tokens: int  # T*196 + 1
    timings: EncodeTimings = field(default_factory=EncodeTimings)


class EncoderEngine:
    def __init__(self, settings: EncoderSettings):
        from transformers import AutoVideoProcessor

        if settings.default_frames > settings.max_frames:
            raise ValueError(
                f"default_frames ({settings.default_frames}) exceeds max_frames ({settings.max_frames})"
            )
        self.settings = settings
        model_dir = check_model_dir(settings.model)
        self.model_id = model_identity(model_dir)
        self.vision = VisionEncoder(model_dir, settings.device, settings.torch_dtype_name())
        self.processor = AutoVideoProcessor.from_pretrained(model_dir)
        self.limits = VideoLimits(settings.max_video_bytes, settings.max_duration_s, settings.max_frame_pixels)
        self._device_lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(settings.max_concurrent)
        self._count_lock = threading.Lock()
        self.encodes_completed = 0

    def resolve_frames(self, num_frames: int) -> int:
        frames = num_frames or self.settings.default_frames
        if frames > self.settings.max_frames:
            raise EncodeRequestError(f"num_frames must be at most {self.settings.max_frames}, got {frames}")
        return frames

    def encode(self, video: bytes, num_frames: int = 0, compression: CompressionSettings | None = None) -> EncodeResult:
        """compression None means the server's default settings."""
        frames = self.resolve_frames(num_frames)
        settings = compression or self.settings.compression
        if not self._admission.acquire(blocking=False):
            raise Overloaded(f"the encoder has {self.settings.max_concurrent} requests in flight; retry later")
        try:
            return self._encode(video, frames, settings)
        finally:
            self._admission.release()

    def _encode(self, video: bytes, num_frames: int, settings: CompressionSettings) -> EncodeResult:
        timings = EncodeTimings()
        start = time.perf_counter()
        decoded = decode_video(video, num_frames, self.limits)
        timings.decode_ms = (time.perf_counter() - start) * 1e3

        mark = time.perf_counter()
        # on a GPU, resize and normalise there too (the processor moves the uint8 frames first)
        device = self.vision.device if self.vision.device.type == "cuda" else None
        pixels = self.processor(videos=[decoded.frames], return_tensors="pt", device=device)["pixel_values_videos"][0]
        # pixels: [T, 3, H, W]
        timings.preprocess_ms = (time.perf_counter() - mark) * 1e3

        mark = time.perf_counter()
        with self._device_lock:
            timings.queue_ms = (time.perf_counter() - mark) * 1e3
            output = self.vision.encode(pixels, settings)
            tokens = output.tokens.cpu()  # [T'*n + 1, D_llm]
        for name in ("vision_ms", "projector_ms", "stage1_ms", "importance_ms", "stage2_ms"):
            setattr(timings, name, getattr(output.timings, name))
        timings.total_ms = (time.perf_counter() - start) * 1e3

        vision_config, text_hidden = self.vision.config.vision_config, self.vision.hidden_size
        trace = output.trace
        with self._count_lock:
            self.encodes_completed += 1
        return EncodeResult(
            tokens=tokens,
            video=decoded,
            settings=settings,
            trace=trace,
            flops=encoder_flops(vision_config, text_hidden, trace.layer_frames, trace.frames_after_merge),
            flops_uncompressed=encoder_flops(
                vision_config, text_hidden, [num_frames] * self.vision.layers_to_run, num_frames
            ),
            uncompressed_tokens=num_frames * self.vision.tokens_per_frame + 1,
            timings=timings,
        )

"""The encoder engine: video bytes -> sampled frames -> pixels -> visual tokens, with timings.

Knows nothing of gRPC. Decoding and preprocessing run on the calling thread (on CUDA the
preprocessing runs on a stream of its own), so several requests decode at once; then one worker
runs them through the vision tower, the frames of several waiting requests together when
batch_max_requests allows (tower_batcher.py).
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from encoder_service import hdr
from encoder_service.admission import FramesInFlight
from encoder_service.image_frames import decode_images
from encoder_service.tower_batcher import TowerBatcher, TowerJob
from encoder_service.video_decode import DecodedVideo, VideoLimits, decode_video
from encoder_service.vision import CompressionTrace, EncodeTimings, VisionEncoder, VisionOutput, in_chunks
from videollm.checkpoint import check_model_dir, model_identity
from videollm.flops import encoder_flops
from videollm.frame_sampling import FrameSampling, SamplingError, retain_for_budget
from videollm.settings import CompressionSettings, EncoderSettings


log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests in flight; the caller should retry later."""


@dataclass
class EncodeResult:
    tokens: torch.Tensor  # [N, D_llm] on the CPU
    video: DecodedVideo
    sampling: FrameSampling  # as resolved (the frames themselves: video.frame_indices)
    settings: CompressionSettings  # as resolved and applied (a token budget may have lowered retain_ratio)
    trace: CompressionTrace
    flops: float  # encoder FLOPs as run
    flops_uncompressed: float
    uncompressed_tokens: int  # T*196 + 1
    timings: EncodeTimings = field(default_factory=EncodeTimings)
    batch_requests: int = 1  # requests whose frames went through the tower together, this one included
    batch_frames: int = 0  # their sampled frames, together


class EncoderEngine:
    def __init__(self, settings: EncoderSettings):
        from transformers import AutoVideoProcessor

        self.settings = settings
        model_dir = check_model_dir(settings.model)
        self.model_id = model_identity(model_dir)
        self.vision = VisionEncoder(model_dir, settings.device, settings.torch_dtype_name(), settings.chunk_frames)
        self.processor = AutoVideoProcessor.from_pretrained(model_dir)
        self.limits = VideoLimits(settings.max_video_bytes, settings.max_duration_s, settings.max_frame_pixels)
        # every frame bucket of a step with the default settings (other schedules capture when first run);
        # no step of the tower takes more than a chunk of frames
        self.vision.capture_graphs(settings.chunk_frames, [self.vision.schedule(settings.compression)])
        if self.vision.device.type == "cuda":
            self._warm_up(settings.compression)
        self.batcher = TowerBatcher(self._run_batch, settings.batch_max_frames, settings.batch_max_requests)
        self._admission = threading.BoundedSemaphore(settings.max_concurrent)
        self.frames_in_flight = FramesInFlight(settings.max_frames_in_flight)
        self.requests_in_flight = 0
        self._count_lock = threading.Lock()
        self.encodes_completed = 0

    def resolve_sampling(self, sampling: int | FrameSampling) -> FrameSampling:
        """A request's sampling with the server's defaults and limits (a count: num_frames over the
        whole clip, 0 = the default)."""
        if isinstance(sampling, int):
            sampling = FrameSampling(num_frames=sampling or None)
        return sampling.resolve(self.settings.default_frames, self.settings.max_frames)

    def encode(self, video: bytes | mmap.mmap, sampling: int | FrameSampling = 0,
               compression: CompressionSettings | None = None, max_visual_tokens: int = 0,
               image_sizes: list[int] | None = None) -> EncodeResult:
        """compression None means the server's default settings; max_visual_tokens > 0 caps the
        visual tokens (frame_sampling.retain_for_budget). image_sizes: `video` is that many still
        images back to back, every one a frame (image_frames.py; `sampling` is then theirs).
        Raises SamplingError for a sampling or budget this video cannot serve, VideoError for a
        video that cannot be read."""
        if image_sizes:
            if len(image_sizes) > self.settings.max_frames:
                raise SamplingError(f"{len(image_sizes)} images were sent as frames; this encoder takes at most "
                                    f"{self.settings.max_frames} frames a request", "messages")
            sampling = FrameSampling(num_frames=len(image_sizes))
        sampling = self.resolve_sampling(sampling)
        settings = compression or self.settings.compression
        if not self._admission.acquire(blocking=False):
            raise Overloaded(f"the encoder has {self.settings.max_concurrent} requests in flight; retry later")
        with self._count_lock:
            self.requests_in_flight += 1
        try:
            return self._encode(video, sampling, settings, max_visual_tokens, image_sizes)
        finally:
            with self._count_lock:
                self.requests_in_flight -= 1
            self._admission.release()

    def _encode(self, video: bytes | mmap.mmap, sampling: FrameSampling, settings: CompressionSettings,
                max_visual_tokens: int, image_sizes: list[int] | None) -> EncodeResult:
        start = time.perf_counter()
        taken, waited_ms = 0, 0.0

        def admit(indices: list[int]) -> None:  # the frames are known, none is decoded yet
            nonlocal settings, taken, waited_ms
            if max_visual_tokens:
                ratio = retain_for_budget(max_visual_tokens, len(indices), self.vision.tokens_per_frame,
                                          settings.method, settings.retain_ratio)
                settings = settings.model_copy(update={"retain_ratio": ratio})
            mark = time.perf_counter()
            self.frames_in_flight.take(len(indices))
            taken, waited_ms = len(indices), (time.perf_counter() - mark) * 1e3

        try:
            if image_sizes:
                decoded = decode_images(video, image_sizes, self.limits, self._allocate_frames, admit)
            else:  # on a GPU, HDR frames cross as 16-bit R'G'B' and are tone-mapped there (_preprocess)
                decoded = decode_video(video, sampling, self.limits, self._allocate_frames,
                                       tone_map=self.vision.device.type != "cuda", admit=admit)
            num_frames = len(decoded.frame_indices)
            decode_ms = (time.perf_counter() - start) * 1e3 - waited_ms

            mark = time.perf_counter()
            job = self._preprocess(decoded, settings)
            preprocess_ms = (time.perf_counter() - mark) * 1e3

            self.batcher.run(job)
        finally:
            if taken:
                self.frames_in_flight.give_back(taken)
        output: VisionOutput = job.result
        tokens = output.tokens  # [T'*n + 1, D_llm] on the CPU
        timings = output.timings  # the tower's part, this request's own copy
        # waiting: for room among the frames in flight, then for the device
        timings.decode_ms, timings.preprocess_ms, timings.queue_ms = decode_ms, preprocess_ms, waited_ms + job.queue_ms
        timings.total_ms = (time.perf_counter() - start) * 1e3

        vision_config, text_hidden = self.vision.config.vision_config, self.vision.hidden_size
        trace = output.trace
        with self._count_lock:
            self.encodes_completed += 1
        return EncodeResult(
            tokens=tokens,
            video=decoded,
            sampling=sampling,
            settings=settings,
            trace=trace,
            flops=encoder_flops(vision_config, text_hidden, trace.layer_frames, trace.frames_after_merge),
            flops_uncompressed=encoder_flops(
                vision_config, text_hidden, [num_frames] * self.vision.layers_to_run, num_frames
            ),
            uncompressed_tokens=num_frames * self.vision.tokens_per_frame + 1,
            timings=timings,
            batch_requests=job.batch_requests,
            batch_frames=job.batch_frames,
        )

    def _warm_up(self, settings: CompressionSettings) -> None:
        """One encode of noise frames, more than a chunk, with the default settings, so that what
        the first request would otherwise wait for (compiles of the scoring and of the steps between
        the layers at their real sizes: 13 s measured on an H200 for the first long request) happens
        before the service reports ready."""
        started = time.perf_counter()
        size = self.vision.config.vision_config.image_size
        noise = torch.rand(self.settings.chunk_frames + 5, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.vision.encode(noise * 2 - 1, settings)  # [T, 3, H, W] in the processor's range
        log.info("warmed up the encoder in %.1f s", time.perf_counter() - started)

    def _allocate_frames(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Where decode_video puts the frames: page-locked memory on a GPU (from torch's caching host
        allocator, so reused across requests; the array keeps its tensor alive)."""
        if self.vision.device.type != "cuda":
            return np.empty(shape, dtype=dtype)
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()

    def _preprocess(self, decoded: DecodedVideo, settings: CompressionSettings) -> TowerJob:
        """Resize and normalise the frames, a chunk at a time (on a GPU there, on a stream of this
        thread's own so that it overlaps the tower's work) -> the tower's job."""
        key = self.vision.schedule(settings)
        if self.vision.device.type != "cuda":
            def pixels_of(frames: np.ndarray) -> torch.Tensor:  # [c, H, W, 3] -> [c, 3, H, W]
                return self.processor(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]

            pixels = in_chunks(pixels_of, decoded.frames, self.settings.chunk_frames)  # [T, 3, H, W]
            return TowerJob(pixels, settings, key)
        stream = torch.cuda.Stream(self.vision.device)
        with torch.cuda.stream(stream):
            pixels = in_chunks(lambda frames: self._pixels_on_gpu(frames, decoded.hdr_transfer), decoded.frames,
                               self.settings.chunk_frames)  # [T, 3, H, W]
            ready = torch.cuda.Event()
            ready.record(stream)
        return TowerJob(pixels, settings, key, ready=ready)

    def _pixels_on_gpu(self, chunk: np.ndarray, hdr_transfer: int | None) -> torch.Tensor:
        """A chunk of frames [c, H, W, 3] as pixels on the GPU [c, 3, H, W]: the frames as they are to
        the GPU in one copy from page-locked memory; the processor then makes them channels-first
        there (given an array, it does that on the CPU: a strided copy of 200 MB for 32 frames of
        1080p, before a copy from pageable memory)."""
        frames = torch.from_numpy(chunk).to(self.vision.device, non_blocking=True)
        if hdr_transfer is not None:  # [c, H, W, 3] uint16 HDR -> uint8 SDR
            frames = hdr.to_sdr(frames, hdr_transfer)
        return self.processor(videos=[frames], return_tensors="pt", input_data_format="channels_last",
                              device=self.vision.device)["pixel_values_videos"][0]

    def _run_batch(self, jobs: list[TowerJob]) -> Generator[None, None, list[VisionOutput]]:
        """On the batch worker, a chunk at a time: the jobs' frames through the tower together;
        tokens back on the CPU."""
        for job in jobs:
            if job.ready is not None:
                current = torch.cuda.current_stream(self.vision.device)
                current.wait_event(job.ready)
                job.pixels.record_stream(current)  # made on the job's stream, freed after use on this one
        outputs = yield from self.vision.encode_steps([(job.pixels, job.settings) for job in jobs])
        for output in outputs:
            output.tokens = output.tokens.cpu()
        return outputs

    def close(self) -> None:
        """Stop the device worker after the requests it holds."""
        self.batcher.close()

"""Container bytes -> T RGB frames sampled uniformly over the whole clip (PyAV / FFmpeg).

Frame indices are `floor(linspace(0, n_frames - 1, T))`, as LLaVA-OneVision's evaluation samples
them. Only the sampled frames are converted to RGB; the rest are decoded and dropped. Limits on
size, duration and frame pixels are checked from the container before any frame is decoded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np


class VideoError(ValueError):
    """The bytes are not a decodable video within the limits; the message says why."""


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int
    max_duration_s: float
    max_frame_pixels: int


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    frame_indices: list[int]  # index of each sampled frame in the source
    source_frames: int
    fps: float
    duration_s: float


def sample_indices(n_frames: int, num_samples: int) -> list[int]:
    return np.floor(np.linspace(0, n_frames - 1, num_samples)).astype(np.int64).tolist()


def _open(data: bytes):
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as err:
        raise VideoError(f"could not read the video container: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoError("the file has no video stream")
    return container


def _count_frames(data: bytes) -> int:
    """Number of video packets (one per frame), read without decoding."""
    with _open(data) as container:
        stream = container.streams.video[0]
        try:
            return sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError as err:
            raise VideoError(f"the video is corrupt or truncated: {err}") from err


def _decode_selected(data: bytes, indices: list[int]) -> tuple[list[np.ndarray | None], int]:
    wanted: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        wanted.setdefault(index, []).append(slot)
    frames: list[np.ndarray | None] = [None] * len(indices)
    decoded = 0
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                slots = wanted.get(decoded)
                if slots:
                    rgb = frame.to_ndarray(format="rgb24")  # [H, W, 3]
                    for slot in slots:
                        frames[slot] = rgb
                decoded += 1
                if decoded > indices[-1]:
                    break
        except av.FFmpegError as err:
            raise VideoError(f"the video is corrupt or truncated: {err}") from err
    return frames, decoded


def decode_video(data: bytes, num_frames: int, limits: VideoLimits) -> DecodedVideo:
    if not data:
        raise VideoError("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise VideoError(f"the video is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    with _open(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
    if width * height > limits.max_frame_pixels:
        raise VideoError(
            f"frames of {width}x{height} exceed the limit of {limits.max_frame_pixels} pixels per frame"
        )
    if duration > limits.max_duration_s:
        raise VideoError(f"the video lasts {duration:.0f} s; the limit is {limits.max_duration_s:.0f} s")

    n_frames = _count_frames(data)
    for _ in range(2):  # a second pass only if the packet count overstated the frames
        if n_frames == 0:
            raise VideoError("the video has no decodable frames")
        indices = sample_indices(n_frames, num_frames)
        frames, decoded = _decode_selected(data, indices)
        if all(frame is not None for frame in frames):
            if duration <= 0 and fps > 0:
                duration = n_frames / fps
            return DecodedVideo(np.stack(frames), indices, n_frames, fps, duration)
        n_frames = decoded
    raise VideoError("the video is corrupt or truncated: frames could not be decoded")

"""Container bytes -> T RGB frames sampled uniformly over the whole clip (PyAV / FFmpeg).

Frame indices are `floor(linspace(0, n_frames - 1, T))`, as LLaVA-OneVision's evaluation samples
them. Only the sampled frames are converted to RGB; the rest are decoded and dropped. Frames
after different keyframes are decoded in parallel, each run starting at its keyframe. Limits on
size, duration and frame pixels are checked from the container before any frame is decoded.
"""

from __future__ import annotations

import bisect
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import av
import numpy as np


_CORES = os.cpu_count() or 1
# One pool for the decoding of every request: concurrent requests queue for the cores instead of
# each starting its own threads (16 requests x segments x FFmpeg threads would oversubscribe them).
_POOL = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="decode")


def decoder_threads(segments: int) -> int:
    """FFmpeg threads for each of `segments` keyframe segments decoded side by side: twice the
    cores shared out over the segments (a thread of FFmpeg's frame threading often waits on the
    frame it refers to, so an even share leaves cores idle), at least 1 and at most 8. The rule was
    chosen by measuring it against an even share and a flat 8 (docs/bench/README.md)."""
    return max(1, min(8, 2 * _CORES // max(1, segments)))


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


@dataclass(frozen=True)
class _Index:
    """What one demux pass (no decoding) learns: frame count, presentation times, keyframes."""

    frames: int
    pts: list[int] | None  # presentation time of each frame in presentation order; None when not usable
    keyframes: list[int]  # presentation indices where decoding can start


def _scan(data: bytes) -> _Index:
    pts, keys = [], []
    with _open(data) as container:
        stream = container.streams.video[0]
        try:
            for packet in container.demux(stream):
                if packet.size > 0:
                    pts.append(packet.pts)
                    keys.append(packet.is_keyframe)
        except av.FFmpegError as err:
            raise VideoError(f"the video is corrupt or truncated: {err}") from err
    if None in pts or len(set(pts)) != len(pts):  # no usable timestamps: decode from the start only
        return _Index(len(pts), None, [0])
    order = sorted(range(len(pts)), key=pts.__getitem__)  # decode order -> presentation order
    rank = {pts[i]: r for r, i in enumerate(order)}
    keyframes = sorted({rank[pts[i]] for i, key in enumerate(keys) if key} | {0})
    return _Index(len(pts), [pts[i] for i in order], keyframes)


def _decode_segment(data: bytes, index: _Index, start: int, wanted: list[int],
                    threads: int = 8) -> dict[int, np.ndarray]:
    """Decode from the keyframe at presentation index `start` until every index in `wanted` is found.

    Frames no other frame refers to are skipped unless wanted (FFmpeg's skip_frame, set per
    packet): the frames kept are bit for bit those of a full decode, for less CPU time, since
    unreferenced frames that are not sampled are never reconstructed (the saving on the benchmark
    clip is in docs/bench/7b-h200-encoder-steps.md).
    """
    found: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # not FFmpeg's default of a thread per core: segments decode side by side (decoder_threads)
        stream.thread_count = threads
        codec = stream.codec_context
        rank = {t: r for r, t in enumerate(index.pts)} if index.pts is not None else None
        if start > 0:
            container.seek(index.pts[start], stream=stream, backward=True, any_frame=False)
        position = start
        try:
            for packet in container.demux(stream):
                if rank is not None and packet.size > 0:
                    codec.skip_frame = "DEFAULT" if rank.get(packet.pts, -1) in wanted_set else "NONREF"
                for frame in codec.decode(packet):
                    at = rank.get(frame.pts, -1) if rank is not None else position
                    position += 1
                    if at in wanted_set and at not in found:
                        found[at] = frame.to_ndarray(format="rgb24")  # [H, W, 3]
                    if len(found) == len(wanted) or at > wanted[-1]:
                        return found
        except av.FFmpegError as err:
            raise VideoError(f"the video is corrupt or truncated: {err}") from err
    return found


def _segments(index: _Index, indices: list[int]) -> dict[int, list[int]]:
    """Keyframe (presentation index) -> the wanted indices decoded from it, in order."""
    segments: dict[int, list[int]] = {}
    for wanted in sorted(set(indices)):
        start = index.keyframes[bisect.bisect_right(index.keyframes, wanted) - 1]
        segments.setdefault(start, []).append(wanted)
    return segments


@dataclass(frozen=True)
class KeyframeSegment:
    """One keyframe's share of `decode_video`'s work: the sampled frames decoded from that keyframe."""

    start: int  # presentation index of the keyframe
    wanted: list[int]  # the sampled presentation indices decoded from it, in order
    data: bytes = field(repr=False)
    index: _Index = field(repr=False)

    def decode(self) -> dict[int, np.ndarray]:
        """This segment alone, as decode_video decodes it: presentation index -> [H, W, 3] uint8 RGB."""
        return _decode_segment(self.data, self.index, self.start, self.wanted, decoder_threads(1))  # as if alone


def keyframe_segments(data: bytes, num_frames: int) -> list[KeyframeSegment]:
    """The keyframe segments that decode_video decodes in parallel for `num_frames` sampled frames
    (no limits are checked; the benchmark times each segment alone)."""
    index = _scan(data)
    segments = _segments(index, sample_indices(index.frames, num_frames))
    return [KeyframeSegment(start, wanted, data, index) for start, wanted in segments.items()]


def _decode_selected(data: bytes, index: _Index, indices: list[int]) -> dict[int, np.ndarray]:
    """The frames at `indices`, decoded in parallel from the keyframes that precede them, each
    keyframe segment a task of the shared pool (FFmpeg releases the GIL while it decodes)."""
    segments = _segments(index, indices)
    threads = decoder_threads(len(segments))
    found: dict[int, np.ndarray] = {}  # a lone segment goes through the pool too, so the pool bounds every decode
    for part in _POOL.map(lambda item: _decode_segment(data, index, *item, threads), segments.items()):
        found.update(part)
    return found


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

    index = _scan(data)
    if index.frames == 0:
        raise VideoError("the video has no decodable frames")
    indices = sample_indices(index.frames, num_frames)
    found = _decode_selected(data, index, indices)
    if len(found) < len(set(indices)):  # a seek landed badly: decode once more from the start
        found = _decode_segment(data, _Index(index.frames, index.pts, [0]), 0, sorted(set(indices)))
    if len(found) < len(set(indices)):
        raise VideoError("the video is corrupt or truncated: frames could not be decoded")
    if duration <= 0 and fps > 0:
        duration = index.frames / fps
    return DecodedVideo(np.stack([found[i] for i in indices]), indices, index.frames, fps, duration)

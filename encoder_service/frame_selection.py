"""The frames a resolved FrameSampling takes from one video (the contract: videollm/frame_sampling.py),
from when each frame is shown; done once the container is demuxed, before any frame is decoded."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from videollm.frame_sampling import FrameSampling, SamplingError


@dataclass(frozen=True)
class Timeline:
    """When each frame of a video is shown: what sampling by time needs from the container."""

    times_s: np.ndarray | None  # [N] seconds from the first frame, ascending; None: unknown
    frames: int
    duration_s: float

    @property
    def fps(self) -> float:
        return self.frames / self.duration_s if self.duration_s > 0 else 0.0

    def shown_at(self, t: float) -> int:
        """The frame on screen at time t (the first one before it starts)."""
        return max(0, bisect.bisect_right(self.times_s, t + 1e-9) - 1)


def evenly(first: int, last: int, count: int) -> list[int]:
    """`count` frame indices evenly spaced by index from first to last: floor(linspace(first, last, count)),
    LLaVA-OneVision's evaluation sampling."""
    return np.floor(np.linspace(first, last, count)).astype(np.int64).tolist()


def sample_indices(n_frames: int, count: int) -> list[int]:
    """`count` frames evenly over a whole clip of n_frames."""
    return evenly(0, n_frames - 1, count)


@dataclass(frozen=True)
class Selection:
    indices: list[int]  # the sampled frames, in order (a frame may repeat)
    start_s: float  # the window as served
    end_s: float


def _needs_times(timeline: Timeline, param: str) -> None:
    if timeline.times_s is None or timeline.duration_s <= 0:
        raise SamplingError("the video's frames carry no timestamps and its frame rate is unknown, so it can "
                            "only be sampled by count: give num_frames without a window", param)


def _window(sampling: FrameSampling, timeline: Timeline) -> tuple[float, float]:
    """[start, end) in seconds, checked against the video; the end is the video's when not given."""
    duration = timeline.duration_s
    start = sampling.start_s or 0.0
    end = duration if sampling.end_s is None else sampling.end_s
    if start >= duration:
        raise SamplingError(f"the window starts at {start:g} s, at or past the video's end ({duration:.3f} s)",
                            "videollm.start_s")
    slack = 1 / timeline.fps if timeline.fps > 0 else 0.0  # a rounded end within a frame of the true one is fine
    if end > duration + slack:
        raise SamplingError(f"the window ends at {end:g} s, past the video's end ({duration:.3f} s)",
                            "videollm.end_s")
    return start, min(end, duration)


def select(sampling: FrameSampling, timeline: Timeline) -> Selection:
    """The frames a resolved sampling takes from this video; SamplingError when the video cannot
    serve it (a window past its end, fps above its frame rate, no timestamps for a time request)."""
    windowed = sampling.start_s is not None or sampling.end_s is not None
    if sampling.fps is None and not windowed:  # the whole clip by count: LLaVA-OneVision's own sampling
        return Selection(sample_indices(timeline.frames, sampling.num_frames), 0.0, timeline.duration_s)
    _needs_times(timeline, "videollm.fps" if sampling.fps is not None else "videollm.start_s")
    start, end = _window(sampling, timeline)
    if sampling.fps is None:
        first = timeline.shown_at(start)
        last = max(first, bisect.bisect_left(timeline.times_s, end - 1e-9) - 1)  # the last frame starting before end
        return Selection(evenly(first, last, sampling.num_frames), start, end)
    if sampling.fps > timeline.fps * (1 + 1e-6):
        raise SamplingError(f"{sampling.fps:g} is above the video's frame rate ({timeline.fps:.3f} fps)",
                            "videollm.fps")
    count = max(1, math.ceil((end - start) * sampling.fps - 1e-6))
    step = 1 / sampling.fps
    if count > sampling.max_frames:
        count, step = sampling.max_frames, (end - start) / sampling.max_frames
    return Selection([timeline.shown_at(start + k * step) for k in range(count)], start, end)

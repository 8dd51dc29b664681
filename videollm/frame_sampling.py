"""Which frames of a video a request samples, and how many visual tokens it may cost.

The contract, the same in the gateway (checked before the video is read) and in the encoder
(resolved against the video once it is demuxed, before any frame is decoded, in
encoder_service/frame_selection.py):
- `num_frames`: frames evenly spaced by index over the window, `floor(linspace(first, last, T))`,
  as LLaVA-OneVision's evaluation samples a whole clip (the server's default count when nothing is
  asked).
- `fps` (with `max_frames`, by default the server's limit): frames evenly spaced in time, at the
  instants start, start + 1/fps, ... before the window's end (`ceil(window * fps)` of them, so a
  10 s clip whose timestamps make it 9.999 s still gives 10 at 1 fps); when that is more than
  max_frames, max_frames evenly spaced over the window. Each is the frame shown
  at its time, from the frames' own timestamps, so a variable-frame-rate clip is sampled evenly
  in time.
- `start_s` / `end_s`: the window, in seconds from the first frame; a frame belongs to it when it
  starts showing in [start_s, end_s), and the frame on screen at start_s too.
- `max_visual_tokens`: a ceiling on the visual tokens (`retain_for_budget`).

A request's errors are SamplingError, whose `param` names the REST field at fault.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

UINT32_MAX = 2**32 - 1  # integers that travel as uint32 on the gRPC hops
MAX_FPS = 240.0  # above any camera's rate; a higher one is refused before the video is read


class SamplingError(ValueError):
    """A request's sampling or budget cannot be served; `param` is the REST field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class FrameSampling(BaseModel):
    """A request's frame sampling as asked (every field optional) or as resolved (`resolve`)."""

    model_config = ConfigDict(extra="forbid")

    num_frames: int | None = Field(None, ge=1, le=UINT32_MAX, description="frames evenly spaced by index "
                                   "over the window (default: the server's default_frames)")
    fps: float | None = Field(None, gt=0, le=MAX_FPS, description="sample this many frames per second of the "
                              "window instead, evenly in time (not with num_frames)")
    max_frames: int | None = Field(None, ge=1, le=UINT32_MAX, description="with fps: at most this many frames, "
                                   "then evenly spaced over the window (default: the server's limit)")
    start_s: float | None = Field(None, ge=0, description="the window's start, seconds from the first frame")
    end_s: float | None = Field(None, gt=0, description="the window's end (default: the video's end)")

    def resolve(self, default_frames: int, frame_limit: int) -> FrameSampling:
        """The sampling with the server's defaults filled in and every check that needs no video
        made: the form the cache key and the encoder take."""
        if self.fps is not None and self.num_frames is not None:
            raise SamplingError("give num_frames or fps, not both (with fps, max_frames caps the count)",
                                "videollm.num_frames")
        if self.max_frames is not None and self.fps is None:
            raise SamplingError("max_frames caps fps sampling; with num_frames give the count alone",
                                "videollm.max_frames")
        for name in ("num_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and value > frame_limit:
                raise SamplingError(f"must be at most {frame_limit} (the server's frame limit), got {value}",
                                    f"videollm.{name}")
        if self.start_s is not None and self.end_s is not None and self.end_s <= self.start_s:
            raise SamplingError(f"must be after start_s ({self.start_s}), got {self.end_s}", "videollm.end_s")
        if self.fps is not None:
            return self.model_copy(update={"max_frames": self.max_frames or frame_limit})
        return self.model_copy(update={"num_frames": self.num_frames or default_frames})

    def cache_fields(self) -> dict:
        """What the sampled frames depend on, once resolved: equal for equivalent spellings (a window
        from 0 is no window)."""
        fields = self.model_dump(exclude_none=True)
        if fields.get("start_s") == 0:
            del fields["start_s"]
        return fields


def worst_case_tokens(retain_ratio: float, frames: int, tokens_per_frame: int) -> int:
    """The most visual tokens EarlyTom can send for `frames` sampled frames at this retain ratio,
    whatever Stage I merges: ceil(r*T*n) + T + 1, and never more than method "none" (T*n + 1)."""
    return min(frames * tokens_per_frame + 1, math.ceil(retain_ratio * frames * tokens_per_frame - 1e-9) + frames + 1)


def retain_for_budget(budget: int, frames: int, tokens_per_frame: int, method: str, retain_ratio: float) -> float:
    """The retain ratio under a ceiling of `budget` visual tokens: the request's own when its worst
    case fits, else the largest that fits. SamplingError when none can: method "none" over the
    budget, or a budget too small to guarantee T frames at any ratio (T + 2: a token per frame, the
    newline, and one for rounding the frames' shares up)."""
    if method == "none":
        need = frames * tokens_per_frame + 1
        if need > budget:
            raise SamplingError(f"{frames} frames cost {need} visual tokens with method none, {need - budget} over "
                                f"the budget of {budget}; sample fewer frames or use method earlytom",
                                "videollm.max_visual_tokens")
        return retain_ratio
    least = frames + 2
    if budget < least:
        raise SamplingError(f"must be at least {least} for {frames} sampled frames (a token per frame, the newline, "
                            f"and one for rounding), got {budget}; raise it or sample fewer frames",
                            "videollm.max_visual_tokens")
    if worst_case_tokens(retain_ratio, frames, tokens_per_frame) <= budget:
        return retain_ratio
    ratio = (budget - frames - 1) / (frames * tokens_per_frame)
    while worst_case_tokens(ratio, frames, tokens_per_frame) > budget:  # float rounding at the ceiling
        ratio = math.nextafter(ratio, 0.0)
    return ratio

"""Container bytes -> the RGB frames a request samples, as a player shows them (PyAV / FFmpeg).

Which frames: videollm/frame_sampling.py (by count over the clip, `floor(linspace(0, n_frames - 1,
T))` as LLaVA-OneVision's evaluation samples them, or by time, from the frames' own timestamps).
The frames are exactly those of a plain sequential decode; the work to get them is cut three ways:
- The container is opened and demuxed once, its packets kept in memory (demux.py).
- The sampled frames are grouped by the keyframe that precedes them. Each group (a run) is
  decoded by a decoder of its own, fed the kept packets from its keyframe on; the runs of every
  request share one pool of as many workers as cores, longest first.
- Frames no other frame refers to are not reconstructed unless sampled (FFmpeg's skip_frame, set
  per packet), and only the sampled frames are converted to RGB.
Runs start only at keyframes that are clean entry points (entry_points.py: not H.264's recovery
points); where a decoder still returns too few frames (a damaged GOP), the run is decoded again
from the keyframe before it.

What a player does, the decoder does too: the default video track of several, frames from the
first clean keyframe on (a clip cut mid-GOP), only the frames an edit list shows (a trimmed
clip), the display matrix applied (orientation.py), HDR
tone-mapped to SDR (hdr.py), timestamps, duration and rate from the frames' own timestamps.
Limits on size, duration and frame pixels are checked from the container's header before any
packet is read.
"""

from __future__ import annotations

import bisect
import dataclasses
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import av
import numpy as np
import torch

from encoder_service import hdr, orientation
from encoder_service.decode_pool import POOL
from encoder_service.demux import (UNSPECIFIED, ColorTags, Index, demux, header_of, index_of, open_container,
                                   video_stream)
from encoder_service.errors import VideoError
from encoder_service.orientation import Orientation
from encoder_service.frame_selection import sample_indices, select
from videollm.frame_sampling import FrameSampling


_CORES = os.cpu_count() or 1
# The orientation probes, apart from the runs: a run's frames wait for their probe, and a probe
# never waits for anything, so it cannot be stuck behind runs that wait for it.
_PROBES = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="orientation")


def decoder_threads(runs: int) -> int:
    """FFmpeg threads for each of `runs` keyframe runs decoded side by side: twice the cores shared
    out over the runs (a thread of FFmpeg's frame threading often waits on the frame it refers
    to, so an even share leaves cores idle), at least 1 and at most 8. The rule was chosen by
    measuring it against an even share and a flat 8 (docs/bench/README.md)."""
    return max(1, min(8, 2 * _CORES // max(1, runs)))


@dataclass(frozen=True)
class VideoLimits:
    max_bytes: int
    max_duration_s: float
    max_frame_pixels: int


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, upright (the display matrix applied)
    frame_indices: list[int]  # index of each sampled frame in the source
    source_frames: int
    fps: float
    duration_s: float
    orientation: Orientation = Orientation()
    color: hdr.ColorReport = hdr.ColorReport.of(1, 1, 8)
    hdr_transfer: int | None = None  # set when `frames` are uint16 HDR R'G'B' still to tone-map (hdr.to_sdr)
    timestamps_s: list[float] | None = None  # when each sampled frame is shown, from the first frame
    window_s: tuple[float, float] = (0.0, 0.0)  # the part of the video sampled from, in seconds


def _pixels(frame, stream: ColorTags, tone_map: bool) -> np.ndarray:
    """A decoded frame -> [H, W, 3] RGB: SDR as swscale converts it to uint8 (bit-exact with any
    plain decode); HDR as uint16 R'G'B', tone-mapped to BT.709 SDR uint8 here unless the caller
    does that itself (hdr.py). Whether it is HDR is the stream's transfer, the one the answer
    reports and the caller tone-maps with. Y'CbCr tags the frame lacks come from the stream, as
    FFmpeg gives them to the frames of a container's own decoder (the runs' decoders are made from
    the codec alone)."""
    if frame.colorspace == UNSPECIFIED and stream.matrix != UNSPECIFIED:
        frame.colorspace = stream.matrix  # swscale picks the Y'CbCr matrix from it
    if frame.color_range == 0 and stream.range != 0:
        frame.color_range = stream.range
    if hdr.is_hdr(stream.transfer):
        rgb48 = frame.to_ndarray(format="rgb48le")  # [H, W, 3] uint16
        return hdr.to_sdr(torch.from_numpy(rgb48), stream.transfer).numpy() if tone_map else rgb48
    return frame.to_ndarray(format="rgb24")


def _decoder(index: Index, threads: int):
    """A decoder of its own for one run, set up as the container's stream would set it up."""
    decoder = av.CodecContext.create(index.codec, "r")
    if index.extradata:
        decoder.extradata = index.extradata
    decoder.width, decoder.height = index.width, index.height
    decoder.thread_type = "AUTO"
    decoder.thread_count = threads  # not FFmpeg's default of a thread per core: runs decode side by side
    return decoder


def _decode_run(index: Index, start: int, wanted: list[int], threads: int = 8) -> dict[int, np.ndarray]:
    """Feed a new decoder the packets from the keyframe at presentation index `start` on, until every
    index in `wanted` (sorted) is found: presentation index -> [H, W, 3] uint8 RGB.

    Frames no other frame refers to are skipped unless wanted: the frames kept are bit for bit
    those of a full decode, for less CPU time, since unreferenced frames that are not sampled are
    never reconstructed (the saving on a phone clip is in docs/bench/README.md).
    """
    found: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    rank = index.rank
    decoder = _decoder(index, threads)
    position = start  # without timestamps (start is 0): frames come out in presentation order
    unfed = len(wanted_set)  # wanted frames whose packets the decoder has not had yet

    def take(frames) -> bool:
        nonlocal position
        for frame in frames:
            at = rank.get(frame.pts, -1) if rank is not None else position
            position += 1
            if at in wanted_set and at not in found:
                found[at] = _pixels(frame, index.color, index.tone_map)  # [H, W, 3]
            if len(found) == len(wanted) or at > wanted[-1]:
                return True
        return False

    try:
        for packet in index.packets[index.entry[start]:]:
            if rank is not None:
                is_wanted = rank.get(packet.pts, -1) in wanted_set
                decoder.skip_frame = "DEFAULT" if is_wanted else "NONREF"
                unfed -= is_wanted
            if take(decoder.decode(packet)):
                return found
            if unfed == 0:  # every wanted frame and what it refers to is in: drain instead of decoding
                break       # the frames after it that the decoder's reordering delay would ask for
        take(decoder.decode(None))  # the frames the decoder still holds
    except av.FFmpegError as err:
        raise VideoError(f"the video is corrupt or truncated: {err}") from err
    return found


def _decode_from_clean_entry(index: Index, start: int, wanted: list[int], threads: int) -> dict[int, np.ndarray]:
    """`_decode_run`, started again from the keyframe before while frames are missing or the
    decoder fails (a damaged or mislabelled keyframe: HEVC and MPEG-4 decoders return nothing from
    a frame that is not one, VP8 and VP9 fail); from keyframe 0 it is a sequential decode, whose
    errors are the video's."""
    at = index.keyframes.index(start)
    found: dict[int, np.ndarray] = {}
    while True:
        missing = [i for i in wanted if i not in found]
        try:
            found.update(_decode_run(index, index.keyframes[at], missing, threads))
        except VideoError:
            if at == 0:
                raise
        if len(found) == len(wanted) or at == 0:
            return found
        at -= 1


def _runs(index: Index, indices: list[int]) -> dict[int, list[int]]:
    """Keyframe (presentation index) -> the wanted indices decoded from it, in order."""
    runs: dict[int, list[int]] = {}
    for wanted in sorted(set(indices)):
        start = index.keyframes[bisect.bisect_right(index.keyframes, wanted) - 1]
        runs.setdefault(start, []).append(wanted)
    return runs


@dataclass(frozen=True)
class KeyframeRun:
    """One keyframe's share of `decode_video`'s work: the sampled frames decoded from that keyframe."""

    start: int  # presentation index of the keyframe
    wanted: list[int]  # the sampled presentation indices decoded from it, in order
    index: Index = field(repr=False)

    def decode(self) -> dict[int, np.ndarray]:
        """This run alone, as decode_video decodes it: presentation index -> [H, W, 3] uint8 RGB."""
        return _decode_from_clean_entry(self.index, self.start, self.wanted, decoder_threads(1))  # as if alone


def keyframe_runs(data: bytes, num_frames: int) -> list[KeyframeRun]:
    """The keyframe runs that decode_video decodes in parallel for `num_frames` frames sampled over
    the clip (no limits are checked; the benchmark times each run alone)."""
    index = index_of(data)
    runs = _runs(index, sample_indices(index.frames, num_frames))
    return [KeyframeRun(start, wanted, index) for start, wanted in runs.items()]


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class _Frames:
    """The sampled frames, [T, H, W, 3] (uint8; uint16 for HDR left to the caller), filled by the
    runs as they finish, turned upright: each run copies its frames into their places on its own
    worker, so no serial stack of every frame at the end (32 frames of 1080p are 200 MB: 30-45 ms
    for one thread)."""

    def __init__(self, indices: list[int], allocate: Allocate, turn: Future[Orientation]):
        self.allocate = allocate
        self.turn = turn
        self.slots: dict[int, list[int]] = {}
        for slot, index in enumerate(indices):
            self.slots.setdefault(index, []).append(slot)
        self.count = len(indices)
        self.array: np.ndarray | None = None
        self.filled: set[int] = set()
        self._lock = threading.Lock()

    def fill(self, part: dict[int, np.ndarray]) -> None:
        upright = self.turn.result().upright
        for index, stored in part.items():
            frame = upright(stored)  # a view: turned while it is copied into place
            with self._lock:
                if self.array is None:
                    self.array = self.allocate((self.count, *frame.shape), frame.dtype)
            if frame.shape != self.array.shape[1:]:
                raise VideoError(f"the video changes resolution mid-stream ({self.array.shape[2]}x"
                                 f"{self.array.shape[1]}, then {frame.shape[1]}x{frame.shape[0]}); "
                                 "re-encode it at one resolution")
            for slot in self.slots[index]:
                self.array[slot] = frame
            with self._lock:
                self.filled.add(index)


def _decode_selected(index: Index, indices: list[int], allocate: Allocate,
                     turn: Future[Orientation]) -> _Frames:
    """The frames at `indices`, decoded in parallel from the keyframes that precede them, each run
    a task of the shared pool (decode_pool.py: FFmpeg releases the GIL while it decodes, and the
    pool takes the requests' runs in turn). The runs that feed the most frames go first (from the
    keyframe to the last wanted frame), so that the longest does not start last."""
    runs = sorted(_runs(index, indices).items(), key=lambda run: run[1][-1] - run[0], reverse=True)
    threads = decoder_threads(len(runs))
    index.rank  # made once, here, before the runs share it
    frames = _Frames(indices, allocate, turn)  # a lone run goes through the pool too, so the pool bounds every decode
    POOL.run([lambda start=start, wanted=wanted: frames.fill(_decode_from_clean_entry(index, start, wanted, threads))
              for start, wanted in runs])
    return frames


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _admit_all(indices: list[int]) -> None:
    pass


def decode_video(data: bytes | mmap.mmap, sampling: int | FrameSampling, limits: VideoLimits,
                 allocate: Allocate = _empty, tone_map: bool = True,
                 admit: Callable[[list[int]], None] = _admit_all) -> DecodedVideo:
    """sampling: a resolved FrameSampling, or a frame count over the whole clip. Raises VideoError
    for a video that cannot be read or breaks the limits, SamplingError for a sampling this video
    cannot serve.

    allocate(shape, dtype) -> the array the frames are decoded into (the encoder passes page-locked
    memory on a GPU, so that the frames go to the GPU in one fast copy). tone_map False: HDR frames
    come as uint16 R'G'B' for the caller to tone-map (hdr.to_sdr on its GPU), with `hdr_transfer`
    saying how; SDR frames are uint8 either way. admit(indices) is called with the sampled frames
    before any is decoded, and may raise to refuse them (the encoder's token budget)."""
    if isinstance(sampling, int):
        sampling = FrameSampling(num_frames=sampling)
    if not data:
        raise VideoError("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise VideoError(f"the video is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    with open_container(data) as container:
        header = header_of(container)
        if header.width * header.height > limits.max_frame_pixels:
            raise VideoError(f"frames of {header.width}x{header.height} exceed the limit of "
                             f"{limits.max_frame_pixels} pixels per frame")
        if header.duration_s > limits.max_duration_s:
            raise VideoError(f"the video lasts {header.duration_s:.0f} s; the limit is {limits.max_duration_s:.0f} s")
        index = dataclasses.replace(demux(container), tone_map=tone_map)
        if index.frames == 0:
            raise VideoError("the video has no decodable frames")
        timeline = index.timeline(header)
        selection = select(sampling, timeline)
        indices = selection.indices
        admit(indices)
        # beside the runs, on the container's own decoder (the only one that sees the display matrix)
        turn = _PROBES.submit(orientation.probe, video_stream(container).codec_context, index.packets)
        try:
            frames = _decode_selected(index, indices, allocate, turn)
        finally:
            turn.exception()  # the probe is done with the container before it closes
    if len(frames.filled) < len(frames.slots):
        raise VideoError("the video is corrupt or truncated: frames could not be decoded")
    # from the frames' own timestamps where they are usable: right for variable frame rates too
    times = timeline.times_s[indices].tolist() if timeline.times_s is not None else None
    left_hdr = frames.array.dtype == np.uint16
    return DecodedVideo(frames.array, indices, index.frames, timeline.fps, timeline.duration_s, turn.result(),
                        index.color.report(), index.color.transfer if left_hdr else None, times,
                        (selection.start_s, selection.end_s))

"""Container bytes -> T RGB frames sampled uniformly over the whole clip, as a player shows them
(PyAV / FFmpeg).

Frame indices are `floor(linspace(0, n_frames - 1, T))`, as LLaVA-OneVision's evaluation samples
them. The frames are exactly those of a plain sequential decode; the work to get them is cut
three ways:
- The container is opened and demuxed once. Its stream probe decodes no frame (FFmpeg's stream
  probe otherwise decodes several, ~40 ms at 1080p), and the packets are kept in memory.
- The sampled frames are grouped by the keyframe that precedes them. Each group (a run) is
  decoded by a decoder of its own, fed the kept packets from its keyframe on; the runs of every
  request share one pool of as many workers as cores, longest first.
- Frames no other frame refers to are not reconstructed unless sampled (FFmpeg's skip_frame, set
  per packet), and only the sampled frames are converted to RGB.
Runs start only at keyframes that are clean entry points (entry_points.py: not H.264's recovery
points); where a decoder still returns too few frames (a damaged GOP), the run is decoded again
from the keyframe before it.

What a player does, the decoder does too: the default video track of several, frames from the
first clean keyframe on (a clip cut mid-GOP), the display matrix applied (orientation.py), HDR
tone-mapped to SDR (hdr.py), timestamps, duration and rate from the frames' own timestamps.
Limits on size, duration and frame pixels are checked from the container's header before any
packet is read.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np
import torch

from encoder_service import hdr, orientation
from encoder_service.entry_points import clean_entry
from encoder_service.errors import VideoError
from encoder_service.orientation import Orientation


_CORES = os.cpu_count() or 1
# One pool for the decoding of every request: concurrent requests queue for the cores instead of
# each starting its own threads (16 requests x runs x FFmpeg threads would oversubscribe them).
_POOL = ThreadPoolExecutor(max_workers=_CORES, thread_name_prefix="decode")
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


def sample_indices(n_frames: int, num_samples: int) -> list[int]:
    return np.floor(np.linspace(0, n_frames - 1, num_samples)).astype(np.int64).tolist()


def _open(data: bytes | mmap.mmap):
    # a mapped file (a video handed over in shared memory) is read in place; bytes through a file object
    source = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
    try:
        # skip_frame "all" while FFmpeg probes the streams: the probe learns the size and rate
        # from the headers instead of decoding frames (4 against 42 ms for a 1080p clip)
        container = av.open(source, mode="r", options={"skip_frame": "all"})
    except (av.FFmpegError, ValueError, OSError) as err:
        raise VideoError(f"could not read the video container: {err}") from err
    if not container.streams.video:
        container.close()
        raise VideoError("the file has no video stream")
    return container


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    fps: float
    duration_s: float  # 0 when the container does not say


def _video_stream(container):
    """The video track a player would show: FFmpeg's best video stream (the default track among
    several, never cover art), however many audio or other tracks come before it."""
    try:
        return container.streams.best("video")
    except ValueError:
        return None


def _header(container) -> _Header:
    stream = _video_stream(container)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    return _Header(stream.codec_context.width, stream.codec_context.height,
                   float(stream.average_rate or stream.guessed_rate or 0.0), duration)


UNSPECIFIED = 2  # FFmpeg's value of a colour tag that is not given


@dataclass(frozen=True)
class _Tags:
    """A stream's colour tags (FFmpeg's enum values), as the container or the codec header gives them."""

    transfer: int = UNSPECIFIED
    primaries: int = UNSPECIFIED
    matrix: int = UNSPECIFIED
    range: int = 0  # AVCOL_RANGE_UNSPECIFIED
    bit_depth: int = 8

    @classmethod
    def of(cls, codec) -> _Tags:
        depth = codec.format.components[0].bits if codec.format is not None else 8
        return cls(codec.color_trc, codec.color_primaries, codec.colorspace, codec.color_range, depth)

    def report(self) -> hdr.ColorReport:
        return hdr.ColorReport.of(self.transfer, self.primaries, self.bit_depth)


def _pixels(frame, stream: _Tags, tone_map: bool) -> np.ndarray:
    """A decoded frame -> [H, W, 3] RGB: SDR as swscale converts it to uint8 (bit-exact with any
    plain decode); HDR as uint16 R'G'B', tone-mapped to BT.709 SDR uint8 here unless the caller
    does that itself (hdr.py). Tags the frame lacks come from the stream, as
    FFmpeg gives them to the frames of a container's own decoder (the runs' decoders are made from
    the codec alone)."""
    if frame.colorspace == UNSPECIFIED and stream.matrix != UNSPECIFIED:
        frame.colorspace = stream.matrix  # swscale picks the Y'CbCr matrix from it
    if frame.color_range == 0 and stream.range != 0:
        frame.color_range = stream.range
    transfer = frame.color_trc if frame.color_trc != UNSPECIFIED else stream.transfer
    if hdr.is_hdr(transfer):
        rgb48 = frame.to_ndarray(format="rgb48le")  # [H, W, 3] uint16
        return hdr.to_sdr(torch.from_numpy(rgb48), transfer).numpy() if tone_map else rgb48
    return frame.to_ndarray(format="rgb24")


@dataclass(frozen=True)
class _Index:
    """What the one demux pass learns and keeps: the packets, the frame order, the keyframes."""

    codec: av.Codec = field(repr=False)
    extradata: bytes | None = field(repr=False)  # the decoder's setup (H.264's avcC, ...)
    width: int
    height: int
    packets: list = field(repr=False)  # [av.Packet] in decode order, empty ones dropped
    pts: list[int] | None  # presentation time of each frame in presentation order; None when not usable
    keyframes: list[int]  # presentation indices where decoding can start
    entry: dict[int, int]  # keyframe's presentation index -> its packet's position in decode order
    time_base: Fraction | None = None  # of pts
    last_duration: int = 0  # how long the last frame is shown, in time_base (0: not said)
    color: _Tags = field(default_factory=lambda: _Tags())  # the stream's, for frames whose own say nothing
    tone_map: bool = True  # HDR frames tone-mapped to SDR by the runs; False: left as 16-bit R'G'B'

    @property
    def frames(self) -> int:
        return len(self.packets)

    def timestamps_s(self, indices: list[int]) -> list[float] | None:
        """When each frame at `indices` is shown, in seconds from the first frame (variable frame
        rates included); None without usable timestamps."""
        if self.pts is None or self.time_base is None:
            return None
        return [float((self.pts[i] - self.pts[0]) * self.time_base) for i in indices]

    def span_s(self) -> float | None:
        """From the first frame until the last one ends, in seconds; None without timestamps."""
        if self.pts is None or self.time_base is None:
            return None
        gaps = np.diff(self.pts)
        last = self.last_duration or (int(np.median(gaps)) if len(gaps) else 0)
        return float((self.pts[-1] - self.pts[0] + last) * self.time_base)


def _decodable(packets: list, is_clean) -> list:
    """The packets from the first clean entry point on. A clip cut in the middle of a GOP starts
    with frames that refer to frames it no longer has: a decoder makes garbage of them or nothing,
    so they are left out, with the frames after the entry point that are shown before it (they
    refer to the GOP that was cut). A clip that starts at a keyframe loses nothing."""
    first = next((i for i, packet in enumerate(packets) if is_clean(packet)), 0)
    if first == 0 or any(packet.pts is None for packet in packets):
        return packets
    shown_from = packets[first].pts
    return [packet for packet in packets[first:] if packet.pts >= shown_from]


def _demux(container) -> _Index:
    stream = _video_stream(container)
    try:
        packets = [packet for packet in container.demux(stream) if packet.size > 0]
    except av.FFmpegError as err:
        raise VideoError(f"the video is corrupt or truncated: {err}") from err
    codec = stream.codec_context
    clean = {id(packet) for packet in packets
             if packet.is_keyframe and clean_entry(codec.name, codec.extradata, bytes(packet))}
    packets = _decodable(packets, lambda packet: id(packet) in clean)
    pts = [packet.pts for packet in packets]
    if None in pts or len(set(pts)) != len(pts):  # no usable timestamps: decode from the start only
        return _Index(codec.codec, codec.extradata, codec.width, codec.height, packets, None, [0], {0: 0},
                      color=_Tags.of(codec))
    order = sorted(range(len(pts)), key=pts.__getitem__)  # decode order -> presentation order
    rank = {pts[i]: r for r, i in enumerate(order)}
    entry = {rank[pts[i]]: i for i, packet in enumerate(packets) if id(packet) in clean}
    entry.setdefault(0, 0)  # the first frame is always reached from the first packet
    return _Index(codec.codec, codec.extradata, codec.width, codec.height, packets,
                  [pts[i] for i in order], sorted(entry), entry, stream.time_base,
                  packets[order[-1]].duration or 0, _Tags.of(codec))


def _decoder(index: _Index, threads: int):
    """A decoder of its own for one run, set up as the container's stream would set it up."""
    decoder = av.CodecContext.create(index.codec, "r")
    if index.extradata:
        decoder.extradata = index.extradata
    decoder.width, decoder.height = index.width, index.height
    decoder.thread_type = "AUTO"
    decoder.thread_count = threads  # not FFmpeg's default of a thread per core: runs decode side by side
    return decoder


def _decode_run(index: _Index, start: int, wanted: list[int], threads: int = 8) -> dict[int, np.ndarray]:
    """Feed a new decoder the packets from the keyframe at presentation index `start` on, until every
    index in `wanted` (sorted) is found: presentation index -> [H, W, 3] uint8 RGB.

    Frames no other frame refers to are skipped unless wanted: the frames kept are bit for bit
    those of a full decode, for less CPU time, since unreferenced frames that are not sampled are
    never reconstructed (the saving on a phone clip is in docs/bench/README.md).
    """
    found: dict[int, np.ndarray] = {}
    wanted_set = set(wanted)
    rank = {t: r for r, t in enumerate(index.pts)} if index.pts is not None else None
    decoder = _decoder(index, threads)
    position = start  # without timestamps (start is 0): frames come out in presentation order

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
                decoder.skip_frame = "DEFAULT" if rank[packet.pts] in wanted_set else "NONREF"
            if take(decoder.decode(packet)):
                return found
        take(decoder.decode(None))  # the end of the stream: the frames the decoder still holds
    except av.FFmpegError as err:
        raise VideoError(f"the video is corrupt or truncated: {err}") from err
    return found


def _decode_from_clean_entry(index: _Index, start: int, wanted: list[int], threads: int) -> dict[int, np.ndarray]:
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


def _runs(index: _Index, indices: list[int]) -> dict[int, list[int]]:
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
    index: _Index = field(repr=False)

    def decode(self) -> dict[int, np.ndarray]:
        """This run alone, as decode_video decodes it: presentation index -> [H, W, 3] uint8 RGB."""
        return _decode_from_clean_entry(self.index, self.start, self.wanted, decoder_threads(1))  # as if alone


def _index_of(data: bytes) -> _Index:
    with _open(data) as container:
        return _demux(container)


def keyframe_runs(data: bytes, num_frames: int) -> list[KeyframeRun]:
    """The keyframe runs that decode_video decodes in parallel for `num_frames` sampled frames
    (no limits are checked; the benchmark times each run alone)."""
    index = _index_of(data)
    runs = _runs(index, sample_indices(index.frames, num_frames))
    return [KeyframeRun(start, wanted, index) for start, wanted in runs.items()]


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class _Frames:
    """The sampled frames, [T, H, W, 3] uint8, filled by the runs as they finish: each run copies
    its frames into their places on its own worker, so no serial stack of every frame at the end
    (32 frames of 1080p are 200 MB: 30-45 ms for one thread)."""

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


def _decode_selected(index: _Index, indices: list[int], allocate: Allocate,
                     turn: Future[Orientation]) -> _Frames:
    """The frames at `indices`, decoded in parallel from the keyframes that precede them, each run
    a task of the shared pool (FFmpeg releases the GIL while it decodes). The runs that feed the
    most packets go first, so that the longest does not start last."""
    runs = sorted(_runs(index, indices).items(), key=lambda run: _packets_fed(index, *run), reverse=True)
    threads = decoder_threads(len(runs))
    frames = _Frames(indices, allocate, turn)  # a lone run goes through the pool too, so the pool bounds every decode
    for _ in _POOL.map(lambda run: frames.fill(_decode_from_clean_entry(index, *run, threads)), runs):
        pass
    return frames


def _packets_fed(index: _Index, start: int, wanted: list[int]) -> int:
    """About how many packets a run feeds its decoder: from its keyframe to the last wanted frame
    in presentation order (B-frames can sit a few packets on either side in decode order)."""
    return wanted[-1] - start


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def decode_video(data: bytes | mmap.mmap, num_frames: int, limits: VideoLimits,
                 allocate: Allocate = _empty, tone_map: bool = True) -> DecodedVideo:
    """allocate(shape, dtype) -> the array the frames are decoded into (the encoder passes
    page-locked memory on a GPU, so that the frames go to the GPU in one fast copy). tone_map False:
    HDR frames come as uint16 R'G'B' for the caller to tone-map (hdr.to_sdr on its GPU), with
    `hdr_transfer` saying how; SDR frames are uint8 either way."""
    if not data:
        raise VideoError("the video is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise VideoError(f"the video is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    with _open(data) as container:
        header = _header(container)
        if header.width * header.height > limits.max_frame_pixels:
            raise VideoError(f"frames of {header.width}x{header.height} exceed the limit of "
                             f"{limits.max_frame_pixels} pixels per frame")
        if header.duration_s > limits.max_duration_s:
            raise VideoError(f"the video lasts {header.duration_s:.0f} s; the limit is {limits.max_duration_s:.0f} s")
        index = dataclasses.replace(_demux(container), tone_map=tone_map)
        if index.frames == 0:
            raise VideoError("the video has no decodable frames")
        # beside the runs, on the container's own decoder (the only one that sees the display matrix)
        turn = _PROBES.submit(orientation.probe, _video_stream(container).codec_context, index.packets)
        try:
            indices = sample_indices(index.frames, num_frames)
            frames = _decode_selected(index, indices, allocate, turn)
        finally:
            turn.exception()  # the probe is done with the container before it closes
    if len(frames.filled) < len(frames.slots):
        raise VideoError("the video is corrupt or truncated: frames could not be decoded")
    # from the frames' own timestamps where they are usable: right for variable frame rates too
    duration = index.span_s() or header.duration_s
    fps = index.frames / duration if index.span_s() else header.fps
    if duration <= 0 and fps > 0:
        duration = index.frames / fps
    left_hdr = frames.array.dtype == np.uint16
    return DecodedVideo(frames.array, indices, index.frames, fps, duration, turn.result(), index.color.report(),
                        index.color.transfer if left_hdr else None, index.timestamps_s(indices))

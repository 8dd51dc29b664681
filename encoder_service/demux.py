"""One pass over a video container: its video track (the one a player would show), the header's
size, rate, duration and colour tags, and every packet of the track kept in memory, with the
frames' presentation order and the keyframes where decoding can start cleanly (entry_points.py).

The container is read once: its stream probe decodes no frame (FFmpeg's probe otherwise decodes
several, ~40 ms at 1080p), and the demux keeps the packets for the decoders of the keyframe runs
(video_decode.py), so no run opens the file again or seeks in it.
"""

from __future__ import annotations

import bisect
import functools
import io
import mmap
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from encoder_service import hdr
from encoder_service.entry_points import clean_entry
from encoder_service.errors import VideoError
from encoder_service.frame_selection import Timeline


def open_container(data: bytes | mmap.mmap):
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
class Header:
    width: int
    height: int
    fps: float
    duration_s: float  # 0 when the container does not say


def video_stream(container):
    """The video track a player would show: FFmpeg's best video stream (the default track among
    several, never cover art), however many audio or other tracks come before it; open_container
    has made sure there is one."""
    return container.streams.best("video")


def header_of(container) -> Header:
    stream = video_stream(container)
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    else:
        duration = (container.duration or 0) / av.time_base
    return Header(stream.codec_context.width, stream.codec_context.height,
                  float(stream.average_rate or stream.guessed_rate or 0.0), duration)


UNSPECIFIED = 2  # FFmpeg's value of a colour tag that is not given


@dataclass(frozen=True)
class ColorTags:
    """A stream's colour tags (FFmpeg's enum values), as the container or the codec header gives them."""

    transfer: int = UNSPECIFIED
    primaries: int = UNSPECIFIED
    matrix: int = UNSPECIFIED
    range: int = 0  # AVCOL_RANGE_UNSPECIFIED
    bit_depth: int = 8

    @classmethod
    def of(cls, codec) -> ColorTags:
        depth = codec.format.components[0].bits if codec.format is not None else 8
        return cls(codec.color_trc, codec.color_primaries, codec.colorspace, codec.color_range, depth)

    def report(self) -> hdr.ColorReport:
        return hdr.ColorReport.of(self.transfer, self.primaries, self.bit_depth)


@dataclass(frozen=True)
class Index:
    """What the one demux pass learns and keeps: the packets, the frame order, the keyframes."""

    codec: av.Codec = field(repr=False)
    extradata: bytes | None = field(repr=False)  # the decoder's setup (H.264's avcC, ...)
    width: int
    height: int
    packets: list = field(repr=False)  # [av.Packet] in decode order, empty ones dropped
    pts: list[int] | None  # presentation time of each frame shown, in presentation order; None when not usable
    keyframes: list[int]  # presentation indices where decoding can start
    entry: dict[int, int]  # keyframe's presentation index -> its packet's position in decode order
    time_base: Fraction | None = None  # of pts
    last_duration: int = 0  # how long the last frame is shown, in time_base (0: not said)
    color: ColorTags = field(default_factory=lambda: ColorTags())  # the stream's, for frames whose own say nothing
    tone_map: bool = True  # HDR frames tone-mapped to SDR by the runs; False: left as 16-bit R'G'B'

    @functools.cached_property
    def rank(self) -> dict[int, int] | None:
        """pts -> presentation index, made once for all the runs of a request (a 10-minute clip has
        18,000 frames); None without usable timestamps."""
        return {t: r for r, t in enumerate(self.pts)} if self.pts is not None else None

    @property
    def frames(self) -> int:
        """Frames shown (and sampled from): the packets less those an edit list hides."""
        return len(self.pts) if self.pts is not None else len(self.packets)

    def timeline(self, header: Header) -> Timeline:
        """When each frame is shown, for sampling by time: from the timestamps, else from the header's
        frame rate, else unknown."""
        span = self.span_s()
        if span:
            return Timeline((np.asarray(self.pts) - self.pts[0]) * float(self.time_base), self.frames, span)
        if header.fps > 0:
            return Timeline(np.arange(self.frames) / header.fps, self.frames, self.frames / header.fps)
        return Timeline(None, self.frames, header.duration_s)

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


def demux(container) -> Index:
    stream = video_stream(container)
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
        return Index(codec.codec, codec.extradata, codec.width, codec.height, packets, None, [0], {0: 0},
                     color=ColorTags.of(codec))
    # frames an edit list hides (a trimmed clip: FFmpeg flags their packets discard) are decoded where
    # others refer to them, but never shown, counted or sampled
    shown = sorted(packet.pts for packet in packets if not packet.is_discard)  # presentation order
    entry = {}  # the first frame shown from a keyframe on -> the keyframe's packet (a later one wins)
    for position, packet in enumerate(packets):
        first_shown = bisect.bisect_left(shown, packet.pts)
        if id(packet) in clean and first_shown < len(shown):
            entry[first_shown] = position
    entry.setdefault(0, 0)  # the first frame is always reached from the first packet
    last = next(packet for packet in packets if packet.pts == shown[-1])
    return Index(codec.codec, codec.extradata, codec.width, codec.height, packets, shown, sorted(entry), entry,
                 stream.time_base, last.duration or 0, ColorTags.of(codec))


def index_of(data: bytes) -> Index:
    with open_container(data) as container:
        return demux(container)

"""The benchmark's clips, by name: the 360p scene clip and footage like a phone's at 720p and 1080p.

Every clip is generated (no file to download) and deterministic: the same name gives the same
bytes on any machine with the same FFmpeg build (x264 runs on one thread: with several, its output
varies from run to run). Long clips take a while to encode, so `clip()` keeps them in a cache directory.
The 10-minute clip (`720p-10min`, 18,000 frames) would take about 12 minutes on one thread, so it is
encoded in segments of 20 s (each on one x264 thread, in parallel processes) that are joined
packet by packet: still the same bytes on every machine, whatever its number of cores (see
`PhoneClip.segment_s`).

Phone footage is what product backends send: H.264 High profile with B-frames, 30 fps, a fixed
GOP of 1-2 s (phones do not cut GOPs at scene changes), and about the bitrate a phone records at
(16 Mbit/s at 1080p, 8 Mbit/s at 720p). The content is a handheld camera panning and pushing in
over a textured scene with objects crossing it and sensor grain: decoding cost follows the
bitrate and the motion, and a clip of flat colours would decode several times faster than
real footage.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from bench.video import benchmark_clip


@dataclass(frozen=True)
class PhoneClip:
    width: int
    height: int
    seconds: float
    fps: int = 30
    gop_s: float = 2.0
    bitrate_mbps: float = 16.0
    grain: int = 3  # sensor noise, +-grain levels of luma
    # None: 8-bit H.264. "hlg", "pq" or "bt709": 10-bit HEVC in BT.2020 tagged with this transfer, as
    # recent phones record HDR (the picture is the same; what a decoder does with the tags is measured)
    transfer: str | None = None
    # Seconds per segment encoded on its own, all of them in parallel processes, then joined: None =
    # one encode. A whole number of GOPs, so every segment starts at a keyframe as the one encode
    # would; each segment's x264 starts its rate control afresh (nothing a decoder can see besides
    # the bits spent). Left out of repr(), which names the cached files, so that the other clips'
    # cache files keep their names; clip() adds it to the name when it is set.
    segment_s: float | None = field(default=None, repr=False)

    @property
    def frames(self) -> int:
        return round(self.seconds * self.fps)


CLIPS: dict[str, PhoneClip | None] = {  # None: the 360p scene clip of bench/video.py
    "360p": None,
    "1080p-30s": PhoneClip(1920, 1080, 30.0, gop_s=2.0, bitrate_mbps=16.0),
    "720p-2min": PhoneClip(1280, 720, 120.0, gop_s=1.0, bitrate_mbps=8.0),
    # HDR as an iPhone records it (HEVC, HLG), and the same stream tagged SDR: the cost of tone mapping
    "1080p-10s-hlg": PhoneClip(1920, 1080, 10.0, gop_s=1.0, bitrate_mbps=10.0, transfer="hlg"),
    "1080p-10s-hevc-sdr": PhoneClip(1920, 1080, 10.0, gop_s=1.0, bitrate_mbps=10.0, transfer="bt709"),
    # a long video (issue 16): 720p-2min for 10 minutes, encoded in 30 segments of 20 s in parallel
    # (measured on the 2-core CPU: 23-30 frames/s for one x264 thread at 720p, so 18,000 frames on one
    # thread take 10-13 minutes; in segments about a sixteenth of that on 16 cores)
    "720p-10min": PhoneClip(1280, 720, 600.0, gop_s=1.0, bitrate_mbps=8.0, segment_s=20.0),
}
# one thread: with several, x264's output changes from run to run (measured: four encodes of the
# same 2 s clip at 8 threads gave four different files and frames); a 1080p 30 s clip then takes
# about 75 s to make on the 2-core CPU, once
X264_THREADS = "1"


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """[height, width] float32 in about [-1, 1]: random values on a grid of `cells` columns,
    bilinearly interpolated (a texture whose detail is `width / cells` pixels)."""
    rows = max(2, cells * height // width)
    grid = rng.standard_normal((rows + 1, cells + 1)).astype(np.float32)
    ys = np.linspace(0, rows, height, dtype=np.float32)
    xs = np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), rows - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _world(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A scene larger than the frame, as Y [height, width] and U, V [height/2, width/2] uint8 planes:
    smooth shading, texture at several scales and hard-edged shapes (buildings, signs)."""
    luma = sum(_smooth_noise(rng, height, width, cells) * weight
               for cells, weight in ((4, 50.0), (24, 25.0), (160, 12.0), (width // 6, 6.0)))
    for _ in range(60):  # hard edges: what costs bits and decode time in real footage
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        h, w = rng.integers(20, height // 4), rng.integers(20, width // 8)
        luma[y : y + h, x : x + w] += rng.uniform(-60, 60)
    luma = np.clip(luma + 120, 16, 235).astype(np.uint8)
    chroma = [np.clip(_smooth_noise(rng, height // 2, width // 2, cells) * 30 + 128, 16, 240).astype(np.uint8)
              for cells in (6, 9)]
    return luma, chroma[0], chroma[1]


def _phone_frames(spec: PhoneClip, seed: int = 0, first: int = 0, stop: int | None = None):
    """yuv420p frames of a handheld camera over `_world`: a slow pan along a path, a push-in and
    back, a shake of a few pixels, objects crossing the frame, and grain; [H * 3 / 2, W] uint8 each.
    Frames first..stop-1 of the clip only (a segment): the same frames the whole clip has there."""
    rng = np.random.default_rng(seed)
    width, height = spec.width, spec.height
    world_w, world_h = int(width * 2.2) // 2 * 2, int(height * 1.6) // 2 * 2
    luma, u_plane, v_plane = _world(rng, world_h, world_w)
    grain = rng.integers(-spec.grain, spec.grain + 1, size=(8, height + 64, width + 64), dtype=np.int16)
    movers = [(rng.integers(60, max(61, height // 3)), rng.integers(80, max(81, width // 4)),  # h, w
               rng.uniform(-9, 9), rng.uniform(-3, 3), rng.integers(30, 220), rng.integers(0, 4 * width))
              for _ in range(5)]
    shake = np.cumsum(rng.normal(0, 1.2, size=(spec.frames, 2)), axis=0)
    shake -= np.linspace(0, 1, spec.frames)[:, None] * shake[-1]  # drifts back: the path stays in the world
    for t in range(first, spec.frames if stop is None else stop):
        phase = t / spec.frames
        x = int((world_w - width) * (0.5 - 0.45 * np.cos(2 * np.pi * phase)) + shake[t, 0] * 2) // 2 * 2
        y = int((world_h - height) * (0.5 + 0.4 * np.sin(4 * np.pi * phase)) + shake[t, 1] * 2) // 2 * 2
        x, y = min(max(x, 0), world_w - width), min(max(y, 0), world_h - height)
        frame = np.empty((height * 3 // 2, width), dtype=np.uint8)
        y_plane = luma[y : y + height, x : x + width].astype(np.int16)
        for h, w, vx, vy, shade, x0 in movers:  # objects crossing the frame, not the world
            left = int(x0 + vx * t) % (width + w) - w
            top = int(height / 3 + vy * t) % (height - h)
            y_plane[top : top + h, max(0, left) : max(0, left + w)] = shade
        gy, gx = (7 * t) % 64, (13 * t) % 64
        y_plane += grain[t % 8, gy : gy + height, gx : gx + width]
        frame[:height] = np.clip(y_plane, 0, 255)
        cu = u_plane[y // 2 : y // 2 + height // 2, x // 2 : x // 2 + width // 2]
        cv = v_plane[y // 2 : y // 2 + height // 2, x // 2 : x // 2 + width // 2]
        frame[height:] = np.concatenate([cu, cv], axis=1).reshape(height // 2, width)
        yield frame


_X265_TRANSFER = {"hlg": "arib-std-b67", "pq": "smpte2084", "bt709": "bt709"}


def _encoder(spec: PhoneClip) -> tuple[str, str, dict[str, str]]:
    """(codec, pixel format, options) of the clip's encoder: one thread either way (see X264_THREADS)."""
    rate, gop = f"{spec.bitrate_mbps}M", str(round(spec.gop_s * spec.fps))
    if spec.transfer is None:
        return "libx264", "yuv420p", {
            "profile": "high", "preset": "veryfast", "bf": "3", "g": gop, "b": rate, "maxrate": rate,
            "bufsize": f"{2 * spec.bitrate_mbps}M", "threads": X264_THREADS,
            "x264-params": "scenecut=0:b-pyramid=normal"}
    return "libx265", "yuv420p10le", {"preset": "ultrafast", "b": rate, "x265-params": (
        f"log-level=error:pools=1:frame-threads=1:keyint={gop}:min-keyint={gop}:scenecut=0:bframes=3:"
        f"colorprim=bt2020:colormatrix=bt2020nc:transfer={_X265_TRANSFER[spec.transfer]}")}


def encode_phone_clip(spec: PhoneClip, seed: int = 0) -> bytes:
    """The clip as a phone records it: MP4, B-frames, a fixed GOP, a target bitrate; H.264 High
    profile, or 10-bit HEVC for the HDR clips. A clip with `segment_s` is encoded in segments, in
    parallel processes, and joined (_encode_segmented)."""
    if spec.segment_s is not None:
        return _encode_segmented(spec, seed)
    return _encode_frames(spec, _phone_frames(spec, seed))


def _encode_frames(spec: PhoneClip, frames) -> bytes:
    codec, pix_fmt, options = _encoder(spec)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=spec.fps, options=options)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, pix_fmt
        for planes in frames:
            if pix_fmt == "yuv420p10le":
                planes = planes.astype(np.uint16) << 2  # the same picture at 10 bits
            frame = av.VideoFrame.from_ndarray(planes, format=pix_fmt)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def _encode_segment(spec: PhoneClip, seed: int, first: int, stop: int) -> bytes:
    return _encode_frames(spec, _phone_frames(spec, seed, first, stop))


def segment_bounds(spec: PhoneClip) -> list[tuple[int, int]]:
    """The frames (first, stop) of each segment of a clip with segment_s: a whole number of GOPs each."""
    per, gop = round(spec.segment_s * spec.fps), round(spec.gop_s * spec.fps)
    if per <= 0 or per % gop:
        raise ValueError(f"segment_s ({spec.segment_s}) must be a whole number of GOPs ({spec.gop_s} s)")
    return [(first, min(first + per, spec.frames)) for first in range(0, spec.frames, per)]


def _encode_segmented(spec: PhoneClip, seed: int, workers: int | None = None) -> bytes:
    """The segments encoded in parallel processes (each x264 on one thread, so each segment is the
    same bytes every time), then their packets joined into one MP4, each segment's timestamps moved
    after the one before: the bytes do not depend on the number of processes. Processes are spawned,
    not forked: the caller may hold threads (a benchmark's) that a fork would copy mid-work."""
    bounds = segment_bounds(spec)
    workers = min(len(bounds), workers or os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        segments = list(pool.map(_encode_segment, *zip(*[(spec, seed, first, stop) for first, stop in bounds])))
    return join_segments(segments, [stop - first for first, stop in bounds], spec.fps)


def join_segments(segments: list[bytes], frames: list[int], fps: int) -> bytes:
    """MP4 segments of one stream (same codec settings, each starting at a keyframe, `frames[i]`
    frames at `fps` each) as one MP4: the packets as they are, each segment's timestamps moved by
    the duration of the segments before it (what FFmpeg's concat demuxer does)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as target:
        out_stream, start = None, Fraction(0)  # seconds
        for data, count in zip(segments, frames):
            with av.open(io.BytesIO(data)) as source:
                in_stream = source.streams.video[0]
                if out_stream is None:
                    out_stream = target.add_stream_from_template(in_stream)
                offset = int(start / in_stream.time_base)
                for packet in source.demux(in_stream):
                    if packet.dts is None:  # the demuxer's empty packet at the end
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    packet.stream = out_stream
                    target.mux(packet)
            start += Fraction(count, fps)
    return buffer.getvalue()


def default_cache_dir() -> Path:
    """$VIDEOLLM_BENCH_CLIPS, or ~/.cache/videollm-bench: where clip() keeps the clips."""
    return Path(os.environ.get("VIDEOLLM_BENCH_CLIPS", Path.home() / ".cache" / "videollm-bench"))


def clip_path(name: str, cache_dir: Path | None = None) -> Path | None:
    """Where clip() keeps the named clip (there or not yet), or None for a clip that is not cached
    (the 360p clip, made in seconds)."""
    if name not in CLIPS:
        raise ValueError(f"no clip named {name!r}; the clips are {', '.join(CLIPS)}")
    spec = CLIPS[name]
    if spec is None:
        return None
    # the file name carries the spec and the FFmpeg build, so a changed generator never reads a stale file
    text = f"{spec}{X264_THREADS}{av.library_versions}{_GENERATOR_VERSION}"
    if spec.segment_s is not None:  # not in repr(spec): see PhoneClip.segment_s
        text += f"segment_s={spec.segment_s}"
    tag = hashlib.sha256(text.encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir()) / f"{name}-{tag}.mp4"


def clip(name: str, cache_dir: Path | None = None) -> bytes:
    """The named clip's bytes, generated once and then read from `cache_dir` (default
    $VIDEOLLM_BENCH_CLIPS or ~/.cache/videollm-bench)."""
    path = clip_path(name, cache_dir)
    if path is None:
        return benchmark_clip()
    if path.exists():
        return path.read_bytes()
    data = encode_phone_clip(CLIPS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return data


_GENERATOR_VERSION = 2  # bump when _phone_frames or encode_phone_clip change what they make


def describe(data: bytes) -> dict:
    """What a clip is, read back from its bytes: size, resolution, frames, duration, bitrate, GOP."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        keys = frames = 0
        for packet in container.demux(stream):
            if packet.size:
                frames += 1
                keys += packet.is_keyframe
        duration = float(stream.duration * stream.time_base) if stream.duration else frames / float(stream.average_rate)
        return {"bytes": len(data), "width": stream.codec_context.width, "height": stream.codec_context.height,
                "codec": stream.codec_context.name, "profile": stream.codec_context.profile, "frames": frames,
                "duration_s": round(duration, 2), "keyframes": keys,
                "mbit_per_s": round(len(data) * 8 / duration / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description="generate the benchmark's clips (cached) and describe them")
    parser.add_argument("names", nargs="*", default=list(CLIPS), help=f"clips, of {', '.join(CLIPS)}")
    parser.add_argument("--out", type=Path, help="also write each clip to this directory")
    parser.add_argument("--cache-dir", type=Path, help="the clips' cache (default: $VIDEOLLM_BENCH_CLIPS or "
                                                       "~/.cache/videollm-bench)")
    args = parser.parse_args()
    for name in args.names:
        data = clip(name, args.cache_dir)
        print(name, describe(data))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.mp4").write_bytes(data)


if __name__ == "__main__":
    main()

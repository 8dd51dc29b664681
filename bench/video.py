"""Video clips made with PyAV (no ffmpeg binary needed): `encode` for any frames, a small moving
pattern (`moving_frames`, the load test's and the tests' clips), and the benchmark clip.

The benchmark clip is deterministic, with camera motion, moving objects and hard scene cuts:
Stage I's savings depend on content, so it is neither noise nor a still. Four scenes of six
seconds (a pan over a gradient landscape, objects crossing a room, a zoom, a busy street of
rectangles), 640x360 at 24 fps, H.264.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable

import av
import numpy as np

CONTAINERS = {  # format -> (container format, codec, pixel format)
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mp4-lossless": ("mp4", "libx264", "yuv444p"),  # with qp 0: decodes to exactly the frames given
    "webm": ("webm", "libvpx", "yuv420p"),
    "webm-vp9": ("webm", "libvpx-vp9", "yuv420p"),
    "mp4-hevc": ("mp4", "libx265", "yuv420p"),  # x265 makes open GOPs unless told otherwise
    "avi-mjpeg": ("avi", "mjpeg", "yuvj420p"),  # intra only, as some cameras record
    "mov": ("mov", "libx264", "yuv420p"),
    "ts": ("mpegts", "libx264", "yuv420p"),  # H.264 as a byte stream (start codes), not length-prefixed
    "avi": ("avi", "mpeg4", "yuv420p"),
}
WIDTH, HEIGHT, FPS, SCENE_SECONDS = 640, 360, 24, 6


def encode(frames: np.ndarray | Iterable[np.ndarray], fmt: str = "mp4", fps: int = 24,
           options: dict[str, str] | None = None, display: tuple[float, bool, bool] | None = None) -> bytes:
    """Frames [H, W, 3] uint8 RGB (an array [T, H, W, 3] or any iterable of frames) -> the video's bytes.

    options: the encoder's (GOP length, B-frames, preset, ...); "mp4-lossless" sets qp 0 itself.
    display: a display matrix as phones write one: (degrees counterclockwise, mirror left-right,
    mirror top-bottom) that a player applies to the stored frames.
    """
    container_format, codec, pix_fmt = CONTAINERS[fmt]
    if fmt == "mp4-lossless":
        options = {"qp": "0", **(options or {})}
    if isinstance(frames, np.ndarray):
        height, width = frames.shape[1], frames.shape[2]
    else:  # the size from the first frame, without holding every frame at once
        frames = iter(frames)
        first = next(frames)
        height, width = first.shape[0], first.shape[1]
        frames = itertools.chain([first], frames)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if display is not None:
            degrees, hflip, vflip = display
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def moving_frames(n: int, width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """[n, H, W, 3] uint8: a gradient background with a square that moves (deterministic; every seed
    gives other colours)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    ys, xs = np.mgrid[0:height, 0:width]
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frame = np.stack([(xs + 3 * i + base[0]) % 256, (ys + 2 * i + base[1]) % 256,
                          np.full_like(xs, (base[2] + 5 * i) % 256)], axis=-1)
        x0, y0 = (7 * i) % (width - 24), (5 * i) % (height - 24)
        frame[y0 : y0 + 24, x0 : x0 + 24] = 255
        frames[i] = frame
    return frames


def _scene(index: int, t: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(index)
    palette = rng.integers(30, 230, size=(6, 3))
    if index == 0:  # pan across a landscape of bands
        u = (xs + 4 * t) / WIDTH
        frame = np.stack([(120 + 100 * np.sin(6.28 * u + c)) for c in (0.0, 2.0, 4.0)], axis=-1)
        frame[ys > HEIGHT * (0.6 + 0.1 * np.sin(6.28 * u))] = palette[0]
    elif index == 1:  # a room with objects crossing it
        frame = np.empty((HEIGHT, WIDTH, 3))
        frame[:] = palette[1]
        frame[ys > HEIGHT * 0.7] = palette[2]
        for k in range(4):
            x0 = int((k * 160 + (k + 1) * 5 * t) % (WIDTH + 80)) - 80
            y0 = 80 + 50 * k
            frame[y0 : y0 + 60, max(0, x0) : max(0, x0 + 80)] = palette[3 + k % 3]
    elif index == 2:  # zoom into rings
        r = np.hypot(xs - WIDTH / 2, ys - HEIGHT / 2) * (1 + 0.02 * t)
        frame = np.stack([128 + 120 * np.sin(r / 9 + c) for c in (0.0, 1.0, 2.0)], axis=-1)
    else:  # a busy street: many small moving blocks
        frame = np.empty((HEIGHT, WIDTH, 3))
        frame[:] = palette[4]
        for k in range(24):
            x0 = int((rng.integers(0, WIDTH) + (k % 5 + 1) * 3 * t) % WIDTH)
            y0 = int(rng.integers(0, HEIGHT - 30))
            frame[y0 : y0 + 30, x0 : x0 + 40] = palette[k % 6]
    return np.clip(frame, 0, 255).astype(np.uint8)


def benchmark_clip() -> bytes:
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = (_scene(scene, t, ys, xs) for scene in range(4) for t in range(SCENE_SECONDS * FPS))
    # one x264 thread: with several, its output varies from run to run (bench/clips.py)
    return encode(frames, "mp4", FPS, {"preset": "veryfast", "crf": "23", "threads": "1"})


def variant(clip: bytes, index: int) -> bytes:
    """The same frames under different bytes (a remux with a tag), so each request is a cache miss."""
    source = av.open(io.BytesIO(clip))
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as target:
        target.metadata["comment"] = f"videollm bench variant {index}"
        in_stream = source.streams.video[0]
        out_stream = target.add_stream_from_template(in_stream)
        for packet in source.demux(in_stream):
            if packet.dts is None:
                continue
            packet.stream = out_stream
            target.mux(packet)
    source.close()
    return buffer.getvalue()

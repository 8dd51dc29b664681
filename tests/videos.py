"""Small test videos made with PyAV (no ffmpeg binary needed): moving patterns, cuts, still clips."""

from __future__ import annotations

import io

import av
import numpy as np

CONTAINERS = {  # format -> (container format, codec, pixel format)
    "mp4": ("mp4", "libx264", "yuv420p"),
    "mp4-lossless": ("mp4", "libx264", "yuv444p"),  # with qp 0: decodes to exactly the frames given
    "webm": ("webm", "libvpx", "yuv420p"),
    "mov": ("mov", "libx264", "yuv420p"),
    "avi": ("avi", "mpeg4", "yuv420p"),
}


def moving_frames(n: int, width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """[n, H, W, 3] uint8: a gradient background with a square that moves (deterministic)."""
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


def encode(frames: np.ndarray, fmt: str = "mp4", fps: int = 24, options: dict[str, str] | None = None) -> bytes:
    """options: the encoder's (GOP length, B-frames, ...); "mp4-lossless" sets qp 0 itself."""
    container_format, codec, pix_fmt = CONTAINERS[fmt]
    if fmt == "mp4-lossless":
        options = {"qp": "0", **(options or {})}
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def make_video(fmt: str = "mp4", n_frames: int = 48, seed: int = 0, width: int = 160, height: int = 120) -> bytes:
    return encode(moving_frames(n_frames, width, height, seed), fmt)


def still_frames(n: int, width: int = 160, height: int = 120, seed: int = 0) -> np.ndarray:
    """[n, H, W, 3]: the same frame n times (a perfectly still clip)."""
    return np.repeat(moving_frames(1, width, height, seed), n, axis=0)


def scene_cut_frames(scenes: int, per_scene: int, width: int = 160, height: int = 120) -> np.ndarray:
    """[scenes * per_scene, H, W, 3]: still scenes with hard cuts between them (unrelated random images)."""
    rng = np.random.default_rng(1234)
    images = [rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8) for _ in range(scenes)]
    return np.concatenate([np.repeat(image[None], per_scene, axis=0) for image in images])


def make_still_video(fmt: str = "mp4", n_frames: int = 32) -> bytes:
    return encode(still_frames(n_frames), fmt)


def make_scene_cut_video(scenes: int = 4, per_scene: int = 12, fmt: str = "mp4") -> bytes:
    return encode(scene_cut_frames(scenes, per_scene), fmt)

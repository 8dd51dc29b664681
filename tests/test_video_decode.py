"""Sampled decoding (parallel per keyframe segment, unreferenced frames skipped unless wanted) gives
exactly the frames that a plain decode of every frame gives."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

import threading
from concurrent.futures import ThreadPoolExecutor

from encoder_service import video_decode
from encoder_service.video_decode import VideoLimits, _scan, decode_video, decoder_threads, sample_indices
from videos import encode, moving_frames

LIMITS = VideoLimits(max_bytes=1 << 30, max_duration_s=3600, max_frame_pixels=1 << 24)


def _every_frame(video: bytes) -> list[np.ndarray]:
    """The reference: one thread decodes every frame, in presentation order."""
    with av.open(io.BytesIO(video)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


CLIPS = {  # name -> (tests.videos format, encoder options)
    # short GOPs with B-frames (some referenced, some not): several segments, frames to skip
    "h264-bframes": ("mp4", {"g": "12", "bf": "3", "x264-params": "b-pyramid=normal:scenecut=0"}),
    "h264-no-bframes": ("mp4", {"g": "10", "bf": "0"}),
    "vp8": ("webm", {"g": "9"}),
    "mpeg4-avi": ("avi", {"g": "8", "bf": "2"}),
}


@pytest.fixture(scope="module", params=sorted(CLIPS))
def clip(request):
    fmt, options = CLIPS[request.param]
    video = encode(moving_frames(60, 96, 64, seed=3), fmt, options=options)
    return request.param, video, _every_frame(video)


@pytest.mark.parametrize("samples", [1, 7, 16, 32, 60, 80])
def test_sampled_frames_equal_a_full_decode(clip, samples):
    name, video, reference = clip
    decoded = decode_video(video, samples, LIMITS)
    assert decoded.source_frames == len(reference) == 60
    assert decoded.frame_indices == sample_indices(len(reference), samples)
    assert decoded.frames.shape == (samples, 64, 96, 3)
    for got, index in zip(decoded.frames, decoded.frame_indices):
        assert np.array_equal(got, reference[index]), f"{name}: frame {index} differs from a full decode"


def test_the_clips_exercise_several_segments_and_skipped_frames():
    """Guards the test above: the H.264 clip has several keyframes (so segments decode in parallel)
    and frames no other frame refers to (so skipping happens)."""
    fmt, options = CLIPS["h264-bframes"]
    video = encode(moving_frames(60, 96, 64, seed=3), fmt, options=options)
    assert len(_scan(video).keyframes) >= 4
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        decoded_with_skip = sum(1 for _ in container.decode(stream))
    assert decoded_with_skip < 50


def test_decoder_threads_share_out_the_cores_between_1_and_8():
    cores = video_decode._CORES
    counts = [decoder_threads(segments) for segments in range(1, 65)]
    assert all(1 <= count <= 8 for count in counts)
    assert counts == sorted(counts, reverse=True)  # more segments side by side, fewer threads each
    assert decoder_threads(1) == min(8, 2 * cores) and decoder_threads(4 * cores) == 1


def test_concurrent_requests_share_one_bounded_decode_pool(monkeypatch):
    """Segments of many requests at once never decode on more workers than the pool has, and each
    request still gets exactly its frames."""
    running, peak, lock = 0, 0, threading.Lock()
    decode_segment = video_decode._decode_segment

    def counting(*args):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            return decode_segment(*args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(video_decode, "_decode_segment", counting)
    fmt, options = CLIPS["h264-bframes"]
    videos = [encode(moving_frames(60, 96, 64, seed=seed), fmt, options=options) for seed in range(6)]
    with ThreadPoolExecutor(len(videos)) as requests:
        decoded = list(requests.map(lambda video: decode_video(video, 16, LIMITS), videos))
    assert 1 <= peak <= video_decode._POOL._max_workers
    for video, result in zip(videos, decoded):
        reference = _every_frame(video)
        assert all(np.array_equal(got, reference[i]) for got, i in zip(result.frames, result.frame_indices))

"""Sampled decoding (parallel per keyframe run, unreferenced frames skipped unless wanted) gives
exactly the frames that a plain decode of every frame gives, for the codecs and stream layouts
users send: B-frames or not, open GOPs, intra refresh, variable frame rate, byte streams."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import av
import numpy as np
import pytest

import threading
from concurrent.futures import ThreadPoolExecutor

from encoder_service import video_decode
from encoder_service.demux import index_of
from encoder_service.video_decode import VideoError, VideoLimits, decode_video, decoder_threads, sample_indices
from videos import encode, make_vfr_video, moving_frames

LIMITS = VideoLimits(max_bytes=1 << 30, max_duration_s=3600, max_frame_pixels=1 << 24)


def _every_frame(video: bytes) -> list[np.ndarray]:
    """The reference: one thread decodes every frame, in presentation order."""
    with av.open(io.BytesIO(video)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _coded(fmt: str, options: dict[str, str]):
    return lambda: encode(moving_frames(60, 96, 64, seed=3), fmt, options=options)


CLIPS = {  # name -> the clip (60 frames of 96x64)
    # short GOPs with B-frames (some referenced, some not): several runs, frames to skip
    "h264-bframes": _coded("mp4", {"g": "12", "bf": "3", "x264-params": "b-pyramid=normal:scenecut=0"}),
    "h264-no-bframes": _coded("mp4", {"g": "10", "bf": "0"}),
    # keyframes that are not IDR: B-frames after them in decode order are shown before them and
    # refer to the GOP before (test_open_gop_clips_have_leading_frames checks that they exist)
    "h264-open-gop": _coded("mp4", {"g": "12", "bf": "3", "x264-params": "open-gop=1:scenecut=0"}),
    # no IDR after the first frame: decoding from a later "keyframe" returns nothing until its
    # recovery point, so runs fall back to the keyframe before (test_intra_refresh_... checks it)
    "h264-intra-refresh": _coded("mp4", {"bf": "0", "x264-params": "intra-refresh=1:keyint=12:scenecut=0"}),
    "h264-mpegts": _coded("ts", {"g": "12", "bf": "2", "x264-params": "scenecut=0"}),  # NAL units after start codes, not lengths
    "h264-vfr": lambda: make_vfr_video(moving_frames(60, 96, 64, seed=3), [33, 33, 50, 17, 100, 33]),
    "hevc-open-gop": _coded("mp4-hevc", {"x265-params": "keyint=12:min-keyint=12:bframes=3:log-level=error"}),
    "vp8": _coded("webm", {"g": "9"}),
    "vp9": _coded("webm-vp9", {"g": "9"}),
    "mpeg4-avi": _coded("avi", {"g": "8", "bf": "2"}),
    "mjpeg-avi": _coded("avi-mjpeg", {}),
}


@pytest.fixture(scope="module", params=sorted(CLIPS))
def clip(request):
    video = CLIPS[request.param]()
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
    video = CLIPS["h264-bframes"]()
    assert len(index_of(video).keyframes) >= 4
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        decoded_with_skip = sum(1 for _ in container.decode(stream))
    assert decoded_with_skip < 50


def _leading_frames(video: bytes) -> int:
    """Frames decoded after a keyframe but shown before it (they may refer to the GOP before)."""
    with av.open(io.BytesIO(video)) as container:
        packets = [(packet.pts, packet.is_keyframe) for packet in container.demux(video=0) if packet.size]
    return sum(1 for k, (key_pts, key) in enumerate(packets) if key and k > 0
               for pts, _ in packets[k + 1 : k + 8] if pts < key_pts)


def test_open_gop_clips_have_leading_frames():
    """Guards the open-GOP clips of the test above: keyframes with frames that refer across them."""
    assert _leading_frames(CLIPS["h264-open-gop"]()) > 0 and _leading_frames(CLIPS["hevc-open-gop"]()) > 0
    assert _leading_frames(CLIPS["h264-bframes"]()) == 0


@pytest.mark.parametrize("name, entries", [
    ("h264-bframes", [0, 12, 24, 36, 48]), ("h264-mpegts", [0, 12, 24, 36, 48]),
    ("hevc-open-gop", [0, 12, 24, 36, 48]),  # CRA pictures: clean for every frame shown after them
    # recovery points, not IDR frames: a decoder started there returns frames that differ
    ("h264-open-gop", [0]), ("h264-intra-refresh", [0]),
])
def test_runs_start_only_at_clean_entry_points(name, entries):
    video = CLIPS[name]()
    with av.open(io.BytesIO(video)) as container:
        keyframes = sum(1 for packet in container.demux(video=0) if packet.size and packet.is_keyframe)
    assert keyframes >= 5  # the container flags (at least) every GOP's first frame as a keyframe
    assert index_of(video).keyframes == entries


def test_intra_refresh_frames_differ_when_decoded_from_a_recovery_point():
    """Why recovery points are not entry points: from there the decoder returns wrong frames."""
    video = CLIPS["h264-intra-refresh"]()
    index = index_of(video)
    unchecked = dataclasses.replace(index, keyframes=[0, 48], entry={0: 0, 48: 48})
    frame_59 = video_decode._decode_run(unchecked, 48, [59])[59]
    assert not np.array_equal(frame_59, _every_frame(video)[59])


@pytest.mark.parametrize("name", ["hevc-open-gop", "mpeg4-avi", "vp9"])
def test_a_run_from_a_damaged_keyframe_starts_again_from_the_keyframe_before(name):
    """A keyframe flagged on a frame that is not one (a damaged file): from it the HEVC and MPEG-4
    decoders return nothing and VP9's fails, so the run falls back to the keyframe before and
    still returns the exact frames."""
    video = CLIPS[name]()
    index = index_of(video)
    damaged = dataclasses.replace(index, keyframes=[0, 5], entry={0: 0, 5: index.packets.index(
        next(p for p in index.packets if p.pts == index.pts[5]))})
    with pytest.raises(VideoError) if name == "vp9" else contextlib.nullcontext():
        assert video_decode._decode_run(damaged, 5, [6, 7]) == {}
    found = video_decode._decode_from_clean_entry(damaged, 5, [6, 7], 1)
    reference = _every_frame(video)
    assert sorted(found) == [6, 7] and all(np.array_equal(found[i], reference[i]) for i in found)


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
    decode_segment = video_decode._decode_run

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

    monkeypatch.setattr(video_decode, "_decode_run", counting)
    options = {"g": "12", "bf": "3", "x264-params": "b-pyramid=normal:scenecut=0"}
    videos = [encode(moving_frames(60, 96, 64, seed=seed), "mp4", options=options) for seed in range(6)]
    with ThreadPoolExecutor(len(videos)) as requests:
        decoded = list(requests.map(lambda video: decode_video(video, 16, LIMITS), videos))
    assert 1 <= peak <= video_decode.POOL.workers
    for video, result in zip(videos, decoded):
        reference = _every_frame(video)
        assert all(np.array_equal(got, reference[i]) for got, i in zip(result.frames, result.frame_indices))


def test_a_video_that_changes_resolution_mid_stream_is_refused_with_a_clear_error():
    """Two MPEG-TS clips of different sizes, end to end (a byte stream can switch size at any IDR)."""
    small = encode(moving_frames(24, 96, 64, seed=1), "ts", options={"g": "12", "bf": "0"})
    large = encode(moving_frames(24, 128, 96, seed=2), "ts", options={"g": "12", "bf": "0"})
    with pytest.raises(VideoError, match="changes resolution mid-stream"):
        decode_video(small + large, 16, LIMITS)

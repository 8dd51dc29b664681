"""Phone footage as phones write it: display matrices (portrait, mirrored front cameras)."""

from __future__ import annotations

import io
import itertools

import av
import httpx
import numpy as np
import pytest

from encoder_service.orientation import Orientation, from_display_matrix
from encoder_service.video_decode import VideoError, VideoLimits, decode_video
from helpers import data_url, video_chat
from videos import moving_frames

LIMITS = VideoLimits(max_bytes=1 << 30, max_duration_s=3600, max_frame_pixels=1 << 24)


def stored_with_display_matrix(frames: np.ndarray, degrees: int, hflip: bool = False, vflip: bool = False,
                               bframes: int = 2) -> bytes:
    """H.264 with a display matrix that turns the frames `degrees` counterclockwise, then mirrors
    them, as a player shows them."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24, options={"qp": "0", "g": "6", "bf": str(bframes)})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


STORED = moving_frames(20, 96, 64, seed=7)  # [20, 64, 96, 3]: landscape as stored


def as_stored(video: bytes) -> np.ndarray:
    """[T, H, W, 3]: every frame as stored, the display matrix not applied (PyAV's plain decode)."""
    with av.open(io.BytesIO(video)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.mark.parametrize("degrees, mirrored", list(itertools.product([0, 90, 180, 270], [False, True])))
def test_frames_come_out_as_a_player_shows_them(degrees, mirrored):
    video = stored_with_display_matrix(STORED, degrees, hflip=mirrored)
    decoded = decode_video(video, 8, LIMITS)
    stored = as_stored(video)
    upright = np.stack([np.rot90(stored[i], degrees // 90) for i in decoded.frame_indices])
    if mirrored:
        upright = upright[:, :, ::-1]
    assert decoded.frames.shape == upright.shape  # portrait for 90 and 270
    assert np.array_equal(decoded.frames, upright)
    assert decoded.orientation == Orientation(degrees, mirrored)


def test_a_vertical_flip_is_a_half_turn_mirrored():
    video = stored_with_display_matrix(STORED, 0, vflip=True)
    decoded = decode_video(video, 4, LIMITS)
    assert decoded.orientation == Orientation(180, True)
    assert np.array_equal(decoded.frames, as_stored(video)[decoded.frame_indices][:, ::-1])


def test_a_turn_that_is_not_a_multiple_of_90_degrees_is_refused():
    with pytest.raises(VideoError, match="not a multiple of 90 degrees"):
        decode_video(stored_with_display_matrix(STORED, 30), 4, LIMITS)
    assert from_display_matrix(None) == Orientation()


def test_the_answer_reports_how_the_frames_were_turned(gateway, clean_redis):
    body = video_chat(data_url(stored_with_display_matrix(STORED, 270, hflip=True)), "What is shown?",
                      max_tokens=2, videollm={"num_frames": 4})
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    source = response.json()["videollm"]["source"]
    assert (source["rotation"], source["mirrored"]) == (270, True)

"""Phone footage as phones write it: display matrices (portrait, mirrored front cameras)."""

from __future__ import annotations

import io
import itertools

import av
import httpx
import openai
import numpy as np
import pytest
import torch

from encoder_service import hdr
from encoder_service.orientation import Orientation, from_display_matrix
from encoder_service.video_decode import VideoError, VideoLimits, decode_video
from hdr_clips import hdr_clip, ramp_and_bars
from helpers import data_url, video_chat
from videos import encode, make_vfr_video, moving_frames

LIMITS = VideoLimits(max_bytes=1 << 30, max_duration_s=3600, max_frame_pixels=1 << 24)


def stored_with_display_matrix(frames: np.ndarray, degrees: int, hflip: bool = False, vflip: bool = False) -> bytes:
    """H.264 with a display matrix that turns the frames `degrees` counterclockwise, then mirrors
    them, as a player shows them."""
    return encode(frames, "mp4-lossless", options={"g": "6", "bf": "2"}, display=(degrees, hflip, vflip))


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


def ask_with_the_openai_client(gateway, video: bytes, frames: int = 4) -> dict:
    """What the official client reads of the answer's `videollm` object."""
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        completion = client.chat.completions.create(
            model="videollm", max_tokens=2, extra_body={"videollm": {"num_frames": frames}},
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(video)}},
                                                   {"type": "text", "text": "What is shown?"}]}])
    assert completion.choices[0].message.role == "assistant"
    return completion.model_extra["videollm"]


def test_the_answer_reports_how_the_frames_were_turned(gateway, clean_redis):
    source = ask_with_the_openai_client(gateway, stored_with_display_matrix(STORED, 270, hflip=True))["source"]
    assert (source["rotation"], source["mirrored"]) == (270, True)


def _write(container_format: str, tracks) -> bytes:
    """A file of several tracks; `tracks` is a list of (kind, frames or None, options) in stream
    order: ("video", frames, {"default": bool, "pts_from": int}) or ("audio", None, {})."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        streams = []
        for kind, frames, options in tracks:
            if kind == "audio":
                stream = container.add_stream("aac", rate=48000)
            else:
                stream = container.add_stream("libx264", rate=24, options={"g": "8", "bf": "2"})
                stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.disposition = av.stream.Disposition.default if options.get("default") else 0
            streams.append(stream)
        for (kind, frames, options), stream in zip(tracks, streams):
            if kind == "audio":
                samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp",
                                                     layout="mono")
                samples.sample_rate, samples.pts = 48000, 0
                for packet in [*stream.encode(samples), *stream.encode()]:
                    container.mux(packet)
                continue
            for i, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = options.get("pts_from", 0) + i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return buffer.getvalue()


def test_of_several_video_tracks_the_default_one_is_decoded():
    # the other track is first and larger: only its disposition says it is not the one to show
    other, wanted = moving_frames(16, 128, 96, seed=11), moving_frames(16, 96, 64, seed=12)
    video = _write("matroska", [("video", other, {"default": False}), ("video", wanted, {"default": True})])
    decoded = decode_video(video, 4, LIMITS)
    assert decoded.frames.shape == (4, 64, 96, 3)


def test_a_leading_audio_track_and_a_late_start_change_nothing():
    frames = moving_frames(24, 96, 64, seed=13)
    plain = decode_video(_write("mp4", [("video", frames, {})]), 6, LIMITS)
    odd_video = _write("mp4", [("audio", None, {}), ("video", frames, {"pts_from": 48})])
    odd = decode_video(odd_video, 6, LIMITS)
    assert odd.source_frames == plain.source_frames == 24
    # each file against its own plain decode: two encodes of the same frames need not be bit-identical
    assert np.array_equal(odd.frames, as_stored(odd_video)[odd.frame_indices])
    assert odd.timestamps_s == plain.timestamps_s  # from the first frame shown, wherever it starts


def test_a_clip_cut_in_the_middle_of_a_gop_starts_at_its_first_keyframe():
    """The first packets refer to frames the file no longer has: they are left out, not decoded
    to garbage, and sampling starts at the first frame that decodes as the source meant it."""
    whole = encode(moving_frames(40, 96, 64, seed=14), "mp4", options={"g": "10", "bf": "2",
                                                                      "x264-params": "scenecut=0"})
    with av.open(io.BytesIO(whole)) as source:
        packets = [packet for packet in source.demux(video=0) if packet.size]
        cut = io.BytesIO()
        with av.open(cut, "w", format="mp4") as target:
            stream = target.add_stream_from_template(source.streams.video[0])
            for packet in packets[4:]:  # inside the first GOP: P and B frames without their keyframe
                packet.stream = stream
                target.mux(packet)
    decoded = decode_video(cut.getvalue(), 5, LIMITS)
    full = as_stored(whole)
    assert decoded.source_frames == 30  # the three GOPs that remain whole
    assert np.array_equal(decoded.frames, full[10:][decoded.frame_indices])


def test_variable_frame_rate_timestamps_fps_and_duration_come_from_the_frames():
    gaps_ms = [33, 33, 50, 17, 100, 33]
    video = make_vfr_video(moving_frames(30, 96, 64, seed=15), gaps_ms)
    decoded = decode_video(video, 30, LIMITS)
    shown_at = np.concatenate([[0], np.cumsum([gaps_ms[i % len(gaps_ms)] for i in range(29)])]) / 1000
    assert np.allclose(decoded.timestamps_s, shown_at, atol=1e-3)
    assert decoded.duration_s == pytest.approx(shown_at[-1] + np.median(np.diff(shown_at)), abs=2e-3)
    assert decoded.fps == pytest.approx(30 / decoded.duration_s)


def test_the_answer_reports_when_the_sampled_frames_are_shown(gateway, clean_redis):
    gaps_ms = [33, 33, 50, 17, 100, 33]
    body = video_chat(data_url(make_vfr_video(moving_frames(30, 96, 64, seed=16), gaps_ms)), "When?",
                      max_tokens=2, videollm={"num_frames": 4})
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    source = response.json()["videollm"]["source"]
    shown_at = np.concatenate([[0], np.cumsum([gaps_ms[i % len(gaps_ms)] for i in range(29)])]) / 1000
    assert np.allclose(source["timestamps_s"], shown_at[source["frame_indices"]], atol=1e-3)


@pytest.mark.parametrize("transfer", [hdr.PQ, hdr.HLG], ids=["pq", "hlg"])
def test_hdr_comes_back_as_the_sdr_it_was_made_from(transfer):
    image = ramp_and_bars()
    decoded = decode_video(hdr_clip([image] * 4, transfer), 2, LIMITS)
    got, want = decoded.frames[0].astype(int), image.astype(int)
    assert decoded.color == hdr.ColorReport(
        "pq" if transfer == hdr.PQ else "hlg", "bt2020", 10, "tone-mapped to BT.709 SDR")
    ramp_got, ramp_want = got[0, 8::16, 0], want[0, 8::16, 0]
    below_knee = ramp_want <= round(hdr.KNEE ** (1 / hdr.GAMMA) * 255)
    assert np.abs(ramp_got - ramp_want)[below_knee].max() <= 2  # unchanged below the knee
    assert np.all(np.diff(ramp_got) > 0) and ramp_got[-1] >= 245  # highlights rolled off, not clipped
    bars_got, bars_want = got[48, 16::32], want[48, 16::32]  # the middle of each bar
    lit = bars_want == 191
    assert np.abs(bars_got - bars_want)[lit].max() <= 3
    # a channel that is 0 in SDR is near 0 in BT.2020 too: 10-bit quantisation, raised by the gamma
    assert bars_got[~lit].max() <= 25


def test_hdr_read_as_sdr_would_be_far_off():
    """Why the conversion exists (and a guard that the test above can fail): the same HDR signal
    tagged as SDR decodes to a flat, washed-out image."""
    image = ramp_and_bars()
    naive = decode_video(hdr_clip([image] * 4, hdr.PQ, tag_transfer=False), 2, LIMITS)
    assert naive.color.conversion == "none"
    assert np.abs(naive.frames[0].astype(int) - image.astype(int))[0, 8::16, 0].max() > 40


def test_sdr_frames_keep_the_bit_exact_path():
    video = encode(moving_frames(12, 96, 64, seed=17), "mp4")
    decoded = decode_video(video, 4, LIMITS)
    assert decoded.color.conversion == "none" and decoded.color.bit_depth == 8
    assert np.array_equal(decoded.frames, as_stored(video)[decoded.frame_indices])


def test_the_answer_reports_the_source_colour_and_the_tone_mapping(gateway, clean_redis):
    source = ask_with_the_openai_client(gateway, hdr_clip([ramp_and_bars()] * 4, hdr.HLG), frames=2)["source"]
    assert source["color"] == {"transfer": "hlg", "primaries": "bt2020", "bit_depth": 10,
                               "conversion": "tone-mapped to BT.709 SDR"}


def test_hdr_left_16_bit_for_the_gpu_tone_maps_to_the_same_frames():
    """The encoder on a GPU takes HDR frames as 16-bit R'G'B' and tone-maps them there with the same
    function the runs use on the CPU: the two paths give the same frames."""
    video = hdr_clip([ramp_and_bars()] * 4, hdr.PQ)
    on_cpu = decode_video(video, 2, LIMITS)
    left = decode_video(video, 2, LIMITS, tone_map=False)
    assert on_cpu.hdr_transfer is None and on_cpu.frames.dtype == np.uint8
    assert left.hdr_transfer == hdr.PQ and left.frames.dtype == np.uint16
    assert np.array_equal(hdr.to_sdr(torch.from_numpy(left.frames), left.hdr_transfer).numpy(), on_cpu.frames)


def test_a_trimmed_clip_shows_only_what_its_edit_list_keeps():
    """A clip trimmed without re-encoding keeps the frames before the cut that later frames refer
    to, and an edit list hides them (FFmpeg flags their packets discard): they are decoded as
    references but not counted, sampled or shown, as in a player."""
    whole = encode(moving_frames(40, 96, 64, seed=18), "mp4", options={"g": "10", "bf": "2",
                                                                      "x264-params": "scenecut=0"})
    with av.open(io.BytesIO(whole)) as source:
        packets = [packet for packet in source.demux(video=0) if packet.size]
        step = np.diff(sorted(packet.pts for packet in packets)).min()
        trimmed = io.BytesIO()
        with av.open(trimmed, "w", format="mp4") as target:
            stream = target.add_stream_from_template(source.streams.video[0])
            for packet in packets:  # 13 frames earlier: those before 0 fall outside the edit list
                packet.pts, packet.dts, packet.stream = packet.pts - 13 * step, packet.dts - 13 * step, stream
                target.mux(packet)
    video = trimmed.getvalue()
    with av.open(io.BytesIO(video)) as container:
        hidden = sum(1 for packet in container.demux(video=0) if packet.size and packet.is_discard)
    shown = as_stored(video)  # a plain decode drops the hidden frames
    assert hidden > 0
    decoded = decode_video(video, 8, LIMITS)
    assert decoded.source_frames == len(shown)
    assert np.array_equal(decoded.frames, shown[decoded.frame_indices])
    assert decoded.timestamps_s[0] == 0.0

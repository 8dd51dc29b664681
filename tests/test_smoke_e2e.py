import httpx

from helpers import data_url, encoder_calls, video_chat
from videos import make_video


def test_a_video_question_is_answered_and_then_cached(gateway, encoder_service, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=11)), videollm={"num_frames": 8, "compression": {"method": "none"}})
    before = encoder_calls(encoder_service)
    first = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert first.status_code == 200, first.text
    assert first.headers["x-videollm-cache"] == "miss"
    assert first.json()["videollm"]["visual_tokens"] == 8 * 196 + 1
    second = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert second.headers["x-videollm-cache"] == "hit"
    assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    assert encoder_calls(encoder_service) == before + 1

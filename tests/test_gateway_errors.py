"""Bad input through the real gateway: every mistake gets a 4xx in OpenAI's error shape with a
message that says what is wrong, nothing is cached for it, and the stack keeps serving.

Also the small routes around chat completions: uploads, models, health, readiness and metrics.
"""

from __future__ import annotations

import base64
import hashlib
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import data_url, video_chat
from videos import make_video

TIMEOUT = 120
MiB = 1 << 20
TOKENS_KEYS = "videollm:v1:tokens:*"


@pytest.fixture(scope="module")
def small_mp4() -> bytes:
    return make_video("mp4", n_frames=12, seed=5)


def chat(gateway, body=None, **kwargs) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{gateway.url}/v1/chat/completions", timeout=TIMEOUT, **kwargs)


def small_chat(url: str, **fields) -> dict:
    fields.setdefault("videollm", {"num_frames": 4})
    fields.setdefault("max_tokens", 4)
    return video_chat(url, **fields)


def upload(gateway, data: bytes, filename: str = "clip.mp4", mime: str = "video/mp4") -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/videos", files={"file": (filename, data, mime)}, timeout=TIMEOUT)


def assert_openai_error(response: httpx.Response, status: int, *words: str, param: str | None = "<any>") -> dict:
    """The response is `status` with {"error": {message, type, param, code}}; the message holds every word."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    for word in words:
        assert word.lower() in error["message"].lower(), f"{word!r} not in {error['message']!r}"
    if param != "<any>":
        assert error["param"] == param, error
    return error


def token_keys(redis_client) -> list[bytes]:
    return list(redis_client.scan_iter(match=TOKENS_KEYS))


def assert_nothing_cached(redis_client) -> None:
    time.sleep(0.3)  # a cache write happens in the background after the LLM accepts: give it a chance
    assert token_keys(redis_client) == []


def assert_still_serves(gateway, redis_client, video: bytes) -> None:
    """A good request right after the failure is answered, and its encoding lands in the cache."""
    response = chat(gateway, small_chat(data_url(video)))
    assert response.status_code == 200, response.text
    assert response.headers["x-videollm-cache"] == "miss"
    body = response.json()
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["videollm"]["frames"] == 4
    deadline = time.monotonic() + 10  # proves that TOKENS_KEYS matches what a success stores
    while not token_keys(redis_client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(token_keys(redis_client)) == 1


# -- videos that are not videos ------------------------------------------------------------------


def test_non_video_bytes_in_a_data_url_are_rejected_and_not_cached(gateway, clean_redis, small_mp4):
    junk = b"this is a text file, not a video\n" * 200
    response = chat(gateway, small_chat(data_url(junk)))
    assert_openai_error(response, 400, "video")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_a_truncated_video_is_rejected_and_not_cached(gateway, clean_redis, small_mp4):
    whole = make_video("mp4", n_frames=12, seed=6)
    response = chat(gateway, small_chat(data_url(whole[: len(whole) // 2])))
    assert_openai_error(response, 400, "video")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_a_truncated_video_with_stream_true_gets_a_json_error_not_an_event_stream(gateway, clean_redis, small_mp4):
    whole = make_video("mp4", n_frames=12, seed=7)
    response = chat(gateway, small_chat(data_url(whole[: len(whole) // 2]), stream=True))
    assert_openai_error(response, 400, "video")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


# -- bodies that are not chat requests -----------------------------------------------------------


def test_a_post_without_a_body_is_rejected_with_a_message_about_the_missing_body(gateway, clean_redis, small_mp4):
    response = chat(gateway)
    assert_openai_error(response, 400, "body")
    response = chat(gateway, content=b"", headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "body")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_an_empty_json_object_is_rejected_naming_the_missing_field(gateway, clean_redis, small_mp4):
    response = chat(gateway, {})
    error = assert_openai_error(response, 400, "required")
    assert error["param"] in ("model", "messages"), error
    assert error["param"] in error["message"], error
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


# -- data URLs -----------------------------------------------------------------------------------


GOOD_B64 = base64.b64encode(b"\x00\x00\x00\x18ftypmp42").decode()


@pytest.mark.parametrize(
    ("url", "words"),
    [
        pytest.param("data:video/mp4;base64,@@@not*base64@@@", ("base64",), id="bad base64"),
        pytest.param("data:video/mp4;base64,QUJD=x", ("base64",), id="base64 with data after padding"),
        pytest.param(f"data:video/mp4,{GOOD_B64}", ("malformed data url",), id="missing ;base64"),
        pytest.param(f"data:text/plain;base64,{GOOD_B64}", ("media type", "text/plain"), id="text/plain media type"),
        pytest.param(f"data:image/png;base64,{GOOD_B64}", ("media type", "image/png"), id="image media type"),
        pytest.param("data:video/mp4;base64", ("malformed data url",), id="no comma"),
        pytest.param("data:video/mp4;base64,", ("empty",), id="empty payload"),
        pytest.param("not-a-url-at-all", ("video_url",), id="neither data URL nor video id"),
    ],
)
def test_a_malformed_data_url_is_rejected_with_a_message_saying_why(gateway, clean_redis, small_mp4, url, words):
    response = chat(gateway, small_chat(url))
    assert_openai_error(response, 400, *words, param="messages")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_an_http_video_url_is_rejected_because_fetching_is_disabled(gateway, clean_redis, small_mp4):
    for url in ("http://example.com/clip.mp4", "https://example.com/clip.mp4"):
        response = chat(gateway, small_chat(url))
        assert_openai_error(response, 400, "disabled", param="messages")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


# -- limits --------------------------------------------------------------------------------------


def test_too_many_frames_are_rejected_naming_the_limit(gateway, clean_redis, small_mp4):
    response = chat(gateway, small_chat(data_url(small_mp4), videollm={"num_frames": 65}))
    assert_openai_error(response, 400, "num_frames", "64", "65", param="videollm.num_frames")
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_the_frame_limit_itself_is_accepted(gateway, clean_redis, small_mp4):
    response = chat(gateway, small_chat(data_url(small_mp4), videollm={"num_frames": 64}, max_tokens=1))
    assert response.status_code == 200, response.text
    assert response.json()["videollm"]["frames"] == 64


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(8 * MiB + MiB // 2, id="over the video limit but within the body limit"),
        pytest.param(10 * MiB, id="over the body limit"),
    ],
)
def test_an_oversized_inline_data_url_gets_413(gateway, clean_redis, small_mp4, size):
    big = small_mp4 + bytes(size - len(small_mp4))
    response = chat(gateway, small_chat(data_url(big)))
    error = assert_openai_error(response, 413, "limit")
    assert str(gateway.settings.max_upload_bytes) in error["message"] or str(
        gateway.settings.max_body_bytes) in error["message"], error
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param(9 * MiB, id="over the video limit but within the body limit"),
        pytest.param(13 * MiB, id="over the body limit"),
    ],
)
def test_an_oversized_upload_gets_413(gateway, clean_redis, small_mp4, size):
    big = small_mp4 + bytes(size - len(small_mp4))
    response = upload(gateway, big)
    error = assert_openai_error(response, 413, "limit")
    assert str(gateway.settings.max_upload_bytes) in error["message"] or str(
        gateway.settings.max_body_bytes) in error["message"], error
    video_id = f"video-{hashlib.sha256(big).hexdigest()}"
    response = chat(gateway, small_chat(video_id))
    assert_openai_error(response, 404, video_id)  # the refused upload was not stored
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


# -- things that do not exist --------------------------------------------------------------------


def test_an_unknown_video_id_gets_404(gateway, clean_redis, small_mp4):
    video_id = "video-" + "0" * 64
    response = chat(gateway, small_chat(video_id))
    error = assert_openai_error(response, 404, video_id)
    assert error["type"] == "not_found_error"
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_an_unknown_model_name_gets_404(gateway, clean_redis, small_mp4):
    response = chat(gateway, small_chat(data_url(small_mp4), model="gpt-4o"))
    error = assert_openai_error(response, 404, "gpt-4o", param="model")
    assert error["type"] == "not_found_error"
    assert error["code"] == "model_not_found"
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


# -- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"temperature": 5}, "temperature", id="temperature 5"),
        pytest.param({"temperature": -0.1}, "temperature", id="negative temperature"),
        pytest.param({"n": 2}, "n", id="n 2"),
        pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens 0"),
        pytest.param({"top_p": 0}, "top_p", id="top_p 0"),
        pytest.param({"videollm": {"num_frames": 4, "frame_rate": 2}}, "videollm.frame_rate", id="unknown videollm field"),
        pytest.param({"videollm": {"num_frames": 0}}, "videollm.num_frames", id="num_frames 0"),
        pytest.param({"videollm": {"compression": {"method": "zip"}}}, "videollm.compression.method",
                     id="unknown compression method"),
        pytest.param({"messages": []}, "messages", id="no messages"),
        # beyond the uint32 fields of the gRPC hops (found by the fuzz test): a 400, not a 500
        pytest.param({"max_completion_tokens": 13593480161152100}, "max_completion_tokens", id="huge max tokens"),
        pytest.param({"top_k": 2**32}, "top_k", id="huge top_k"),
        pytest.param({"videollm": {"num_frames": 2**40}}, "videollm.num_frames", id="huge num_frames"),
        pytest.param({"videollm": {"num_frames": 4, "inner_compression": {"layer": 2**33}}},
                     "videollm.inner_compression.layer", id="huge inner layer"),
        pytest.param({"videollm": {"num_frames": 4, "inner_compression": {"drop_ratio": 1.0}}},
                     "videollm.inner_compression.drop_ratio", id="inner drop ratio 1"),
    ],
)
def test_an_invalid_parameter_gets_400_naming_it(gateway, clean_redis, small_mp4, fields, param):
    response = chat(gateway, small_chat(data_url(small_mp4), **fields))
    error = assert_openai_error(response, 400, param, param=param)
    assert error["type"] == "invalid_request_error"
    assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_two_videos_in_one_request_are_rejected(gateway, clean_redis, small_mp4):
    body = small_chat(data_url(small_mp4))
    body["messages"][0]["content"].append({"type": "video_url", "video_url": {"url": data_url(small_mp4)}})
    assert_openai_error(chat(gateway, body), 400, "one video")
    assert_nothing_cached(clean_redis)


def test_videollm_options_without_a_video_are_rejected(gateway, clean_redis):
    body = {"model": "videollm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "videollm": {"num_frames": 4}}
    assert_openai_error(chat(gateway, body), 400, "video", param="videollm")


# -- uploads -------------------------------------------------------------------------------------


def test_an_uploaded_video_gets_its_sha256_as_id_and_answers_a_chat(gateway, clean_redis, small_mp4):
    response = upload(gateway, small_mp4)
    assert response.status_code == 200, response.text
    body = response.json()
    digest = hashlib.sha256(small_mp4).hexdigest()
    assert body["id"] == f"video-{digest}"
    assert body["sha256"] == digest
    assert body["bytes"] == len(small_mp4)
    assert body["object"] == "video"
    assert body["filename"] == "clip.mp4"

    by_id = chat(gateway, small_chat(body["id"]))
    assert by_id.status_code == 200, by_id.text
    assert by_id.headers["x-videollm-cache"] == "miss"
    assert by_id.json()["videollm"]["frames"] == 4
    # the same bytes inline are the same video: the encoding cached for the id serves them
    inline = chat(gateway, small_chat(data_url(small_mp4)))
    assert inline.status_code == 200, inline.text
    assert inline.headers["x-videollm-cache"] == "hit"
    assert inline.json()["choices"][0]["message"] == by_id.json()["choices"][0]["message"]


def test_uploading_the_same_video_twice_gives_the_same_id(gateway, clean_redis, small_mp4):
    first, second = upload(gateway, small_mp4), upload(gateway, small_mp4, filename="other.mp4")
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        pytest.param(b"this is a text file, not a video\n" * 200, ("video",), id="non-video bytes"),
        pytest.param(b"", ("empty",), id="empty file"),
    ],
)
def test_uploading_a_non_video_gets_400(gateway, clean_redis, small_mp4, data, words):
    response = upload(gateway, data, filename="notes.txt", mime="text/plain")
    assert_openai_error(response, 400, *words, param="file")
    # nothing was stored under the content's id
    video_id = f"video-{hashlib.sha256(data).hexdigest()}"
    assert_openai_error(chat(gateway, small_chat(video_id)), 404, video_id)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_an_undecodable_upload_is_rejected_at_the_latest_when_it_is_used(gateway, clean_redis, small_mp4):
    # GIF magic followed by junk: FFmpeg's probe sees a (0x0) video stream, decoding fails
    junk = b"GIF89a not really a video" * 40
    response = upload(gateway, junk, filename="broken.gif", mime="image/gif")
    if response.status_code != 200:
        assert_openai_error(response, 400, "video", param="file")
    else:
        assert_openai_error(chat(gateway, small_chat(response.json()["id"])), 400, "video")
        assert_nothing_cached(clean_redis)
    assert_still_serves(gateway, clean_redis, small_mp4)


def test_an_upload_without_the_file_field_gets_400(gateway, clean_redis, small_mp4):
    response = httpx.post(f"{gateway.url}/v1/videos", files={"video": ("clip.mp4", small_mp4, "video/mp4")},
                          timeout=TIMEOUT)
    assert_openai_error(response, 400, "file", param="file")


# -- models, health, readiness, metrics ----------------------------------------------------------


def test_the_models_list_names_videollm(gateway):
    response = httpx.get(f"{gateway.url}/v1/models", timeout=TIMEOUT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "videollm"  # then its presets (tests/test_evaluation_api.py)
    assert {model["object"] for model in body["data"]} == {"model"}


def test_health_is_ok(gateway):
    response = httpx.get(f"{gateway.url}/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_ready_reports_every_backend_up(gateway, encoder_service, llm_service):
    response = httpx.get(f"{gateway.url}/ready", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["encoders"] == {encoder_service.address: True}
    assert body["llms"] == {llm_service.address: True}
    assert body["redis"] == "ok"


def test_an_unknown_route_gets_404_in_openai_shape(gateway):
    response = httpx.get(f"{gateway.url}/v1/nothing-here", timeout=TIMEOUT)
    error = assert_openai_error(response, 404)
    assert error["type"] == "not_found_error"


def metric_samples(gateway) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{gateway.url}/metrics", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_and_time_to_first_token(gateway, clean_redis, small_mp4):
    ok = ("videollm_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    bad = ("videollm_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))
    ttft = ("videollm_ttft_seconds_count", (("cache", "miss"),))
    before = metric_samples(gateway)

    assert chat(gateway, small_chat(data_url(small_mp4))).status_code == 200
    assert chat(gateway, small_chat(data_url(small_mp4), temperature=5)).status_code == 400

    text = httpx.get(f"{gateway.url}/metrics", timeout=TIMEOUT).text
    assert "videollm_requests_total" in text
    assert "videollm_ttft_seconds" in text
    after = metric_samples(gateway)
    assert after[ok] == before.get(ok, 0) + 1
    assert after[bad] == before.get(bad, 0) + 1
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after[("videollm_requests_in_flight", ())] == 0

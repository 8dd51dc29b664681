"""Large videos through the gateway: inline data URLs parsed from the body's bytes (gateway/body.py)
and questions by uploaded id that read the video only for a miss (gateway/videos.py).

The id tests ask a second gateway replica about videos uploaded to the first: the replicas share the
video store (the session's store directory), as replicas on a shared volume do, so what the second
one reads, the store's files show.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import stack_gateway
from gateway.body import parse_chat_body
from gateway.schemas import ChatCompletionRequest
from helpers import assert_error, data_url, video_chat
from videos import encode, make_video

TIMEOUT = 120
TOKEN_KEYS = "videollm:v1:tokens:*"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video("mp4", n_frames=12, seed=41)


@pytest.fixture(scope="module")
def other_gateway(encoder_service, llm_service, redis_server):
    """A second gateway replica beside the session's, on the same Redis, encoder and LLM."""
    with stack_gateway(encoder_service, llm_service, redis_server) as server:
        yield server


def chat(gateway, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{gateway.url}/v1/chat/completions", content=content,
                      headers={"content-type": "application/json"}, timeout=TIMEOUT)


def question(url: str, frames: int = 4) -> dict:
    return video_chat(url, max_tokens=3, videollm={"num_frames": frames})


def upload(gateway, data: bytes) -> str:
    response = httpx.post(f"{gateway.url}/v1/videos", files={"file": ("clip.mp4", data, "video/mp4")}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["id"]


def stored_file(gateway, video_id: str) -> Path:
    return Path(gateway.settings.video_store_dir) / video_id


def token_keys(redis_client, count: int) -> list[bytes]:
    """The token entries once `count` are there (a miss's entry is written just after its answer)."""
    deadline = time.monotonic() + 10
    while len(keys := redis_client.keys(TOKEN_KEYS)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return keys


# -- questions by uploaded id ------------------------------------------------------------------------


def test_a_repeat_question_by_id_is_a_hit_that_does_not_read_the_video(gateway, other_gateway, clean_redis, clip):
    video_id = upload(gateway, clip)
    first = chat(other_gateway, question(video_id))
    assert first.status_code == 200, first.text
    assert first.headers["x-videollm-cache"] == "miss"
    assert len(token_keys(clean_redis, 1)) == 1
    stored_file(gateway, video_id).unlink()  # the upload is gone; its tokens are cached

    again = chat(other_gateway, question(video_id))
    assert again.status_code == 200, again.text
    assert again.headers["x-videollm-cache"] == "hit"
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]

    other_frames = chat(other_gateway, question(video_id, frames=5))  # a miss needs the bytes
    error = assert_error(other_frames, 404, "video_not_found", video_id, "expired", "upload it again")
    assert error["param"] == "messages"
    assert len(clean_redis.keys(TOKEN_KEYS)) == 1


def test_a_damaged_stored_video_is_deleted_and_its_tokens_never_used(gateway, other_gateway, clean_redis, clip):
    video_id = upload(gateway, clip)
    damaged = bytearray(clip)
    damaged[len(damaged) // 2] ^= 0xFF
    stored_file(gateway, video_id).write_bytes(damaged)

    response = chat(other_gateway, question(video_id))
    assert_error(response, 404, "video_not_found", video_id, "damaged", "upload it again")
    assert not stored_file(gateway, video_id).exists()
    assert clean_redis.keys(TOKEN_KEYS) == []

    assert upload(gateway, clip) == video_id  # uploaded again: served
    response = chat(other_gateway, question(video_id))
    assert response.status_code == 200, response.text
    assert response.headers["x-videollm-cache"] == "miss"


def test_a_damaged_stored_video_does_not_stop_hits_on_its_cached_tokens(gateway, other_gateway, clean_redis, clip):
    video_id = upload(gateway, clip)
    first = chat(other_gateway, question(video_id))
    assert first.status_code == 200, first.text
    token_keys(clean_redis, 1)
    stored_file(gateway, video_id).write_bytes(b"not the video any more")

    hit = chat(other_gateway, question(video_id))
    assert hit.status_code == 200, hit.text
    assert hit.headers["x-videollm-cache"] == "hit"
    assert_error(chat(other_gateway, question(video_id, frames=5)), 404, "video_not_found", "damaged")
    assert not stored_file(gateway, video_id).exists()
    assert len(clean_redis.keys(TOKEN_KEYS)) == 1  # the damaged bytes left no tokens


def test_an_id_that_was_never_uploaded_gets_404(other_gateway, clean_redis):
    video_id = "video-" + hashlib.sha256(b"never uploaded").hexdigest()
    assert_error(chat(other_gateway, question(video_id)), 404, "video_not_found", video_id)


# -- large inline videos -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def large_clip() -> bytes:
    """About 4 MB (the session gateway takes up to 8 MiB): lossless noise frames, which do not compress."""
    frames = np.random.default_rng(7).integers(0, 256, (12, 256, 320, 3), dtype=np.uint8)
    clip = encode(frames, "mp4-lossless", options={"preset": "ultrafast"})
    assert len(clip) > 3 << 20, len(clip)
    return clip


def test_a_large_inline_video_is_the_same_video_as_its_upload(gateway, other_gateway, clean_redis, large_clip):
    clip = large_clip
    inline = chat(gateway, question(data_url(clip)))
    assert inline.status_code == 200, inline.text
    assert inline.headers["x-videollm-cache"] == "miss"
    token_keys(clean_redis, 1)
    by_id = chat(other_gateway, question(upload(gateway, clip)))
    assert by_id.status_code == 200, by_id.text
    assert by_id.headers["x-videollm-cache"] == "hit"  # same sha256: the inline payload decoded to these bytes
    assert by_id.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]


def test_bad_base64_inside_a_large_payload_gets_400(gateway, clean_redis, large_clip):
    url = data_url(large_clip)
    middle = len(url) // 2
    for bad in ("*", "=", "\\u00e9"):  # not base64, padding inside, a JSON escape (the slow path's decoder)
        body = json.dumps(question("URL")).replace("URL", url[:middle] + bad + url[middle:])
        response = chat(gateway, body.encode())
        assert_error(response, 400, "invalid_value", "base64")
    assert clean_redis.keys(TOKEN_KEYS) == []


def test_a_payload_written_with_json_escapes_is_the_same_video(gateway, clean_redis, clip):
    url = data_url(clip)
    assert "/" in url
    escaped = json.dumps(question(url)).replace("/", "\\/")  # as PHP's json_encode writes it
    first = chat(gateway, escaped.encode())
    assert first.status_code == 200, first.text
    assert first.headers["x-videollm-cache"] == "miss"
    token_keys(clean_redis, 1)
    plain = chat(gateway, question(url))
    assert plain.headers["x-videollm-cache"] == "hit"


def test_a_body_that_does_not_validate_keeps_fastapis_error(gateway, clip):
    body = question(data_url(clip))
    del body["model"]
    error = assert_error(chat(gateway, body), 400, "invalid_value", "model")
    assert error["param"] == "model"
    truncated = json.dumps(question(data_url(clip))).encode()[:-10]
    assert chat(gateway, truncated).status_code == 400


# -- parse_chat_body ---------------------------------------------------------------------------------


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_the_payload_stays_in_the_body_and_the_rest_is_parsed():
    payload = base64.b64encode(b"\x00video bytes\xff" * 100).decode()
    body = raw(question(f"data:video/mp4;codecs=avc1;base64,{payload}"))
    request = parse_chat_body(body)
    video_url = request.messages[0].content[0].video_url
    assert video_url.url == "data:video/mp4;codecs=avc1;base64,"
    assert video_url.payload.obj is body and bytes(video_url.payload) == payload.encode()
    assert request.messages[0].content[1].text == "What happens in this video?"


def test_a_question_quoting_a_data_url_before_the_video_keeps_its_text():
    quoted = "Is this like data:video/mp4;base64,QUJD?"
    body = question("data:video/mp4;base64," + base64.b64encode(b"video").decode())
    body["messages"][0]["content"].insert(0, {"type": "text", "text": quoted})
    request = parse_chat_body(raw(body))
    assert request == ChatCompletionRequest.model_validate(body)
    assert request.messages[0].content[0].text == quoted
    assert request.messages[0].content[1].video_url.payload is None


def test_a_body_that_does_not_validate_is_handed_back_as_plain_json():
    body = question("data:video/mp4;base64,QUJD", frames=0)
    body["temperature"] = 9
    assert parse_chat_body(raw(body)) == body
    with pytest.raises(json.JSONDecodeError):
        parse_chat_body(raw(body)[:-1])

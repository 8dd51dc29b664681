"""What evaluation tools send, through REST against real servers: compression presets chosen by model
name, file:// URLs under the allowed roots (and refused elsewhere: outside, through .., through a
symlink), a video's frames sent as image parts, OpenAI fields that do not apply (accepted when
harmless, refused when they would change the answer), and usage.prompt_tokens with the visual tokens.
"""

from __future__ import annotations

import io
import logging
import os
from urllib.parse import quote

import av
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import GatewayServer, gateway_settings
from gateway.app import create_app
from helpers import assert_error, data_url, video_chat
from videos import make_video

TIMEOUT = 120


def post(gateway, body: dict, **headers) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT, headers=headers)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


# -- presets as model names ----------------------------------------------------------------------


def test_a_preset_chosen_by_model_name_sets_the_compression(gateway, clean_redis, caplog):
    caplog.set_level(logging.INFO, logger="gateway.chat")
    video = data_url(make_video("mp4", seed=1201, n_frames=24))
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as client:
        answers = {}
        for model in ("videollm-full", "videollm-r0.25", "videollm-r0.1"):
            completion = client.chat.completions.create(
                model=model, max_tokens=4, extra_body={"media_io_kwargs": {"video": {"num_frames": 8}}},
                messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                       {"type": "text", "text": "What moves?"}]}])
            assert completion.model == model
            answers[model] = (completion.model_extra["videollm"], completion.usage)
    full, quarter, tenth = (answers[m][0] for m in ("videollm-full", "videollm-r0.25", "videollm-r0.1"))
    assert full["compression"]["method"] == "none" and full["visual_tokens"] == 8 * 196 + 1
    assert quarter["compression"]["settings"]["retain_ratio"] == 0.25
    assert tenth["compression"]["settings"]["retain_ratio"] == 0.1
    assert full["visual_tokens"] > quarter["visual_tokens"] > tenth["visual_tokens"]
    # usage.prompt_tokens counts the visual tokens sent: the same question differs by exactly them
    (_, full_usage), (_, tenth_usage) = answers["videollm-full"], answers["videollm-r0.1"]
    assert full_usage.prompt_tokens - tenth_usage.prompt_tokens == full["visual_tokens"] - tenth["visual_tokens"]
    assert tenth_usage.prompt_tokens > tenth["visual_tokens"]
    logged = [r.getMessage() for r in caplog.records if r.name == "gateway.chat"]
    assert any("model=videollm-r0.1 " in line and "compression=earlytom retain_ratio=0.1 " in line for line in logged)
    assert any("model=videollm-full " in line and "compression=none " in line for line in logged)


def test_the_request_s_own_compression_overrides_its_preset(gateway, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=1202, n_frames=24)), model="videollm-r0.1", max_tokens=2,
                      videollm={"num_frames": 8, "compression": {"retain_ratio": 0.5}})
    assert ok(post(gateway, body))["videollm"]["compression"]["settings"]["retain_ratio"] == 0.5


def test_an_unknown_model_is_a_404_that_lists_the_models(gateway):
    error = assert_error(post(gateway, video_chat("video-" + "0" * 64, model="videollm-r0.33")), 404,
                         "model_not_found", "videollm-r0.33")
    assert "videollm-r0.1" in error["message"] and error["param"] == "model"


def test_a_bad_preset_stops_the_gateway_before_it_serves():
    with pytest.raises(ValueError, match="retain"):
        gateway_settings(["127.0.0.1:1"], ["127.0.0.1:2"], None, presets={"x": {"retain": 0.1}})


# -- file:// URLs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """An allowed root with a clip, a link to a clip outside it, a link inside it; the clip outside."""
    allowed, outside = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside")
    clip = make_video("mp4", seed=1203, n_frames=24)
    (allowed / "my clip.mp4").write_bytes(clip)
    (allowed / "sub").mkdir()
    (outside / "secret.mp4").write_bytes(make_video("mp4", seed=1204, n_frames=24))
    os.symlink(outside / "secret.mp4", allowed / "escape.mp4")
    os.symlink(allowed / "my clip.mp4", allowed / "sub" / "inside.mp4")
    return {"allowed": allowed, "outside": outside, "clip": clip}


@pytest.fixture(scope="module")
def file_gateway(encoder_service, llm_service, redis_server, roots):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                local_video_roots=[str(roots["allowed"])], max_inline_bytes=1 << 20)
    with GatewayServer(settings) as server:
        yield server


def file_url(path) -> str:
    return "file://" + quote(str(path))


def test_file_urls_are_refused_unless_the_operator_allows_them(gateway, roots):
    assert_error(post(gateway, video_chat(file_url(roots["allowed"] / "my clip.mp4"))), 403, "file_url_not_allowed",
                 "local_video_roots")


def test_a_file_under_an_allowed_root_is_the_same_video_as_its_bytes(file_gateway, roots, clean_redis):
    inline = ok(post(file_gateway, video_chat(data_url(roots["clip"]), videollm={"num_frames": 4}, max_tokens=2)))
    by_path = post(file_gateway, video_chat(file_url(roots["allowed"] / "my clip.mp4"), videollm={"num_frames": 4},
                                            max_tokens=2))
    assert by_path.headers["x-videollm-cache"] == "hit"  # the same bytes: the same cache entry
    assert ok(by_path)["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
    linked = post(file_gateway, video_chat(file_url(roots["allowed"] / "sub" / "inside.mp4"),
                                           videollm={"num_frames": 4}, max_tokens=2))
    assert linked.status_code == 200 and linked.headers["x-videollm-cache"] == "hit"  # a link that stays inside


def test_paths_that_leave_the_allowed_roots_are_refused(file_gateway, roots):
    allowed, outside = roots["allowed"], roots["outside"]
    for url in (file_url(outside / "secret.mp4"),
                "file://" + quote(f"{allowed}/../{outside.name}/secret.mp4"),  # .. out of the root
                file_url(allowed / "escape.mp4")):  # a symlink out of the root
        assert_error(post(file_gateway, video_chat(url)), 403, "file_url_not_allowed", "outside")


@pytest.mark.parametrize("name, status, code", [("missing.mp4", 404, "file_not_found"), ("sub", 400, "invalid_value")])
def test_a_missing_file_or_a_directory_is_refused(file_gateway, roots, name, status, code):
    assert_error(post(file_gateway, video_chat(file_url(roots["allowed"] / name))), status, code)


def test_a_file_over_the_size_limit_is_a_413(file_gateway, roots, tmp_path):
    (roots["allowed"] / "big.mp4").write_bytes(b"\0" * ((1 << 20) + 1))
    assert_error(post(file_gateway, video_chat(file_url(roots["allowed"] / "big.mp4"))), 413, "video_too_large")


def test_a_file_url_with_a_host_is_refused(file_gateway, roots):
    assert_error(post(file_gateway, video_chat("file://elsewhere" + quote(str(roots["allowed"] / "my clip.mp4")))),
                 400, "invalid_value", "file:///absolute/path")


def test_a_root_that_is_not_a_directory_stops_the_gateway(tmp_path):
    with pytest.raises(ValueError, match="local_video_roots"):
        create_app(gateway_settings(["127.0.0.1:1"], ["127.0.0.1:2"], None, local_video_roots=[str(tmp_path / "no")]))


# -- frames as images ----------------------------------------------------------------------------


def decoded_frames(video: bytes, indices: list[int]) -> list[np.ndarray]:
    """The frames at `indices` of a plain sequential decode, [H, W, 3] RGB."""
    with av.open(io.BytesIO(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return [frames[i] for i in indices]


def encoded(frame: np.ndarray, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, fmt)
    return out.getvalue()


def image_part(image: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image, mime), "detail": "low"}}


def images_chat(images: list[bytes], question: str = "What happens in this video?", text_first: bool = False,
                **fields) -> dict:
    parts = [image_part(image) for image in images]
    text = [{"type": "text", "text": question}]
    body = {"model": "videollm", "max_tokens": 8,
            "messages": [{"role": "user", "content": text + parts if text_first else parts + text}]}
    body.update(fields)
    return body


def test_frames_sent_as_images_are_encoded_like_the_video_they_came_from(gateway, clean_redis):
    video = make_video("mp4", seed=1205, n_frames=40)
    as_video = ok(post(gateway, video_chat(data_url(video), videollm={"num_frames": 8}, max_tokens=8)))
    report = as_video["videollm"]
    images = [encoded(f) for f in decoded_frames(video, report["sampling"]["frame_indices"])]  # lossless copies
    as_images = post(gateway, images_chat(images))
    assert as_images.headers["x-videollm-cache"] == "miss"  # images are not the video file
    same = ok(as_images)["videollm"]
    assert same["frames"] == 8 and same["source"]["frames"] == 8
    for field in ("visual_tokens", "frames_after_merge", "segments", "merged_frames", "kept"):
        assert same[field] == report[field], field  # the same pixels through the same encoder: the same tokens
    assert ok(as_images)["choices"][0]["message"]["content"] == as_video["choices"][0]["message"]["content"]
    assert post(gateway, images_chat(images)).headers["x-videollm-cache"] == "hit"
    # VLMEvalKit's order (text, frames, text) and JPEG frames work too
    jpegs = [encoded(f, "JPEG") for f in decoded_frames(video, report["sampling"]["frame_indices"])]
    body = images_chat(jpegs, text_first=True)
    body["messages"][0]["content"] = [image_part(j, "image/jpeg") if p["type"] == "image_url" else p
                                      for j, p in zip([None] + jpegs, body["messages"][0]["content"])]
    body["messages"][0]["content"].append({"type": "text", "text": "Best option:("})
    assert ok(post(gateway, body))["videollm"]["frames"] == 8


def small_frames(count: int, size=(64, 48)) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [encoded(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def test_frames_as_images_must_share_one_size(gateway):
    images = small_frames(2) + small_frames(1, size=(32, 48))
    assert_error(post(gateway, images_chat(images)), 400, "invalid_value", "image 3", "one size")


def test_more_images_than_the_frame_limit_are_refused(gateway):
    assert_error(post(gateway, images_chat(small_frames(65))), 400, "invalid_value", "65 images", "64 frames")


def test_images_with_a_frame_sampling_are_refused(gateway):
    error = assert_error(post(gateway, images_chat(small_frames(2), videollm={"num_frames": 2})), 400,
                         "invalid_value", "taken as they are")
    assert error["param"] == "videollm"


def test_images_beside_a_video_are_refused(gateway):
    video = {"type": "video_url", "video_url": {"url": data_url(make_video("mp4", seed=1206, n_frames=8))}}
    body = {"model": "videollm", "messages": [{"role": "user", "content": [video, image_part(small_frames(1)[0])]}]}
    assert_error(post(gateway, body), 400, "invalid_value", "at most one video")


def test_an_image_part_holding_a_video_is_refused(gateway):
    part = {"type": "image_url", "image_url": {"url": data_url(make_video("mp4", seed=1206, n_frames=8))}}
    body = {"model": "videollm", "messages": [{"role": "user", "content": [part]}]}
    assert_error(post(gateway, body), 400, "invalid_value", "media type must be image")


def test_images_in_two_messages_are_refused(gateway):
    image = image_part(small_frames(1)[0])
    body = {"model": "videollm", "messages": [{"role": "user", "content": [image]},
                                              {"role": "user", "content": [image, {"type": "text", "text": "?"}]}]}
    assert_error(post(gateway, body), 400, "invalid_value", "one message")


def test_bytes_that_are_no_image_are_refused(gateway):
    body = images_chat([b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, *small_frames(1)])
    assert_error(post(gateway, body), 400, "invalid_value", "image 1")


# -- OpenAI fields that do not apply ---------------------------------------------------------------


def test_harmless_openai_fields_are_accepted(gateway, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=1207, n_frames=12)), max_tokens=2, videollm={"num_frames": 2},
                      n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, response_format={"type": "text"},
                      tool_choice="none", parallel_tool_calls=False, chat_template_kwargs={"enable_thinking": False},
                      store=False, metadata={"run": "eval"}, user="evaluator", seed=3, top_p=1.0)
    assert ok(post(gateway, body))["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("field, value, words", [
    ("presence_penalty", 0.5, "penalties are not applied"),
    ("frequency_penalty", -1, "penalties are not applied"),
    ("repetition_penalty", 1.2, "penalties are not applied"),
    ("logprobs", True, "log probabilities"),
    ("top_logprobs", 5, "log probabilities"),
    ("logit_bias", {"42": 10}, "logit biases"),
    ("response_format", {"type": "json_object"}, "only text answers"),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "tools are not supported"),
    ("n", 2, "less than or equal to 1"),
    ("best_of", 2, "Extra inputs are not permitted"),
    ("videolm", {"num_frames": 2}, "Extra inputs are not permitted"),  # a typo is not silently ignored
])
def test_fields_that_would_change_the_answer_are_refused(gateway, field, value, words):
    error = assert_error(post(gateway, video_chat("video-" + "0" * 64, **{field: value})), 400, "invalid_value", words)
    assert error["param"] == field

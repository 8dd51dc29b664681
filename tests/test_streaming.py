"""Streaming chat completions (server-sent events in OpenAI's chat.completion.chunk format), the
official `openai` client against the gateway, text-only chats and stop strings."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from helpers import data_url, video_chat
from videos import make_video

TIMEOUT = 120


@pytest.fixture(scope="module")
def video_url() -> str:
    return data_url(make_video("mp4", n_frames=12, seed=21))


def small_chat(url: str, **fields) -> dict:
    fields.setdefault("videollm", {"num_frames": 4})
    fields.setdefault("max_tokens", 16)
    return video_chat(url, **fields)


def text_chat(**fields) -> dict:
    body = {"model": "videollm", "messages": [{"role": "system", "content": "You are terse."},
                                              {"role": "user", "content": "Name three colours."}],
            "max_tokens": 16}
    body.update(fields)
    return body


def post(gateway, body: dict) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=TIMEOUT)


def complete(gateway, body: dict) -> dict:
    response = post(gateway, {**body, "stream": False})
    assert response.status_code == 200, response.text
    return response.json()


def sse_events(response: httpx.Response) -> list[dict]:
    """The JSON payloads of an SSE response; checks the framing and the closing [DONE]."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
    blocks = [block for block in response.text.split("\n\n") if block.strip()]
    assert response.text.endswith("\n\n")
    payloads = []
    for block in blocks:
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), repr(block)
        payloads.append(lines[0][len("data: "):])
    assert payloads, "the stream is empty"
    assert payloads[-1] == "[DONE]", payloads[-1]
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def stream(gateway, body: dict) -> tuple[httpx.Response, list[dict]]:
    response = post(gateway, {**body, "stream": True})
    return response, sse_events(response)


def choice_chunks(chunks: list[dict]) -> list[dict]:
    return [c for c in chunks if c["choices"]]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks(chunks))


def assert_chunk_format(chunks: list[dict]) -> None:
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-"), ids
    for c in chunks:
        assert c["object"] == "chat.completion.chunk", c
        assert c["model"] == "videollm", c
        assert isinstance(c["created"], int), c
        assert isinstance(c["choices"], list), c
        for choice in c["choices"]:
            assert choice["index"] == 0, c
            assert isinstance(choice["delta"], dict), c
            assert "finish_reason" in choice, c
    with_choices = choice_chunks(chunks)
    assert with_choices, "no chunk has a choice"
    first = with_choices[0]["choices"][0]
    assert first["delta"].get("role") == "assistant", first
    for c in with_choices[1:]:
        assert "role" not in c["choices"][0]["delta"], c
    for c in with_choices[:-1]:
        assert c["choices"][0]["finish_reason"] is None, c
        assert "content" in c["choices"][0]["delta"] and isinstance(c["choices"][0]["delta"]["content"], str), c


# -- streaming over plain HTTP -------------------------------------------------------------------


def test_a_streamed_answer_equals_the_non_streamed_answer(gateway, clean_redis, video_url):
    body = small_chat(video_url)
    whole = complete(gateway, body)
    response, chunks = stream(gateway, body)
    assert response.headers["x-videollm-cache"] == "hit"  # the non-stream request cached the encoding

    assert_chunk_format(chunks)
    expected = whole["choices"][0]["message"]["content"]
    assert expected, "the model said nothing: the comparison would be vacuous"
    assert streamed_text(chunks) == expected
    assert len(choice_chunks(chunks)) > 2  # really streamed, not one blob

    last = choice_chunks(chunks)[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["choices"][0]["delta"].get("content") in (None, "")
    videollm = last["videollm"]
    assert videollm["cache"] == "hit"
    assert videollm["frames"] == 4
    assert videollm["visual_tokens"] == whole["videollm"]["visual_tokens"] > 0
    assert all("usage" not in c or c["usage"] is None for c in chunks)  # only asked for with include_usage


def test_a_stream_on_a_cache_miss_streams_the_same_answer(gateway, clean_redis, video_url):
    body = small_chat(video_url)
    response, chunks = stream(gateway, body)
    assert response.headers["x-videollm-cache"] == "miss"
    assert_chunk_format(chunks)
    assert choice_chunks(chunks)[-1]["videollm"]["cache"] == "miss"
    whole = complete(gateway, body)
    assert whole["videollm"]["cache"] == "hit"
    assert streamed_text(chunks) == whole["choices"][0]["message"]["content"]


def test_include_usage_adds_a_usage_chunk_matching_the_non_stream_usage(gateway, clean_redis, video_url):
    body = small_chat(video_url)
    whole = complete(gateway, body)
    _, chunks = stream(gateway, {**body, "stream_options": {"include_usage": True}})
    assert_chunk_format(chunks)
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1
    usage_chunk = usage_chunks[0]
    assert usage_chunk is chunks[-1], "the usage chunk comes last, right before [DONE]"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] > 0
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert streamed_text(chunks) == whole["choices"][0]["message"]["content"]


def test_max_tokens_ends_a_stream_with_finish_reason_length(gateway, clean_redis, video_url):
    body = small_chat(video_url, max_tokens=2)
    whole = complete(gateway, body)
    if whole["choices"][0]["finish_reason"] != "length":
        pytest.skip("the tiny model stopped on its own within 2 tokens")
    assert whole["usage"]["completion_tokens"] == 2
    _, chunks = stream(gateway, {**body, "stream_options": {"include_usage": True}})
    assert choice_chunks(chunks)[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2


# -- the official openai client ------------------------------------------------------------------


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0) as c:
        yield c


def test_the_openai_client_lists_the_model_and_its_presets(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["videollm", "videollm-full", "videollm-r0.25", "videollm-r0.1"]
    assert models.data[3].model_extra["videollm_compression"] == {"retain_ratio": 0.1}


def test_the_openai_client_reads_a_completion_and_a_stream(gateway, clean_redis, client, video_url):
    reference = complete(gateway, small_chat(video_url))
    expected = reference["choices"][0]["message"]["content"]
    assert expected

    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                             {"type": "text", "text": "What happens in this video?"}]}]
    completion = client.chat.completions.create(
        model="videollm", messages=messages, max_tokens=16, extra_body={"videollm": {"num_frames": 4}})
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == reference["choices"][0]["finish_reason"]
    assert completion.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert completion.model_extra["videollm"]["cache"] == "hit"

    pieces, finish, usage = [], None, None
    with client.chat.completions.create(
        model="videollm", messages=messages, max_tokens=16, stream=True, stream_options={"include_usage": True},
        extra_body={"videollm": {"num_frames": 4}},
    ) as events:
        for chunk in events:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish == reference["choices"][0]["finish_reason"]
    assert usage is not None and usage.completion_tokens == reference["usage"]["completion_tokens"]


def test_the_openai_client_passes_the_video_through_extra_body_messages(gateway, clean_redis, client, video_url):
    body = small_chat(video_url)
    reference = complete(gateway, body)
    completion = client.chat.completions.create(
        model="videollm", messages=[], max_tokens=16,
        extra_body={"messages": body["messages"], "videollm": {"num_frames": 4}})
    assert completion.choices[0].message.content == reference["choices"][0]["message"]["content"]


def test_the_openai_client_raises_the_gateways_errors(client, video_url):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert "no-such-model" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="videollm", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, temperature=5)
    assert "temperature" in info.value.message


# -- text only -----------------------------------------------------------------------------------


def test_a_text_only_chat_works_in_both_modes_and_reports_no_cache(gateway, clean_redis):
    body = text_chat()
    response = post(gateway, body)
    assert response.status_code == 200, response.text
    assert response.headers["x-videollm-cache"] == "none"
    whole = response.json()
    expected = whole["choices"][0]["message"]["content"]
    assert expected
    assert whole["videollm"]["cache"] in (None, "none")
    assert whole["videollm"]["frames"] == 0
    assert whole["videollm"]["visual_tokens"] == 0
    assert whole["usage"]["completion_tokens"] > 0

    response, chunks = stream(gateway, {**body, "stream_options": {"include_usage": True}})
    assert response.headers["x-videollm-cache"] == "none"
    assert_chunk_format(chunks)
    assert streamed_text(chunks) == expected
    last = choice_chunks(chunks)[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert last["videollm"]["cache"] in (None, "none")
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert list(clean_redis.scan_iter(match="videollm:v1:tokens:*")) == []


# -- stop strings --------------------------------------------------------------------------------


def pick_stop(text: str, skip: int = 3, length: int = 3) -> str:
    """A substring of `text` whose first occurrence starts after the first `skip` characters."""
    for start in range(skip, len(text) - length + 1):
        candidate = text[start : start + length]
        if candidate.isascii() and candidate.isprintable() and candidate.strip() == candidate \
                and text.find(candidate) >= skip:
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("mode", ["video", "text only"])
def test_a_stop_string_cuts_the_answer_before_its_first_occurrence(gateway, clean_redis, video_url, mode):
    body = small_chat(video_url, max_tokens=24) if mode == "video" else text_chat(max_tokens=24)
    text = complete(gateway, body)["choices"][0]["message"]["content"]
    stop = pick_stop(text)
    expected = text[: text.find(stop)]

    stopped = complete(gateway, {**body, "stop": stop})
    assert stopped["choices"][0]["message"]["content"] == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"

    as_list = complete(gateway, {**body, "stop": ["this will never appear \u2603", stop]})
    assert as_list["choices"][0]["message"]["content"] == expected
    assert as_list["choices"][0]["finish_reason"] == "stop"

    _, chunks = stream(gateway, {**body, "stop": stop})
    assert streamed_text(chunks) == expected
    assert choice_chunks(chunks)[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(stop not in (c["choices"][0]["delta"].get("content") or "") for c in choice_chunks(chunks))


def test_a_stop_string_spanning_two_streamed_pieces_still_cuts_the_answer(gateway, clean_redis, video_url):
    body = small_chat(video_url, max_tokens=24)
    _, chunks = stream(gateway, body)
    pieces = [c["choices"][0]["delta"].get("content") or "" for c in choice_chunks(chunks)]
    text = "".join(pieces)
    stop = None
    boundary = 0
    for piece in pieces[:-1]:
        boundary += len(piece)
        candidate = text[boundary - 1 : boundary + 2]
        if boundary >= 2 and len(candidate) == 3 and candidate.isascii() and candidate.isprintable() \
                and text.find(candidate) == boundary - 1:
            stop = candidate
            break
    if stop is None:
        pytest.fail(f"no stop string spans two pieces of {pieces!r}")
    expected = text[: boundary - 1]

    stopped = complete(gateway, {**body, "stop": stop})
    assert stopped["choices"][0]["message"]["content"] == expected
    assert stopped["choices"][0]["finish_reason"] == "stop"
    _, chunks = stream(gateway, {**body, "stop": stop})
    assert streamed_text(chunks) == expected
    assert choice_chunks(chunks)[-1]["choices"][0]["finish_reason"] == "stop"

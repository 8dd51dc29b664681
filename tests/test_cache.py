"""The Redis cache of encoded videos, against a real Redis and the real stack."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from conftest import GatewayServer, free_port, gateway_settings
from gateway.cache import EncodedVideo, cache_key
from helpers import data_url, encoder_calls, video_chat
from protos.videollm.v1 import encoder_pb2, tensor_pb2
from videos import make_video

TOKEN_KEYS = "videollm:v1:tokens:*"


def ask(url: str, body: dict) -> httpx.Response:
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def written_keys(client, count: int = 1, timeout_s: float = 10.0) -> list[bytes]:
    """The token entries once `count` of them are there: a miss's verified entry is written in the
    background, possibly just after the answer (a large tensor on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while len(keys := client.keys(TOKEN_KEYS)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return keys


def test_repeat_question_is_answered_from_the_cache_without_the_encoder(gateway, encoder_service, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=21)), videollm={"num_frames": 4})
    before = encoder_calls(encoder_service)
    first = ask(gateway.url, body)
    second = ask(gateway.url, body)
    assert (first.headers["x-videollm-cache"], second.headers["x-videollm-cache"]) == ("miss", "hit")
    assert second.json()["videollm"]["cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert encoder_calls(encoder_service) == before + 1
    assert len(clean_redis.keys(TOKEN_KEYS)) == 1


def test_a_different_question_about_a_cached_video_hits(gateway, encoder_service, clean_redis):
    video = data_url(make_video("mp4", seed=22))
    ask(gateway.url, video_chat(video, "first question", videollm={"num_frames": 4}))
    before = encoder_calls(encoder_service)
    again = ask(gateway.url, video_chat(video, "a second, different question", videollm={"num_frames": 4}))
    assert again.headers["x-videollm-cache"] == "hit"
    assert encoder_calls(encoder_service) == before


def test_changing_the_frame_count_misses(gateway, encoder_service, clean_redis):
    video = data_url(make_video("mp4", seed=23))
    full = {"method": "none"}
    ask(gateway.url, video_chat(video, videollm={"num_frames": 4, "compression": full}))
    other = ask(gateway.url, video_chat(video, videollm={"num_frames": 5, "compression": full}))
    assert other.headers["x-videollm-cache"] == "miss"
    assert other.json()["videollm"]["visual_tokens"] == 5 * 196 + 1
    assert len(written_keys(clean_redis, 2)) == 2


def test_default_and_explicit_settings_share_one_entry(gateway, encoder_service, clean_redis):
    video = data_url(make_video("mp4", seed=24, n_frames=40))
    ask(gateway.url, video_chat(video))  # the encoder's defaults: 32 frames, EarlyTom at its defaults
    explicit = ask(gateway.url, video_chat(video, videollm={
        "num_frames": 32, "compression": {"method": "earlytom", "retain_ratio": 0.2, "prune_layers": [23, 8, 21]}}))
    assert explicit.headers["x-videollm-cache"] == "hit"


def test_the_key_covers_model_video_frames_and_compression():
    frames = {"num_frames": 32}
    base = cache_key("model@1", "ab" * 32, frames, {"method": "none"})
    assert base == cache_key("model@1", "ab" * 32, {"num_frames": 32}, {"method": "none"})
    variants = [
        cache_key("model@2", "ab" * 32, frames, {"method": "none"}),
        cache_key("model@1", "cd" * 32, frames, {"method": "none"}),
        cache_key("model@1", "ab" * 32, {"num_frames": 16}, {"method": "none"}),
        cache_key("model@1", "ab" * 32, {"num_frames": 32, "end_s": 5.0}, {"method": "none"}),
        cache_key("model@1", "ab" * 32, {"fps": 1.0, "max_frames": 32}, {"method": "none"}),
        cache_key("model@1", "ab" * 32, frames, {"method": "earlytom", "retain_ratio": 0.2}),
        cache_key("model@1", "ab" * 32, frames, {"method": "earlytom", "retain_ratio": 0.1}),
        cache_key("model@1", "ab" * 32, frames, {"method": "earlytom", "retain_ratio": 0.1}, max_visual_tokens=500),
    ]
    assert len({base, *variants}) == len(variants) + 1


def test_entries_expire_after_the_configured_ttl(encoder_service, llm_service, redis_server, clean_redis):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url, cache_ttl_s=123)
    with GatewayServer(settings) as server:
        ask(server.url, video_chat(data_url(make_video("mp4", seed=25)), videollm={"num_frames": 4}))
    (key,) = clean_redis.keys(TOKEN_KEYS)
    assert 100 < clean_redis.ttl(key) <= 123


def test_entries_over_the_size_cap_are_not_cached(encoder_service, llm_service, redis_server, clean_redis):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                cache_max_entry_bytes=1000)
    with GatewayServer(settings) as server:
        body = video_chat(data_url(make_video("mp4", seed=26)), videollm={"num_frames": 4})
        ask(server.url, body)
        assert ask(server.url, body).headers["x-videollm-cache"] == "miss"
        deadline = time.monotonic() + 30
        while server.cache_writes_pending():  # the second answer's write runs in the background
            assert time.monotonic() < deadline
            time.sleep(0.01)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert clean_redis.keys(TOKEN_KEYS) == []
    assert "videollm_cache_entries_skipped_total 2.0" in metrics  # left out, counted, never truncated


@pytest.mark.parametrize("prefix_held", [False, True])
def test_a_corrupted_entry_is_a_miss_and_is_replaced(gateway, encoder_service, llm_service, clean_redis, prefix_held):
    """Whether the entry is read at once or only when the LLM turns out not to hold the prefix."""
    body = video_chat(data_url(make_video("mp4", seed=27)), videollm={"num_frames": 4})
    first = ask(gateway.url, body)
    (key,) = written_keys(clean_redis)
    good = clean_redis.get(key)
    damaged = bytearray(good)
    damaged[-10] ^= 0xFF  # one flipped byte in the token payload
    for bad in (bytes(damaged), good[: len(good) // 2], b"garbage"):
        clean_redis.set(key, bad)
        llm_service.engine.prefixes._entries.clear()  # the LLM must read the tokens again
        if prefix_held:
            ask(gateway.url, body)  # the gateway now knows the holder; the LLM holds the prefix again
            clean_redis.set(key, bad)
            llm_service.engine.prefixes._entries.clear()
        before = encoder_calls(encoder_service)
        if prefix_held:
            again = ask(gateway.url, body)
        else:  # a gateway that does not know the holder reads the whole entry at once
            with GatewayServer(gateway.settings.model_copy(update={"port": free_port()})) as fresh:
                again = ask(fresh.url, body)
        assert again.headers["x-videollm-cache"] == "miss"
        assert encoder_calls(encoder_service) == before + 1
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        deadline = time.monotonic() + 10
        while (stored := clean_redis.get(key)) == bad and time.monotonic() < deadline:
            time.sleep(0.05)  # the verified entry is written after the answer
        assert EncodedVideo.from_bytes(stored).payload == EncodedVideo.from_bytes(good).payload


def test_entry_round_trip_checks_length_and_checksum():
    payload = bytes(range(256)) * 10
    import zlib

    header = encoder_pb2.EncodeHeader(
        tensor=tensor_pb2.TensorHeader(shape=[10, 64], dtype="float32", num_bytes=len(payload),
                                       crc32=zlib.crc32(payload))
    )
    blob = EncodedVideo(header, payload).to_bytes()
    assert EncodedVideo.from_bytes(blob).payload == payload
    with pytest.raises(ValueError, match="truncated"):
        EncodedVideo.from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="checksum"):
        EncodedVideo.from_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))


def test_concurrent_identical_misses_encode_once(gateway, encoder_service, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=28)), videollm={"num_frames": 4})

    async def burst():
        async with httpx.AsyncClient(timeout=180) as client:
            return await asyncio.gather(*(client.post(f"{gateway.url}/v1/chat/completions", json=body)
                                          for _ in range(4)))

    before = encoder_calls(encoder_service)
    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 4
    assert encoder_calls(encoder_service) == before + 1
    answers = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(answers) == 1


def test_without_redis_the_gateway_answers_and_reports_degraded(encoder_service, llm_service):
    settings = gateway_settings([encoder_service.address], [llm_service.address], f"redis://127.0.0.1:{free_port()}/0")
    with GatewayServer(settings) as server:
        body = video_chat(data_url(make_video("mp4", seed=29)), videollm={"num_frames": 4})
        first, second = ask(server.url, body), ask(server.url, body)
        assert first.headers["x-videollm-cache"] == second.headers["x-videollm-cache"] == "miss"
        assert second.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["redis"] == "unavailable"


def test_the_cache_comes_back_when_redis_returns(encoder_service, llm_service, tmp_path):
    from conftest import start_redis

    port = free_port()
    settings = gateway_settings([encoder_service.address], [llm_service.address], f"redis://127.0.0.1:{port}/0")
    with GatewayServer(settings) as server:
        body = video_chat(data_url(make_video("mp4", seed=30)), videollm={"num_frames": 4})
        assert ask(server.url, body).headers["x-videollm-cache"] == "miss"  # Redis is not running yet
        redis_process = start_redis(port, tmp_path)
        try:
            ask(server.url, body)  # stored now
            assert ask(server.url, body).headers["x-videollm-cache"] == "hit"
            assert httpx.get(f"{server.url}/ready", timeout=10).json()["redis"] == "ok"
        finally:
            redis_process.terminate()
            redis_process.wait(10)


def test_a_token_tensor_over_4_mib_crosses_encoder_gateway_redis_and_llm_intact(gateway, encoder_service, llm_service,
                                                                                 clean_redis):
    import torch

    from llm_service.engine import Delta, GenerationRequest
    from llm_service.prompt import VIDEO, Message
    from llm_service.sampling import SamplingParams
    from test_parity import encode_over_grpc

    video = make_video("mp4", n_frames=60, seed=31)
    frames = 48
    question = "What happens?"
    answer = ask(gateway.url, video_chat(data_url(video), question, max_tokens=8,
                                         videollm={"num_frames": frames, "compression": {"method": "none"}}))
    (key,) = written_keys(clean_redis)
    cached = EncodedVideo.from_bytes(clean_redis.get(key))
    assert cached.header.tensor.num_bytes > 4 << 20

    _, direct = encode_over_grpc(encoder_service.address, video, frames)
    relayed = torch.frombuffer(bytearray(cached.payload), dtype=torch.float32).reshape(direct.shape)
    assert torch.equal(relayed, direct)

    events = llm_service.engine.generate(GenerationRequest(
        [Message("user", (VIDEO, question))], SamplingParams(max_tokens=8), visual=direct))
    expected = "".join(e.text for e in events if isinstance(e, Delta))
    assert answer.json()["choices"][0]["message"]["content"] == expected

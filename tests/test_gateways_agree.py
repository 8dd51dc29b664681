"""Several gateways on one Redis agree: of identical concurrent misses spread over them, one
encodes; a lock whose holder died expires and another gateway takes over; a failed encode leaves
no lock behind; a repeat question through another gateway reaches the LLM that holds the video's
prefix (real gateways, encoder, LLMs and Redis on loopback)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import GatewayServer, gateway_settings, running_llm
from gateway.shared_flight import LOCK_TTL_MS, lock_key
from helpers import data_url, encoder_calls, video_chat
from videollm.settings import LLMSettings
from videos import make_video

LOCKS = "videollm:v1:encoding:*"


@pytest.fixture(scope="module")
def two_gateways(encoder_service, llm_service, redis_server):
    def settings():  # a port of its own each
        return gateway_settings([encoder_service.address], [llm_service.address], redis_server.url)

    with GatewayServer(settings()) as first, GatewayServer(settings()) as second:
        yield first, second


def ask(gateway: GatewayServer, body: dict) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=300)


def no_lock_left(client) -> bool:
    deadline = time.monotonic() + 10
    while client.keys(LOCKS) and time.monotonic() < deadline:  # released in the background
        time.sleep(0.01)
    return client.keys(LOCKS) == []


def test_identical_concurrent_misses_over_two_gateways_encode_once(two_gateways, encoder_service, clean_redis):
    body = video_chat(data_url(make_video("mp4", seed=701, n_frames=40)), videollm={"num_frames": 8})
    before = encoder_calls(encoder_service)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: ask(two_gateways[i % 2], body), range(16)))
    assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers if a.status_code != 200]
    assert encoder_calls(encoder_service) == before + 1
    texts = {a.json()["choices"][0]["message"]["content"] for a in answers}
    assert len(texts) == 1  # the same tokens, whichever gateway asked
    served_elsewhere = sum(g.app.state.runtime.pipeline.shared_flight.waited for g in two_gateways)
    assert served_elsewhere >= 1  # the gateway that did not encode read the other's entry
    assert no_lock_left(clean_redis)


def test_a_lock_whose_holder_died_expires_and_another_gateway_encodes(two_gateways, encoder_service, clean_redis):
    video = make_video("mp4", seed=702, n_frames=40)
    body = video_chat(data_url(video), videollm={"num_frames": 8})
    first = ask(two_gateways[0], body)  # learn the key: the one the dead holder would have locked
    assert first.status_code == 200
    key = [k.decode() for k in clean_redis.keys("videollm:v1:tokens:*")]
    assert len(key) == 1
    clean_redis.delete(key[0])
    clean_redis.set(lock_key(key[0]), "a gateway that died", px=1500)  # it will renew it no more
    before = encoder_calls(encoder_service)
    answer = ask(two_gateways[1], body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-videollm-cache"] == "miss" and encoder_calls(encoder_service) == before + 1
    assert 1500 < LOCK_TTL_MS and no_lock_left(clean_redis)


def test_a_failed_encode_leaves_no_lock(two_gateways, clean_redis):
    broken = make_video("mp4", seed=703)[:2000]  # a truncated file: the encoder refuses it
    answer = ask(two_gateways[0], video_chat(data_url(broken), videollm={"num_frames": 4}))
    assert answer.status_code == 400, answer.text
    assert no_lock_left(clean_redis)


@pytest.fixture(scope="module")
def second_llm(tiny_model_dir):
    with running_llm(LLMSettings(model=tiny_model_dir, port=0)) as service:
        yield service


def test_a_repeat_question_through_the_other_gateway_finds_its_prefix(encoder_service, llm_service, second_llm,
                                                                        redis_server, clean_redis):
    engines = {llm_service.address: llm_service.engine, second_llm.address: second_llm.engine}

    def settings(llms):  # the two gateways list the LLMs in other orders: the choice must not depend on it
        return gateway_settings([encoder_service.address], llms, redis_server.url)

    with GatewayServer(settings(list(engines))) as first, GatewayServer(settings(list(engines)[::-1])) as second:
        for seed in range(704, 710):  # several videos: by chance alone all six would agree 1 time in 32
            video = data_url(make_video("mp4", seed=seed, n_frames=24))
            served = {address: engine.generations_completed for address, engine in engines.items()}
            hits = {address: engine.prefixes.hits for address, engine in engines.items()}
            assert ask(first, video_chat(video, "What moves?", videollm={"num_frames": 4})).status_code == 200
            (holder,) = [a for a, e in engines.items() if e.generations_completed > served[a]]
            repeat = ask(second, video_chat(video, "What colour is it?", videollm={"num_frames": 4}))
            assert repeat.status_code == 200 and repeat.headers["x-videollm-cache"] == "hit"
            assert engines[holder].generations_completed == served[holder] + 2  # the same replica answered
            assert engines[holder].prefixes.hits == hits[holder] + 1  # and prefilled only the question

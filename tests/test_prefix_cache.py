"""Reuse of the LLM's KV cache of a video prefix for repeat questions, and routing to its holder."""

from __future__ import annotations

import httpx
import pytest
import torch

from conftest import GatewayServer, gateway_settings, running_llm
from helpers import data_url, video_chat
from llm_service.engine import Delta, GenerationRequest
from llm_service.prompt import VIDEO, Message
from llm_service.sampling import SamplingParams
from videollm.settings import InnerCompressionSettings, LLMSettings
from videos import make_video


def answer(engine, question: str, visual, video_key: str = "") -> str:
    request = GenerationRequest([Message("user", (VIDEO, question))], SamplingParams(max_tokens=10), visual=visual,
                                video_key=video_key)
    return "".join(e.text for e in engine.generate(request) if isinstance(e, Delta))


def test_a_repeat_question_reuses_the_prefix_and_answers_as_without_reuse(llm_service):
    engine = llm_service.engine
    visual = torch.randn(300, engine.lm.hidden_size, generator=torch.Generator().manual_seed(5))
    hits = engine.prefixes.hits
    first = answer(engine, "What happens first?", visual, video_key="video-a")
    request = GenerationRequest([Message("user", (VIDEO, "And then?"))], SamplingParams(max_tokens=10),
                                video_key="video-a", visual_count=300)
    assert not engine.needs_visual(request)  # this replica holds the prefix, and the request holds it now
    engine.prefixes._entries.clear()  # evicted while the request waited: it must not matter
    reused = "".join(e.text for e in engine.generate(request) if isinstance(e, Delta))
    assert engine.prefixes.hits == hits + 1
    assert first == answer(engine, "What happens first?", visual)  # without any reuse
    assert reused == answer(engine, "And then?", visual)


def test_a_different_prefix_or_stage_three_never_reuses(llm_service):
    engine = llm_service.engine
    visual = torch.randn(50, engine.lm.hidden_size, generator=torch.Generator().manual_seed(6))
    answer(engine, "Q", visual, video_key="video-b")
    system = GenerationRequest([Message("system", ("Be brief.",)), Message("user", (VIDEO, "Q"))],
                               SamplingParams(max_tokens=2), video_key="video-b")
    assert engine.needs_visual(system)  # another chat before the video: another prefix
    inner = GenerationRequest([Message("user", (VIDEO, "Q"))], SamplingParams(max_tokens=2), video_key="video-b",
                              inner=InnerCompressionSettings())
    assert engine.needs_visual(inner)


@pytest.fixture
def llm_without_prefix_cache(tiny_model_dir):
    with running_llm(LLMSettings(model=tiny_model_dir, port=0, prefix_cache_entries=0)) as service:
        yield service.address, service.engine


def test_rest_repeat_questions_skip_the_visual_tokens_and_match_answers_without_reuse(
    encoder_service, llm_service, llm_without_prefix_cache, redis_server, clean_redis
):
    video = data_url(make_video("mp4", seed=91))
    questions = ["What is moving?", "What colour is the square?", "How many frames?"]
    plain_address, plain_engine = llm_without_prefix_cache
    answers = {}
    for name, llm in (("reuse", llm_service.address), ("plain", plain_address)):
        settings = gateway_settings([encoder_service.address], [llm], redis_server.url)
        with GatewayServer(settings) as gateway:
            hits = llm_service.engine.prefixes.hits
            answers[name] = []
            for question in questions:
                body = video_chat(video, question, max_tokens=8, videollm={"num_frames": 4})
                response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
                assert response.status_code == 200, response.text
                answers[name].append(response.json()["choices"][0]["message"]["content"])
            if name == "reuse":
                assert llm_service.engine.prefixes.hits == hits + len(questions) - 1
    assert plain_engine.prefixes.hits == 0
    assert answers["reuse"] == answers["plain"]


def test_repeat_questions_are_routed_to_the_replica_that_holds_the_prefix(
    encoder_service, llm_service, tiny_model_dir, redis_server, clean_redis
):
    with running_llm(LLMSettings(model=tiny_model_dir, port=0)) as other:
        gateway_config = gateway_settings([encoder_service.address], [llm_service.address, other.address],
                                          redis_server.url)
        with GatewayServer(gateway_config) as gateway:
            video = data_url(make_video("mp4", seed=92))
            engines = [llm_service.engine, other.engine]
            before = [e.generations_completed for e in engines]
            hits = [e.prefixes.hits for e in engines]
            for question in ["one", "two", "three", "four"]:
                body = video_chat(video, question, max_tokens=4, videollm={"num_frames": 2})
                assert httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
            served = [e.generations_completed - b for e, b in zip(engines, before)]
            assert sorted(served) == [0, 4]  # every question went to the same replica
            holder = served.index(4)
            assert engines[holder].prefixes.hits - hits[holder] == 3


def _redis_calls(redis_server, command: str) -> int:
    stats = redis_server.client().info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_repeat_question_to_the_holder_reads_only_the_entry_header_from_redis(
    encoder_service, llm_service, redis_server, clean_redis
):
    video = data_url(make_video("mp4", seed=93))
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url)
    with GatewayServer(settings) as gateway:
        def ask(question: str) -> httpx.Response:
            body = video_chat(video, question, max_tokens=6, videollm={"num_frames": 4})
            response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response

        ask("First question?")
        gets, peeks = _redis_calls(redis_server, "get"), _redis_calls(redis_server, "getrange")
        repeat = ask("Second question?")
        assert repeat.headers["x-videollm-cache"] == "hit"
        assert _redis_calls(redis_server, "getrange") == peeks + 1  # with STRLEN, in one round trip
        assert _redis_calls(redis_server, "get") == gets  # the tokens stayed in Redis: the LLM held the prefix

        # The LLM lost the prefix (restart, eviction): it asks for the tokens, which are read then.
        llm_service.engine.prefixes._entries.clear()
        third = ask("Third question?")
        assert third.headers["x-videollm-cache"] == "hit"
        assert _redis_calls(redis_server, "get") == gets + 1
    with GatewayServer(settings) as fresh:  # no holder known: the same answer from the full entry
        body = video_chat(video, "Third question?", max_tokens=6, videollm={"num_frames": 4})
        again = httpx.post(f"{fresh.url}/v1/chat/completions", json=body, timeout=120)
    assert again.json()["choices"][0]["message"]["content"] == third.json()["choices"][0]["message"]["content"]

"""The gateway spreads calls over several encoder and LLM replicas and survives losing one."""

from __future__ import annotations

import httpx
import pytest

from conftest import GatewayServer, free_port, gateway_settings
from encoder_service.engine import EncoderEngine
from encoder_service.server import start as start_encoder
from helpers import data_url, video_chat
from llm_service.engine import LLMEngine
from llm_service.server import start as start_llm
from videollm.settings import EncoderSettings, LLMSettings
from videos import make_video


@pytest.fixture
def second_replicas(tiny_model_dir):
    encoder_settings = EncoderSettings(model=tiny_model_dir, port=0)
    encoder_engine = EncoderEngine(encoder_settings)
    encoder_server, _, encoder_port = start_encoder(encoder_settings, encoder_engine)
    llm_settings = LLMSettings(model=tiny_model_dir, port=0)
    llm_engine = LLMEngine(llm_settings)
    llm_server, _, llm_port = start_llm(llm_settings, llm_engine)
    yield {
        "encoder": (f"127.0.0.1:{encoder_port}", encoder_engine, encoder_server),
        "llm": (f"127.0.0.1:{llm_port}", llm_engine, llm_server),
    }
    encoder_server.stop(None)
    llm_server.stop(None)


def ask(url: str, seed: int) -> httpx.Response:
    body = video_chat(data_url(make_video("mp4", seed=seed)), videollm={"num_frames": 2}, max_tokens=4)
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def test_requests_are_spread_over_replicas_and_one_lost_replica_is_survived(
    encoder_service, llm_service, second_replicas, redis_server, clean_redis
):
    encoder2, encoder_engine2, encoder_server2 = second_replicas["encoder"]
    llm2, llm_engine2, llm_server2 = second_replicas["llm"]
    settings = gateway_settings([encoder_service.address, encoder2], [llm_service.address, llm2], redis_server.url)
    with GatewayServer(settings) as gateway:
        encodes = [encoder_service.engine.encodes_completed, encoder_engine2.encodes_completed]
        generations = [llm_service.engine.generations_completed, llm_engine2.generations_completed]
        for seed in range(60, 64):
            assert ask(gateway.url, seed).status_code == 200
        # a video's questions go to its home LLM (all four may share one); questions without a video
        # have no home and take turns
        for _ in range(2):
            text = {"model": "videollm", "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 2}
            assert httpx.post(f"{gateway.url}/v1/chat/completions", json=text, timeout=60).status_code == 200
        assert encoder_service.engine.encodes_completed > encodes[0]
        assert encoder_engine2.encodes_completed > encodes[1]
        assert llm_service.engine.generations_completed > generations[0]
        assert llm_engine2.generations_completed > generations[1]

        encoder_server2.stop(None).wait()
        llm_server2.stop(None).wait()
        for seed in range(64, 68):  # every request must find the surviving replicas
            response = ask(gateway.url, seed)
            assert response.status_code == 200, response.text
        ready = httpx.get(f"{gateway.url}/ready", timeout=10).json()
        assert ready["status"] == "degraded"
        assert ready["encoders"] == {encoder_service.address: True, encoder2: False}


def test_no_reachable_encoder_is_a_503_in_openai_shape(llm_service, redis_server):
    settings = gateway_settings([f"127.0.0.1:{free_port()}"], [llm_service.address], redis_server.url)
    with GatewayServer(settings) as gateway:
        response = ask(gateway.url, 70)
        assert response.status_code == 503
        assert "encoder" in response.json()["error"]["message"]
        assert response.headers["retry-after"] == "1"
        assert httpx.get(f"{gateway.url}/ready", timeout=10).status_code == 503

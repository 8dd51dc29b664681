"""On a cache miss the LLM takes the visual tokens straight from the encoder (Encoder.Pull)."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from conftest import GatewayServer, free_port, gateway_settings
from encoder_service.engine import EncoderEngine
from encoder_service.pull_store import PullStore
from encoder_service.server import start as start_encoder
from helpers import data_url, video_chat
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc
from videollm.settings import EncoderSettings
from videos import make_video


def llm_info(address: str) -> llm_pb2.LLMInfo:
    with grpc.insecure_channel(address) as channel:
        return llm_pb2_grpc.LLMStub(channel).Info(llm_pb2.LLMInfoRequest(), timeout=10)


def encoder_info(address: str) -> encoder_pb2.EncoderInfo:
    with grpc.insecure_channel(address) as channel:
        return encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest(), timeout=10)


def answer(gateway_url: str, video: str, seed_question: str) -> httpx.Response:
    body = video_chat(video, seed_question, max_tokens=6, videollm={"num_frames": 4})
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_a_miss_is_pulled_by_the_llm_and_answers_as_when_relayed(encoder_service, llm_service, redis_server,
                                                                 clean_redis):
    video = data_url(make_video("mp4", seed=501))
    before_llm, before_encoder = llm_info(llm_service.address), encoder_info(encoder_service.address)
    settings = gateway_settings([encoder_service.address], [llm_service.address], None)  # no cache: all misses
    with GatewayServer(settings) as gateway:
        pulled = answer(gateway.url, video, "What moves?")
    after_llm, after_encoder = llm_info(llm_service.address), encoder_info(encoder_service.address)
    assert pulled.headers["x-videollm-cache"] == "miss"
    assert after_llm.visual_pulls == before_llm.visual_pulls + 1
    assert after_llm.visual_pull_fallbacks == before_llm.visual_pull_fallbacks
    assert after_encoder.pulls_served == before_encoder.pulls_served + 1

    relay_only = settings.model_copy(update={"port": free_port(), "direct_pull": False})
    with GatewayServer(relay_only) as gateway:
        relayed = answer(gateway.url, video, "What moves?")
    assert llm_info(llm_service.address).visual_pulls == after_llm.visual_pulls  # not offered
    assert relayed.json()["choices"][0]["message"] == pulled.json()["choices"][0]["message"]


@pytest.fixture
def forgetful_encoder(tiny_model_dir):
    """An encoder whose tokens expire before anyone can pull them."""
    settings = EncoderSettings(model=tiny_model_dir, port=0, pull_ttl_s=1e-9)
    server, _, port = start_encoder(settings, EncoderEngine(settings))
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_a_failed_pull_falls_back_to_the_gateway(forgetful_encoder, llm_service, encoder_service):
    video = data_url(make_video("mp4", seed=502))
    before = llm_info(llm_service.address)
    settings = gateway_settings([forgetful_encoder], [llm_service.address], None)
    with GatewayServer(settings) as gateway:
        fallback = answer(gateway.url, video, "What moves?")
    after = llm_info(llm_service.address)
    assert after.visual_pull_fallbacks == before.visual_pull_fallbacks + 1
    assert after.visual_pulls == before.visual_pulls
    settings = gateway_settings([encoder_service.address], [llm_service.address], None)
    with GatewayServer(settings) as gateway:
        pulled = answer(gateway.url, video, "What moves?")
    assert pulled.json()["choices"][0]["message"] == fallback.json()["choices"][0]["message"]


def test_a_ticket_is_taken_once_and_unknown_tickets_are_not_found(encoder_service):
    with grpc.insecure_channel(encoder_service.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = encoder_pb2_grpc.EncoderStub(ch)
        responses = list(stub.Encode(encoder_pb2.EncodeRequest(video=make_video("mp4", seed=503),
                                                               sampling=encoder_pb2.FrameSampling(num_frames=2)),
                                     timeout=60))
        header = responses[0].header
        assert header.pull_ticket
        pulled = b"".join(r.chunk.data for r in stub.Pull(encoder_pb2.PullRequest(ticket=header.pull_ticket),
                                                          timeout=10))
        assert pulled == b"".join(r.chunk.data for r in responses[1:])  # the same bytes as the Encode stream
        for ticket in (header.pull_ticket, "no-such-ticket"):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Pull(encoder_pb2.PullRequest(ticket=ticket), timeout=10))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert "send them with the Generate call" in caught.value.details()


def test_the_pull_store_is_bounded_by_bytes_and_time():
    store = PullStore(max_bytes=100, ttl_s=0.2)
    first, second = store.put(memoryview(b"a" * 60)), store.put(memoryview(b"b" * 60))
    assert store.take(first) is None  # evicted to make room
    assert bytes(store.take(second)) == b"b" * 60
    assert store.put(memoryview(b"c" * 101)) == ""  # larger than the store: not kept
    late = store.put(memoryview(b"d" * 10))
    time.sleep(0.3)
    assert store.take(late) is None  # expired
    assert PullStore(max_bytes=100, ttl_s=0).put(memoryview(b"e")) == ""  # off

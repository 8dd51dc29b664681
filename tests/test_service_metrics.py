"""The encoder's and the LLM's Prometheus metrics: the queue depths an autoscaler scales on, read
from the engines when scraped (real services, real HTTP)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import GatewayServer, free_port, gateway_settings
from encoder_service.engine import EncoderEngine
from helpers import data_url, video_chat
from videollm.service_metrics import encoder_registry, llm_registry, serve_metrics
from videollm.settings import EncoderSettings
from videos import make_video


def scrape(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_encoder_reports_its_queues_as_they_are(tiny_model_dir):
    engine = EncoderEngine(EncoderSettings(model=tiny_model_dir, max_frames=64, max_frames_in_flight=64))
    port = serve_metrics(encoder_registry(engine), "127.0.0.1", free_port())
    try:
        idle = scrape(port)
        assert idle["videollm_encoder_requests_in_flight"] == 0 and idle["videollm_encoder_frames_in_flight"] == 0
        engine.frames_in_flight.take(60)  # another request holds 60 of the 64 frames
        engine.requests_in_flight += 1
        waiter = threading.Thread(target=engine.frames_in_flight.take, args=(10,))
        waiter.start()
        deadline = time.monotonic() + 5
        while engine.frames_in_flight.waiting != 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        busy = scrape(port)
        assert busy["videollm_encoder_frames_in_flight"] == 60
        assert busy["videollm_encoder_requests_waiting"] == 1 and busy["videollm_encoder_requests_in_flight"] == 1
        engine.frames_in_flight.give_back(60)
        waiter.join(5)
        assert scrape(port)["videollm_encoder_frames_in_flight"] == 10
    finally:
        engine.close()


def test_the_llm_reports_its_slots_and_answers(llm_service, encoder_service, redis_server, clean_redis):
    port = serve_metrics(llm_registry(llm_service.engine), "127.0.0.1", free_port())
    before = scrape(port)
    assert before["videollm_llm_kv_slots"] == llm_service.engine.settings.decode_slots
    assert before["videollm_llm_kv_slots_in_use"] == 0 and before["videollm_llm_requests_waiting"] == 0
    with GatewayServer(gateway_settings([encoder_service.address], [llm_service.address], redis_server.url)) as gw:
        body = video_chat(data_url(make_video("mp4", seed=801)), videollm={"num_frames": 4})
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    after = scrape(port)
    assert after["videollm_llm_generations_completed"] == before["videollm_llm_generations_completed"] + 1
    assert after["videollm_llm_requests_in_flight"] == 0


def test_a_taken_port_turns_the_metrics_off_instead_of_failing():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_metrics(llm_registry(object()), "127.0.0.1", taken.getsockname()[1]) is None
    assert serve_metrics(llm_registry(object()), "127.0.0.1", 0) is None  # 0: off

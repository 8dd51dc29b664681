"""Gateway limits: a full gateway answers 429; deadlines and departed clients stop the LLM."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from conftest import GatewayServer, gateway_settings

LONG = {"model": "videollm", "messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 3000}


@pytest.fixture
def endless(llm_service):
    """The tiny model never says EOS, so max_tokens decides when an answer ends."""
    engine = llm_service.engine
    saved = engine.lm.eos_token_ids
    engine.lm.eos_token_ids = set()
    forwards = []
    hook = engine.lm.model.lm_head.register_forward_hook(lambda *_: forwards.append(time.monotonic()))
    yield forwards
    hook.remove()
    engine.lm.eos_token_ids = saved


def test_a_full_gateway_answers_429_with_retry_after(encoder_service, llm_service, endless):
    settings = gateway_settings([encoder_service.address], [llm_service.address], None, max_in_flight=1)
    with GatewayServer(settings) as gateway:
        async def two_at_once():
            async with httpx.AsyncClient(timeout=120) as client:
                first = asyncio.create_task(client.post(f"{gateway.url}/v1/chat/completions",
                                                        json={**LONG, "max_tokens": 400}))
                await asyncio.sleep(0.3)
                second = await client.post(f"{gateway.url}/v1/chat/completions", json=LONG)
                return await first, second

        first, second = asyncio.run(two_at_once())
        assert first.status_code == 200
        assert second.status_code == 429
        assert second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "overloaded"


def test_the_request_deadline_reaches_the_llm(encoder_service, llm_service, endless):
    settings = gateway_settings([encoder_service.address], [llm_service.address], None, request_timeout_s=1.0)
    with GatewayServer(settings) as gateway:
        started = time.monotonic()
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=LONG, timeout=120)
        assert response.status_code == 504, response.text
        assert time.monotonic() - started < 10
        count = len(endless)
        time.sleep(1.0)
        assert len(endless) - count <= 2  # decoding stopped with the deadline


def test_a_client_that_leaves_a_non_streamed_request_stops_decoding(gateway, endless):
    body = httpx.Request("POST", f"{gateway.url}/v1/chat/completions", json=LONG).read()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not endless and time.monotonic() < deadline:
            time.sleep(0.05)
        assert endless, "the LLM never started"
    # the socket is closed: the gateway notices within its polling interval and cancels the call
    time.sleep(2.0)
    count = len(endless)
    time.sleep(1.0)
    assert len(endless) - count <= 2
    assert count < 3000

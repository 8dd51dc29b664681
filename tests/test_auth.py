"""Optional API keys on the gateway: with `api_keys` set, every route but /health, /ready and /metrics
needs `Authorization: Bearer <key>`; anything else gets a 401 in OpenAI's shape, before the body is read.
"""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from conftest import GatewayServer, gateway_settings
from helpers import data_url, video_chat
from videollm.cli import build_parser, service_settings
from videollm.flags import given_values, serve_flags
from videollm.settings import GatewaySettings
from videos import make_video

TIMEOUT = 120
KEYS = ["sk-first-0123456789", "second-key", "k3_with.symbols~!"]
TEXT_CHAT = {"model": "videollm", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def secured(encoder_service, llm_service, redis_server):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                max_upload_bytes=8 << 20, api_keys=KEYS)
    with GatewayServer(settings) as server:
        yield server


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(response: httpx.Response, *secrets: str) -> dict:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
    assert "Authorization: Bearer" in error["message"], error["message"]  # says how to authenticate
    for secret in [*secrets, *KEYS]:  # never echoes the key sent, nor a configured one
        assert secret not in response.text
    return error


# -- rejected ---------------------------------------------------------------------------------------

WRONG = {
    "no header": {},
    "wrong scheme": {"Authorization": f"Basic {KEYS[0]}"},
    "no scheme": {"Authorization": KEYS[0]},
    "wrong key": bearer("sk-not-a-valid-key"),
    "a valid key's prefix": bearer(KEYS[0][:-1]),
    "a valid key plus more": bearer(KEYS[0] + "x"),
    "empty key": {"Authorization": "Bearer"},  # httpx won't send "Bearer " (a raw test below does)
    "empty header": {"Authorization": ""},
}


@pytest.mark.parametrize("headers", WRONG.values(), ids=WRONG.keys())
def test_a_missing_or_wrong_key_gets_401_on_every_v1_route(secured, headers):
    secrets = ["sk-not-a-valid-key"]  # and every configured key (assert_unauthorized checks those)
    assert_unauthorized(httpx.get(f"{secured.url}/v1/models", headers=headers, timeout=TIMEOUT), *secrets)
    assert_unauthorized(httpx.post(f"{secured.url}/v1/chat/completions", json=TEXT_CHAT, headers=headers,
                                   timeout=TIMEOUT), *secrets)
    assert_unauthorized(httpx.post(f"{secured.url}/v1/videos", files={"file": ("a.mp4", b"x", "video/mp4")},
                                   headers=headers, timeout=TIMEOUT), *secrets)
    # unknown routes too: no 404 tells an unauthenticated client what exists
    assert_unauthorized(httpx.get(f"{secured.url}/v1/nothing-here", headers=headers, timeout=TIMEOUT), *secrets)


def test_the_messages_tell_missing_wrong_scheme_and_wrong_key_apart(secured):
    def message(headers):
        return assert_unauthorized(httpx.get(f"{secured.url}/v1/models", headers=headers, timeout=TIMEOUT))["message"]

    assert "no API key" in message({})
    assert "Bearer scheme" in message({"Authorization": "Basic abc"})
    assert "empty" in message({"Authorization": "Bearer"})
    assert "incorrect API key" in message(bearer("nope"))


def test_a_large_unauthenticated_body_gets_401_quickly(secured):
    started = time.perf_counter()
    response = httpx.post(f"{secured.url}/v1/chat/completions", content=b"x" * (5 << 20),
                          headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert_unauthorized(response)
    assert time.perf_counter() - started < 5


def raw_request(server, request: bytes) -> bytes:
    """Send bytes as they are (no client-side checks) and return the response up to its body."""
    with socket.create_connection(("127.0.0.1", server.settings.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    return received


def test_the_401_is_sent_before_the_body_arrives(secured):
    """Headers announce 5 MB that never come: the answer must not wait for (or buffer) the body."""
    head = raw_request(secured, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 5242880\r\n\r\n{\"model\": ")
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"www-authenticate: bearer" in head.lower(), head


@pytest.mark.parametrize("value", [b"Bearer ", b"Bearer     ", b"Bearer \t "])
def test_a_blank_key_after_the_scheme_gets_401(secured, value):
    head = raw_request(secured, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + value + b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), head


# -- accepted ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(secured, key):
    models = httpx.get(f"{secured.url}/v1/models", headers=bearer(key), timeout=TIMEOUT)
    assert models.status_code == 200, models.text
    assert models.json()["data"][0]["id"] == "videollm"
    chat = httpx.post(f"{secured.url}/v1/chat/completions", json=TEXT_CHAT, headers=bearer(key), timeout=TIMEOUT)
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "chat.completion"
    assert isinstance(chat.json()["choices"][0]["message"]["content"], str)


def test_the_scheme_is_case_insensitive(secured):
    response = httpx.get(f"{secured.url}/v1/models", headers={"Authorization": f"bearer {KEYS[1]}"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


def test_a_video_chat_with_a_key(secured, clean_redis):
    body = video_chat(data_url(make_video("mp4", n_frames=8, seed=61)), videollm={"num_frames": 2}, max_tokens=4)
    response = httpx.post(f"{secured.url}/v1/chat/completions", json=body, headers=bearer(KEYS[2]), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.json()["videollm"]["frames"] == 2


def test_errors_behind_the_key_keep_their_own_status(secured):
    response = httpx.post(f"{secured.url}/v1/chat/completions", json={**TEXT_CHAT, "model": "other"},
                          headers=bearer(KEYS[0]), timeout=TIMEOUT)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_health_ready_and_metrics_need_no_key(secured):
    assert httpx.get(f"{secured.url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    ready = httpx.get(f"{secured.url}/ready", timeout=TIMEOUT)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    metrics = httpx.get(f"{secured.url}/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200 and "videollm_requests" in metrics.text
    # the rest is closed by default, the API description included
    assert_unauthorized(httpx.get(f"{secured.url}/openapi.json", timeout=TIMEOUT))
    assert httpx.get(f"{secured.url}/openapi.json", headers=bearer(KEYS[0]), timeout=TIMEOUT).status_code == 200


def test_the_openai_client_with_a_key(secured):
    with openai.OpenAI(base_url=secured.url + "/v1", api_key=KEYS[1], timeout=TIMEOUT, max_retries=0) as client:
        assert [m.id for m in client.models.list()][0] == "videollm"
        completion = client.chat.completions.create(model="videollm", messages=TEXT_CHAT["messages"], max_tokens=4)
        assert completion.choices[0].message.content is not None
        stream = client.chat.completions.create(model="videollm", messages=TEXT_CHAT["messages"], max_tokens=4,
                                                stream=True)
        assert [chunk.id for chunk in stream]


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(secured):
    with openai.OpenAI(base_url=secured.url + "/v1", api_key="sk-wrong", timeout=TIMEOUT, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as raised:
            client.chat.completions.create(model="videollm", messages=TEXT_CHAT["messages"], max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(raised.value)


def test_the_default_gateway_needs_no_key(gateway):
    assert not gateway.settings.api_keys
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=TEXT_CHAT, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


# -- configuration ----------------------------------------------------------------------------------

def test_keys_come_from_the_environment_comma_separated_or_json(monkeypatch):
    monkeypatch.setenv("VIDEOLLM_GATEWAY_API_KEYS", " a1 , b2,, ")
    assert GatewaySettings().api_keys == ["a1", "b2"]
    monkeypatch.setenv("VIDEOLLM_GATEWAY_API_KEYS", '["x,y", "z"]')
    assert GatewaySettings().api_keys == ["x,y", "z"]
    monkeypatch.setenv("VIDEOLLM_GATEWAY_API_KEYS", "")
    assert GatewaySettings().api_keys == []
    monkeypatch.delenv("VIDEOLLM_GATEWAY_API_KEYS")
    assert GatewaySettings().api_keys == []


def gateway_command_settings(args) -> GatewaySettings:
    """What `videollm gateway` (videollm/cli.py) makes of its flags."""
    return service_settings("gateway", args)


def serve_settings(args) -> GatewaySettings:
    """What `videollm serve` (videollm/stack.py) makes of its flags."""
    return GatewaySettings(**given_values(args, serve_flags(), owner="gateway"))


@pytest.mark.parametrize("command, to_settings", [("gateway", gateway_command_settings), ("serve", serve_settings)])
def test_the_api_keys_flag(command, to_settings, monkeypatch):
    monkeypatch.setenv("VIDEOLLM_GATEWAY_API_KEYS", "from-env")
    args = build_parser().parse_args([command, "--api-keys", "k1,k2"])
    assert args.api_keys == ["k1", "k2"]  # list flags are split as they are parsed (videollm/flags.py)
    assert to_settings(args).api_keys == ["k1", "k2"]  # the flag wins over the environment
    assert to_settings(build_parser().parse_args([command])).api_keys == ["from-env"]


@pytest.mark.parametrize("bad", ['["ok-secret", ""]', '["ok-secret", "has space secret"]',
                                 '["ok-secret", "tab\\tsecret"]', '["ok-secret", "caf\\u00e9-secret"]'])
def test_a_bad_key_is_refused_without_echoing_it(bad, monkeypatch):
    monkeypatch.setenv("VIDEOLLM_GATEWAY_API_KEYS", bad)
    with pytest.raises(ValueError) as raised:
        GatewaySettings()
    assert "API key #2" in str(raised.value)
    assert "secret" not in str(raised.value)


def test_keys_are_not_in_the_settings_repr():
    settings = GatewaySettings(api_keys="secret-one,secret-two")
    assert "secret" not in repr(settings) and "secret" not in str(settings)

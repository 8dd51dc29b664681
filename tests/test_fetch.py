"""http(s) video URLs: off by default; when on, never towards private addresses unless allowed."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from conftest import GatewayServer, gateway_settings
from helpers import data_url, video_chat
from videos import make_video

VIDEO = make_video("mp4", seed=101)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/video.mp4":
            self._send(VIDEO)
        elif self.path == "/big.mp4":
            self._send(b"\0" * (9 << 20))
        elif self.path == "/big-chunked.mp4":
            self.send_response(200)
            self.end_headers()  # no content-length: the size is only known while reading
            for _ in range(10):
                self.wfile.write(b"\0" * (1 << 20))
        elif self.path == "/slow.mp4":
            time.sleep(3)
            self._send(VIDEO)
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.255.255.1/video.mp4")
            self.end_headers()
        elif self.path == "/to-video":
            self.send_response(302)
            self.send_header("Location", "/video.mp4")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def ask(gateway_url: str, video_url: str) -> httpx.Response:
    body = video_chat(video_url, max_tokens=4, videollm={"num_frames": 2})
    return httpx.post(f"{gateway_url}/v1/chat/completions", json=body, timeout=120)


@pytest.fixture(scope="module")
def fetching_gateway(encoder_service, llm_service, redis_server):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                fetch_urls=True, fetch_allow=["127.0.0.0/8"], fetch_timeout_s=1.5,
                                max_inline_bytes=8 << 20)  # a fetched video is held in memory, as an inline one
    with GatewayServer(settings) as server:
        yield server


@pytest.fixture(scope="module")
def strict_gateway(encoder_service, llm_service, redis_server):
    settings = gateway_settings([encoder_service.address], [llm_service.address], redis_server.url, fetch_urls=True)
    with GatewayServer(settings) as server:
        yield server


def test_urls_are_refused_unless_enabled(gateway, origin):
    response = ask(gateway.url, f"{origin}/video.mp4")
    assert response.status_code == 400 and "disabled" in response.json()["error"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "10.255.255.1", "169.254.169.254",
                                  "192.168.0.1", "0.0.0.0"])
def test_private_and_loopback_addresses_are_refused_without_an_allow_list(strict_gateway, host):
    response = ask(strict_gateway.url, f"http://{host}:9/video.mp4")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "video_url_refused"


def test_an_allowed_origin_serves_the_video_and_the_cache_sees_the_same_bytes(fetching_gateway, origin, clean_redis):
    fetched = ask(fetching_gateway.url, f"{origin}/video.mp4")
    assert fetched.status_code == 200, fetched.text
    assert fetched.headers["x-videollm-cache"] == "miss"
    inline = ask(fetching_gateway.url, data_url(VIDEO))
    assert inline.headers["x-videollm-cache"] == "hit"  # same bytes, same key
    assert ask(fetching_gateway.url, f"{origin}/to-video").status_code == 200  # a redirect inside the allow-list


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/big.mp4", 413, "video_too_large"),
    ("/big-chunked.mp4", 413, "video_too_large"),
    ("/slow.mp4", 504, "fetch_timeout"),
    ("/to-private", 400, "video_url_refused"),
    ("/missing.mp4", 400, "invalid_value"),
])
def test_size_time_redirect_and_status_limits(fetching_gateway, origin, path, status, code):
    response = ask(fetching_gateway.url, f"{origin}{path}")
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_urls_with_credentials_or_other_schemes_are_refused(fetching_gateway, origin):
    for url in (f"http://user:secret@{origin[7:]}/video.mp4", "ftp://127.0.0.1/video.mp4"):
        response = ask(fetching_gateway.url, url)
        assert response.status_code == 400, url
        assert "secret" not in response.text
    # file URLs are off unless the operator names roots (tests/test_evaluation_api.py)
    response = ask(fetching_gateway.url, "file:///etc/passwd")
    assert response.status_code == 403 and response.json()["error"]["code"] == "file_url_not_allowed"

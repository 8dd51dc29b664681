"""Shared fixtures: the tiny model (built once), a real Redis, real gRPC servers and a real HTTP
gateway, all on 127.0.0.1 with free ports, always stopped at the end.

Redis must be installed (`.ci/run` installs it); a missing redis-server fails the run loudly
rather than skipping tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from encoder_service.engine import EncoderEngine  # noqa: E402
from encoder_service.server import start as start_encoder  # noqa: E402
from gateway.app import create_app  # noqa: E402
from llm_service.engine import LLMEngine  # noqa: E402
from llm_service.server import start as start_llm  # noqa: E402
from videollm.settings import EncoderSettings, GatewaySettings, LLMSettings  # noqa: E402
from videollm.tiny_model import build_tiny_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def video_store_dir(tmp_path_factory) -> Path:
    """The video store of every gateway and encoder the tests start (in this process or as children),
    instead of the default under the user's cache directory: one directory, as on one host."""
    directory = tmp_path_factory.mktemp("video-store")
    saved = {name: os.environ.get(name) for name in STORE_VARIABLES}
    os.environ.update(dict.fromkeys(STORE_VARIABLES, str(directory)))
    yield directory
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


STORE_VARIABLES = ("VIDEOLLM_GATEWAY_VIDEO_STORE_DIR", "VIDEOLLM_ENCODER_VIDEO_STORE_DIR")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen
    workdir: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.ping()
            return process
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = start_redis(port, workdir)
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, process, workdir)
    yield server
    server.process.terminate()
    server.process.wait(10)


@dataclass
class GrpcService:
    address: str
    engine: object
    server: object


@contextlib.contextmanager
def running_encoder(settings: EncoderSettings):
    """An encoder service of its own on loopback (settings.port 0: any free port), stopped after."""
    engine = EncoderEngine(settings)
    server, _, port = start_encoder(settings, engine)
    try:
        yield GrpcService(f"127.0.0.1:{port}", engine, server)
    finally:
        server.stop(None)
        engine.close()


@pytest.fixture(scope="session")
def encoder_service(tiny_model_dir):
    with running_encoder(EncoderSettings(model=tiny_model_dir, port=0, max_frames=64)) as service:
        yield service


@contextlib.contextmanager
def running_llm(settings: LLMSettings):
    """An LLM service of its own on loopback (settings.port 0: any free port), stopped after."""
    engine = LLMEngine(settings)
    server, _, port = start_llm(settings, engine)
    try:
        yield GrpcService(f"127.0.0.1:{port}", engine, server)
    finally:
        server.stop(None)


@pytest.fixture(scope="session")
def llm_service(tiny_model_dir):
    with running_llm(LLMSettings(model=tiny_model_dir, port=0)) as service:
        yield service


LIVE_GATEWAYS: set[GatewayServer] = set()


class GatewayServer:
    """A real uvicorn server in a background thread."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def cache_writes_pending(self) -> int:
        runtime = self.app.state.runtime
        return runtime.pipeline.cache.writes_pending if hasattr(runtime, "pipeline") else 0

    def __enter__(self) -> GatewayServer:
        LIVE_GATEWAYS.add(self)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        LIVE_GATEWAYS.discard(self)


def gateway_settings(encoders: list[str], llms: list[str], redis_url: str | None, **overrides) -> GatewaySettings:
    return GatewaySettings(host="127.0.0.1", port=free_port(), encoders=encoders, llms=llms, redis_url=redis_url,
                           **overrides)


def stack_gateway(encoder_service, llm_service, redis_server) -> GatewayServer:
    """A gateway in front of the session's encoder, LLM and Redis (a `with` block runs it)."""
    return GatewayServer(gateway_settings([encoder_service.address], [llm_service.address], redis_server.url,
                                          max_upload_bytes=8 << 20, max_inline_bytes=8 << 20))


@pytest.fixture(scope="session")
def gateway(encoder_service, llm_service, redis_server):
    """The whole stack: gateway -> encoder + LLM, with the session's Redis."""
    with stack_gateway(encoder_service, llm_service, redis_server) as server:
        yield server


@pytest.fixture
def clean_redis(redis_server):
    # an earlier test's answer may still be writing its tokens to Redis in the background
    deadline = time.monotonic() + 10
    while any(gateway.cache_writes_pending() for gateway in list(LIVE_GATEWAYS)) and time.monotonic() < deadline:
        time.sleep(0.01)
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()

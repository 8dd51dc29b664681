"""`videollm serve`: the whole local stack as child processes, started in order and stopped together.

Redis comes from REDIS_URL (or --redis-url) when given, otherwise a private `redis-server` on a
free loopback port. The encoder and LLM listen on free loopback ports; the gateway on --host/--port.
Ctrl-C or SIGTERM stops the gateway first (it drains), then the services, then Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from videollm.flags import SERVICES, given_values, is_settings_object, serve_flags
from videollm.settings import GatewaySettings, default_model_dir


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_grpc(address: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the service for {address} exited with code {process.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"the service at {address} did not become healthy within {timeout_s:.0f} s")


def wait_for_tcp(host: str, port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process for {host}:{port} exited with code {process.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout_s:.0f} s")


def ensure_model(model: Path | None) -> Path:
    if model is not None:
        return model
    path = default_model_dir()
    if not (path / "config.json").is_file():
        from videollm.tiny_model import build_tiny_model

        print(f"building the embedded default model in {path} (first run only)", flush=True)
        build_tiny_model(path)
    return path


class Stack:
    def __init__(self):
        self.children: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(argv, **kwargs)
        self.children.append((name, process))
        return process

    def stop(self) -> None:
        for name, process in reversed(self.children):  # gateway first, Redis last
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in 30 s; killing it", file=sys.stderr)
                    process.kill()
                    process.wait()

    def first_exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None


def child_environment(service: str, values: dict) -> dict[str, str]:
    """Settings as the service's environment variables (its prefix, nested fields joined by "__"):
    how `serve` hands each child its flags, which also keeps secrets such as API keys out of `ps`."""

    fields = SERVICES[service].model_fields

    def pairs(key: str, value, nested: bool) -> list[tuple[str, str]]:
        if isinstance(value, dict) and nested:  # a nested settings object: a variable per field
            return [pair for name, item in value.items() for pair in pairs(f"{key}__{name.upper()}", item, True)]
        return [(key, json.dumps(value) if isinstance(value, (list, dict, bool)) else str(value))]

    prefix = SERVICES[service].model_config["env_prefix"]
    return dict(pair for name, value in values.items()
                for pair in pairs(prefix + name.upper(), value, is_settings_object(fields[name].annotation)))


def spawn_service(stack: Stack, python: list[str], service: str, values: dict) -> subprocess.Popen:
    env = {**os.environ, **child_environment(service, values)}
    env.pop("REDIS_URL", None)  # it would win over the gateway's VIDEOLLM_GATEWAY_REDIS_URL
    return stack.spawn(service, [*python, service], env=env)


def run_stack(args) -> int:
    flags = serve_flags()
    given = {service: given_values(args, flags, owner=service) for service in SERVICES}
    # validated here, so a bad flag fails before any child starts
    gateway = GatewaySettings(**given["gateway"])
    for service in ("encoder", "llm"):
        SERVICES[service](**given[service])
    model = ensure_model(given["encoder"].get("model"))
    given["encoder"]["model"] = given["llm"]["model"] = model
    # the encoder maps uploads from the gateway's video store: the gateway's directory as resolved here
    # (flag, VIDEOLLM_GATEWAY_VIDEO_STORE_DIR or the default), so the two cannot drift apart
    given["encoder"].setdefault("video_store_dir", gateway.video_store_dir)
    stack = Stack()
    stopping = serving = False

    def on_signal(*_):
        nonlocal stopping
        stopping = True
        if not serving:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    python = [sys.executable, "-m", "videollm.cli", "--log-level", args.log_level]
    try:
        redis_url = gateway.redis_url
        if not redis_url:
            binary = shutil.which("redis-server")
            if binary is None:
                print("redis-server is not installed: install it (apt-get install redis-server) "
                      "or set REDIS_URL to a running Redis", file=sys.stderr)
                return 2
            redis_port = free_port()
            workdir = tempfile.mkdtemp(prefix="videollm-redis-")
            redis = stack.spawn("redis", [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL)
            wait_for_tcp("127.0.0.1", redis_port, redis, 10)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"

        encoder_port, llm_port = free_port(), free_port()
        metrics = {"encoder": free_port(), "llm": free_port()}
        children = {
            "encoder": {**given["encoder"], "host": "127.0.0.1", "port": encoder_port,
                        "metrics_port": metrics["encoder"]},
            "llm": {**given["llm"], "host": "127.0.0.1", "port": llm_port, "metrics_port": metrics["llm"]},
            "gateway": {**given["gateway"], "redis_url": redis_url,
                        "encoders": [f"127.0.0.1:{encoder_port}"], "llms": [f"127.0.0.1:{llm_port}"]},
        }
        encoder = spawn_service(stack, python, "encoder", children["encoder"])
        llm = spawn_service(stack, python, "llm", children["llm"])
        wait_for_grpc(f"127.0.0.1:{encoder_port}", encoder, 600)
        wait_for_grpc(f"127.0.0.1:{llm_port}", llm, 600)
        process = spawn_service(stack, python, "gateway", children["gateway"])
        wait_for_tcp(gateway.host, gateway.port, process, 60)
        serving = True
        print(f"videollm is serving on http://{gateway.host}:{gateway.port}  (model {model}, "
              f"Redis {redis_url}; metrics of the encoder and the LLM at http://127.0.0.1:{metrics['encoder']}/metrics "
              f"and http://127.0.0.1:{metrics['llm']}/metrics); Ctrl-C stops it", flush=True)
        while not stopping:
            exited = stack.first_exited()
            if exited is not None:
                print(f"{exited[0]} exited with code {exited[1]}; stopping the stack", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as err:
        print(f"videollm serve failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stack.stop()

"""The real stack for a benchmark: Redis, encoder and LLM replicas on chosen GPUs, the gateway.

Each service is its own process (`videollm encoder|llm|gateway`), placed on a GPU through
CUDA_VISIBLE_DEVICES, exactly as a deployment would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from videollm.stack import Stack, free_port, wait_for_grpc, wait_for_tcp


@dataclass
class Placement:
    """Which GPU each replica uses: one entry per replica ("" = CPU)."""

    encoders: list[str] = field(default_factory=lambda: ["0"])
    llms: list[str] = field(default_factory=lambda: ["0"])

    @staticmethod
    def parse(text: str) -> list[str]:
        return [part.strip() for part in text.split(",")]

    def describe(self) -> str:
        return f"encoders on GPU {','.join(self.encoders)}; LLMs on GPU {','.join(self.llms)}"


@dataclass
class RunningStack:
    url: str
    redis_url: str
    encoder_addresses: list[str]
    llm_addresses: list[str]
    stack: Stack

    def stop(self) -> None:
        self.stack.stop()


def start_stack(model: Path, placement: Placement, device: str, redis_server: str, log_dir: Path,
                max_concurrent: int = 128, *, max_upload_bytes: int = 1 << 30, encoder_args: Sequence[str] = (),
                env: dict[str, str] | None = None) -> RunningStack:
    """encoder_args: more flags for each encoder; env: more environment variables for every service
    (e.g. the video store's directory, which the gateway and the encoders must share)."""
    stack = Stack()
    base_env = {**os.environ, **(env or {})}
    python = [sys.executable, "-m", "videollm.cli", "--log-level", "WARNING"]
    try:
        redis_port = free_port()
        redis = stack.spawn("redis", [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL)
        wait_for_tcp("127.0.0.1", redis_port, redis, 20)
        addresses = {"encoder": [], "llm": []}
        for kind, gpus in (("encoder", placement.encoders), ("llm", placement.llms)):
            for replica, gpu in enumerate(gpus):
                port = free_port()
                service_env = {**base_env, "CUDA_VISIBLE_DEVICES": gpu}
                service_device = device if gpu != "" else "cpu"
                log = open(log_dir / f"{kind}{replica}.log", "w")
                # no metrics ports: several replicas on one host would race for one
                process = stack.spawn(kind, [*python, kind, "--model", str(model), "--port", str(port),
                                             "--metrics-port", "0",
                                             "--device", service_device, "--max-concurrent", str(max_concurrent),
                                             *(encoder_args if kind == "encoder" else ())],
                                      env=service_env, stdout=log, stderr=subprocess.STDOUT)
                addresses[kind].append((f"127.0.0.1:{port}", process))
        for kind in addresses:
            for address, process in addresses[kind]:
                wait_for_grpc(address, process, 900)
        port = free_port()
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        gateway_env = {**base_env, "REDIS_URL": redis_url, "VIDEOLLM_GATEWAY_MAX_UPLOAD_BYTES": str(max_upload_bytes)}
        log = open(log_dir / "gateway.log", "w")
        gateway = stack.spawn("gateway", [
            *python, "gateway", "--port", str(port),
            "--encoders", ",".join(a for a, _ in addresses["encoder"]),
            "--llms", ",".join(a for a, _ in addresses["llm"]),
        ], env=gateway_env, stdout=log, stderr=subprocess.STDOUT)
        wait_for_tcp("127.0.0.1", port, gateway, 60)
    except BaseException:
        stack.stop()
        raise
    return RunningStack(f"http://127.0.0.1:{port}", redis_url, [a for a, _ in addresses["encoder"]],
                        [a for a, _ in addresses["llm"]], stack)

"""Services as subprocesses on 127.0.0.1, as `videollm serve` and a deployment run them: encoder and
LLM replicas (`python -m videollm.cli encoder|llm --model DIR --port P`) and gateways
(`python -m videollm.cli gateway ...`), for the tests that kill, stop or add processes."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc
from videollm.stack import wait_for_grpc

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 240  # several replicas load torch at once on a 2-core CI machine


@dataclass
class Replica:
    kind: str  # "encoder" | "llm"
    address: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no drain, no goodbye."""
        self.process.kill()
        self.process.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def info(self):
        with grpc.insecure_channel(self.address) as channel:
            if self.kind == "encoder":
                return encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest(), timeout=10)
            return llm_pb2_grpc.LLMStub(channel).Info(llm_pb2.LLMInfoRequest(), timeout=10)

    def serving(self) -> bool:
        try:
            with grpc.insecure_channel(self.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def run_cli(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m videollm.cli ARGS` with its output in `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "videollm.cli", "--log-level", "INFO", *args],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)


# the service's own line once it listens (videollm/grpc_server.py start_service)
LISTENING = re.compile(r" serving .* on 127\.0\.0\.1:(\d+)")
_SPAWNED = itertools.count()  # names the processes' logs


def spawn(kind: str, model_dir: Path, log_dir: Path) -> Replica:
    """A replica on a port of its own choosing (port 0: no other process can take a port picked
    for it before it binds); its address is known once it says where it listens (started())."""
    log = log_dir / f"{kind}-{next(_SPAWNED)}.log"
    process = run_cli([kind, "--model", str(model_dir), "--port", "0"], log)
    return Replica(kind, "", process, log)


def started(replica: Replica, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait for the replica to say where it listens, then for it to answer there."""
    deadline = time.monotonic() + timeout_s
    while not replica.address:
        found = LISTENING.search(replica.log_tail(100_000))
        if found:
            replica.address = f"127.0.0.1:{found.group(1)}"
        elif not replica.alive() or time.monotonic() > deadline:
            pytest.fail(f"{replica.kind} did not start: {replica.log_tail()}")
        else:
            time.sleep(0.1)
    try:
        wait_for_grpc(replica.address, replica.process, max(1.0, deadline - time.monotonic()))
    except RuntimeError as err:
        pytest.fail(f"{replica.kind} at {replica.address} did not start: {err}\n{replica.log_tail()}")


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """kill -9: no drain, no lock released, nothing written after."""
        self.process.kill()
        self.process.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def spawn_gateway(log_dir: Path, *args: str) -> GatewayProcess:
    """A gateway process on a port of its own choosing (`args`: its other flags), once /health answers."""
    log = log_dir / f"gateway-{next(_SPAWNED)}.log"
    gateway = GatewayProcess("", run_cli(["gateway", "--port", "0", *args], log), log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(f"the gateway exited with {gateway.process.returncode}:\n{gateway.log_tail()}")
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", gateway.log_tail(100_000))
        if found:
            gateway.url = found.group(1)
            try:
                if httpx.get(f"{gateway.url}/health", timeout=1).status_code == 200:
                    return gateway
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    gateway.kill()
    pytest.fail(f"the gateway did not start within {START_TIMEOUT_S} s:\n{gateway.log_tail()}")


class ReplicaPool:
    """Replicas started in parallel (loading torch dominates); tests take them and kill what they took."""

    def __init__(self, model_dir: Path, log_dir: Path):
        self.model_dir, self.log_dir = model_dir, log_dir
        self.spare: list[Replica] = []
        self.everything: list[Replica] = []

    def start(self, kinds: list[str]) -> None:
        fresh = [spawn(kind, self.model_dir, self.log_dir) for kind in kinds]
        self.everything += fresh
        for replica in fresh:
            started(replica)
        self.spare += fresh

    def take(self, kind: str, count: int = 1) -> list[Replica]:
        alive = [r for r in self.spare if r.kind == kind and r.alive()]
        if len(alive) < count:
            self.start([kind] * (count - len(alive)))
            alive = [r for r in self.spare if r.kind == kind and r.alive()]
        taken = alive[:count]
        self.spare = [r for r in self.spare if r not in taken]
        return taken

    def give_back(self, replica: Replica) -> None:
        if replica.alive() and replica.serving():
            self.spare.append(replica)

    def stop_all(self) -> None:
        for replica in self.everything:
            if replica.alive():
                replica.process.kill()
        for replica in self.everything:
            replica.process.wait(10)



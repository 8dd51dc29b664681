"""Discovery and the processes that come and go: the gateway resolves encoder and LLM names itself
(one replica per address), an encoder or LLM process started later gets calls within seconds, one
stopped gets none without a failed request, and a gateway killed with -9 loses only its own
requests and leaves no lock behind for longer than its TTL (real processes, Redis and servers on
127.0.0.1).

On loopback every replica is a port of 127.0.0.1, so one name cannot stand for several of them in
DNS; the tests that add and remove processes give the gateway a resolver that answers from a table
they change, as a cluster's DNS answers for a headless Service while pods come and go. The DNS
resolver itself is checked against this machine's own answer for localhost.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import GatewayServer, gateway_settings
from gateway.app import create_app
from gateway.backends import ReplicaPool as Replicas
from gateway.discovery import Target, resolve_dns
from gateway.shared_flight import LOCK_TTL_MS, lock_key
from helpers import data_url, video_chat
from processes import ReplicaPool, spawn_gateway
from videos import make_video


# -- addresses and names -------------------------------------------------------------------------


@pytest.mark.parametrize("text, target", [
    ("127.0.0.1:50051", Target("127.0.0.1", 50051)),
    ("dns:///encoder:50051", Target("encoder", 50051)),
    ("llm.videollm.svc.cluster.local:50052", Target("llm.videollm.svc.cluster.local", 50052)),
    ("[::1]:50052", Target("::1", 50052)),
])
def test_an_address_is_a_name_or_an_ip_and_a_port(text, target):
    assert Target.parse(text) == target
    assert (target.literal is None) == (target.host[0].isalpha())


@pytest.mark.parametrize("text, words", [
    ("encoder", "not host:port"),
    ("encoder:http", "not host:port"),
    ("encoder:0", "not host:port"),
    (":50051", "not host:port"),
    ("http://encoder:50051", "only scheme understood is dns:///"),
])
def test_a_bad_address_stops_the_gateway_before_it_serves(text, words):
    with pytest.raises(ValueError, match=words):
        create_app(gateway_settings([text], ["127.0.0.1:50052"], None))


def test_a_name_resolves_to_its_ipv4_addresses():
    assert asyncio.run(resolve_dns("localhost", 50051)) == ["127.0.0.1:50051"]


def test_a_gateway_given_names_calls_each_address_behind_them(encoder_service, llm_service):
    encoder_port, llm_port = encoder_service.address.rsplit(":", 1)[1], llm_service.address.rsplit(":", 1)[1]
    settings = gateway_settings([f"dns:///localhost:{encoder_port}"], [f"localhost:{llm_port}"], None)
    with GatewayServer(settings) as gateway:
        ready = httpx.get(f"{gateway.url}/ready", timeout=30).json()
        assert ready["encoders"] == {encoder_service.address: True}  # the address, not the name
        assert ready["llms"] == {llm_service.address: True}
        body = video_chat(data_url(make_video("mp4", seed=801, n_frames=12)), videollm={"num_frames": 2},
                          max_tokens=4)
        answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text


# -- processes that come and go ------------------------------------------------------------------


class LoopbackNames:
    """The names' answers, as a cluster's DNS gives them for headless Services: the addresses of the
    replicas that are up. An unknown name fails as DNS does."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table

    async def resolve(self, host: str, port: int) -> list[str]:
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


class Load:
    """Questions about fresh videos (a miss each: an encode and a generation each), `workers` at a time,
    until stopped; every answer's status is kept."""

    def __init__(self, url: str, workers: int = 2):
        self.url, self.workers = url, workers
        self.statuses: list[tuple[float, int | str]] = []  # (finished at, status or error)
        self._seeds = iter(range(10_000, 20_000))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask, daemon=True) for _ in range(workers)]

    def _ask(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                with self._lock:
                    seed = next(self._seeds)
                body = video_chat(data_url(make_video("mp4", seed=seed, n_frames=8)), videollm={"num_frames": 2},
                                  max_tokens=3)
                try:
                    status = client.post(f"{self.url}/v1/chat/completions", json=body).status_code
                except httpx.HTTPError as err:
                    status = repr(err)
                self.statuses.append((time.monotonic(), status))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(150)

    def failed(self) -> list:
        return [s for s in self.statuses if s[1] != 200]

    def answered_after(self, moment: float) -> int:
        return sum(1 for at, status in self.statuses if at > moment and status == 200)


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` holds; fails the test after timeout_s."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def processes(tiny_model_dir, tmp_path_factory):
    pool = ReplicaPool(tiny_model_dir, tmp_path_factory.mktemp("discovery-logs"))
    try:
        yield pool
    finally:
        pool.stop_all()


def test_processes_started_later_get_calls_and_stopped_ones_get_none_without_failures(processes):
    (first_encoder,), (first_llm,) = processes.take("encoder"), processes.take("llm")
    names = LoopbackNames({"encoder.test": [first_encoder.address], "llm.test": [first_llm.address]})
    settings = gateway_settings(["dns:///encoder.test:50051"], ["dns:///llm.test:50052"], None,
                                resolve_interval_s=0.5)
    gateway = GatewayServer(settings)
    runtime = gateway.app.state.runtime
    runtime.resolve = names.resolve
    with gateway, Load(gateway.url) as load:
        wait_until(lambda: load.answered_after(0) >= 4, 120, "answers from the first replicas")
        # started now, while the load runs; listed once serving, as a pod's address is once it is ready
        (new_encoder,), (new_llm,) = processes.take("encoder"), processes.take("llm")
        names.table = {"encoder.test": [first_encoder.address, new_encoder.address],
                       "llm.test": [first_llm.address, new_llm.address]}
        took = wait_until(lambda: new_encoder.info().encodes_completed > 0 and new_llm.info().generations_completed > 0,
                          30, "the new encoder and LLM get calls")
        print(f"new replicas got their first calls {took:.2f} s after their addresses were listed")

        # stopped as Kubernetes stops a pod: SIGTERM (the process drains), and its address leaves
        # the name a moment later; the gateway must not send it calls that fail meanwhile
        for replica in (first_encoder, first_llm):
            replica.process.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        names.table = {"encoder.test": [new_encoder.address], "llm.test": [new_llm.address]}
        for replica in (first_encoder, first_llm):
            replica.process.wait(60)
        gone_at = time.monotonic()
        wait_until(lambda: load.answered_after(gone_at) >= 4, 120, "answers after the first replicas exited")
    assert [r.address for r in runtime.encoders.replicas] == [new_encoder.address]
    assert [r.address for r in runtime.llms.replicas] == [new_llm.address]
    assert load.failed() == [], load.failed()
    assert len(load.statuses) >= 8
    processes.give_back(new_encoder)
    processes.give_back(new_llm)


def test_a_gateway_killed_with_9_loses_only_its_own_requests_and_its_lock_expires(
        encoder_service, llm_service, redis_server, clean_redis, tmp_path):
    backends = ["--encoders", encoder_service.address, "--llms", llm_service.address,
                "--redis-url", redis_server.url]
    doomed = spawn_gateway(tmp_path, *backends)
    survivor = GatewayServer(gateway_settings([encoder_service.address], [llm_service.address], redis_server.url))
    # a video that takes a while to decode, so that the doomed gateway is killed while it holds the lock
    video = make_video("mp4", seed=802, n_frames=240, width=1280, height=720)
    body = video_chat(data_url(video), videollm={"num_frames": 32}, max_tokens=4)
    other = video_chat(data_url(make_video("mp4", seed=803, n_frames=12)), videollm={"num_frames": 2}, max_tokens=4)
    with survivor, ThreadPoolExecutor(8) as pool:
        doomed_answers = [pool.submit(httpx.post, f"{doomed.url}/v1/chat/completions", json=body, timeout=120)
                          for _ in range(2)]
        wait_until(lambda: clean_redis.keys("videollm:v1:encoding:*"), 60, "the doomed gateway takes the lock")
        (lock,) = clean_redis.keys("videollm:v1:encoding:*")
        # the same video through the survivor: it waits on the doomed gateway's lock
        waiting = [pool.submit(httpx.post, f"{survivor.url}/v1/chat/completions", json=body, timeout=120)
                   for _ in range(3)]
        unrelated = pool.submit(httpx.post, f"{survivor.url}/v1/chat/completions", json=other, timeout=120)
        time.sleep(0.3)
        assert clean_redis.exists(lock), "the doomed gateway finished before it was killed: give it a longer video"
        doomed.kill()
        left_ms = clean_redis.pttl(lock)
        assert 0 < left_ms <= LOCK_TTL_MS
        gone_after = wait_until(lambda: not clean_redis.exists(lock), LOCK_TTL_MS / 1000 + 5, "the lock expires")
        answers = [w.result() for w in waiting]
        lost = [f.exception() or f.result() for f in doomed_answers]
        unrelated_answer = unrelated.result()
    print(f"lock gone {gone_after:.2f} s after the kill ({left_ms} ms were left)")
    assert all(isinstance(outcome, httpx.HTTPError) for outcome in lost), lost  # only its own requests
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert unrelated_answer.status_code == 200, unrelated_answer.text
    assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
    # what the survivor cached is whole: the next question, through a gateway that never saw it, is a hit
    with GatewayServer(gateway_settings([encoder_service.address], [llm_service.address], redis_server.url)) as fresh:
        again = httpx.post(f"{fresh.url}/v1/chat/completions", json=body, timeout=120)
    assert again.status_code == 200 and again.headers["x-videollm-cache"] == "hit", again.text
    assert clean_redis.keys(lock_key("*")) == []


def test_ties_go_round_robin_over_the_replicas_after_some_are_gone():
    async def picks() -> list[str]:
        pool = Replicas("encoder", lambda channel: None, 1 << 20)
        pool.update({"10.0.0.1:1": "a", "10.0.0.2:1": "b", "10.0.0.3:1": "c"})
        pool.update({"10.0.0.1:1": "a", "10.0.0.3:1": "c"})  # b is gone
        chosen = [pool.pick().address for _ in range(4)]
        await pool.close()
        return chosen

    assert sorted(asyncio.run(picks())) == ["10.0.0.1:1", "10.0.0.1:1", "10.0.0.3:1", "10.0.0.3:1"]

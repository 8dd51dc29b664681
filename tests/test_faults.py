"""Faults with real processes on 127.0.0.1: replicas killed under load, Redis stopped and restarted,
damaged cache entries, clients that hang up mid-stream, and SIGTERM while an answer is generated.

Encoder and LLM replicas run as `python -m videollm.cli encoder|llm --model DIR --port P`
subprocesses (as `videollm serve` and a deployment run them); the gateway is a real uvicorn server
in a thread; Redis is a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass

import httpx
import pytest

from conftest import GatewayServer, free_port, gateway_settings, start_redis
from gateway.cache import MAGIC, EncodedVideo
from helpers import data_url, encoder_calls, video_chat
from processes import Replica, ReplicaPool
from videos import make_video

REQUEST_TIMEOUT_S = 90
DRAIN_GRACE_S = 30  # videollm.grpc_server.run_until_signalled's default
TOKEN_KEYS = "videollm:v1:tokens:*"


@pytest.fixture(scope="module")
def replicas(tiny_model_dir, tmp_path_factory):
    pool = ReplicaPool(tiny_model_dir, tmp_path_factory.mktemp("replica-logs"))
    try:
        # what the tests below use, started together: 2 encoders + 2 LLMs to kill under load, one
        # more LLM for the disconnect and SIGTERM tests
        pool.start(["encoder", "encoder", "llm", "llm", "llm"])
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, on a free port; (port, process) in a mutable holder."""
    port = free_port()
    holder = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "process": start_redis(port, tmp_path)}
    yield holder
    process = holder["process"]
    if process.poll() is None:
        process.terminate()
        process.wait(10)


# -- request helpers -----------------------------------------------------------------------------


def tiny_video_chat(seed: int) -> dict:
    return video_chat(data_url(make_video("mp4", n_frames=12, seed=seed)), videollm={"num_frames": 2}, max_tokens=4)


def text_chat(question: str = "Tell me a long story.", **fields) -> dict:
    body = {"model": "videollm", "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    body.update(fields)
    return body


@dataclass
class Result:
    index: int
    status: int | None  # None: no HTTP answer at all (connection error, timeout)
    cache: str | None
    detail: str
    started: float
    finished: float


async def post_one(client: httpx.AsyncClient, url: str, index: int, body: dict) -> Result:
    started = time.monotonic()
    try:
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        status, cache, detail = response.status_code, response.headers.get("x-videollm-cache"), response.text[:300]
    except httpx.HTTPError as err:
        status, cache, detail = None, None, repr(err)
    return Result(index, status, cache, detail, started, time.monotonic())


def errors(results) -> list[Result]:
    return [r for r in results if r.status != 200]


def describe(results) -> str:
    return "\n".join(f"#{r.index}: {r.status} {r.detail}" for r in results)


# -- (a) replicas killed under load --------------------------------------------------------------


def test_killing_one_encoder_and_one_llm_under_load_fails_no_request(replicas, own_redis):
    encoder1, encoder2 = replicas.take("encoder", 2)
    llm1, llm2 = replicas.take("llm", 2)
    requests, clients, kill_after = 24, 4, 6
    bodies = [tiny_video_chat(seed=9000 + i) for i in range(requests)]
    settings = gateway_settings([encoder1.address, encoder2.address], [llm1.address, llm2.address],
                                own_redis["url"])
    killed: dict[str, float | object] = {}

    async def traffic(url: str) -> list[Result]:
        queue = deque(enumerate(bodies))
        results: list[Result] = []

        async def client_loop(client: httpx.AsyncClient):
            while queue:
                index, body = queue.popleft()
                results.append(await post_one(client, url, index, body))
                if len(results) >= kill_after and "at" not in killed:
                    # both must have served before they die, or the kill proves nothing
                    killed["encoder_info"], killed["llm_info"] = encoder2.info(), llm2.info()
                    encoder2.kill()
                    llm2.kill()
                    killed["at"] = time.monotonic()

        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), 300)
        return results

    with GatewayServer(settings) as gateway:
        results = asyncio.run(traffic(gateway.url))
        assert len(results) == requests
        assert "at" in killed, "the replicas were never killed"
        assert killed["encoder_info"].encodes_completed > 0, "the killed encoder had served nothing"
        assert killed["llm_info"].generations_completed > 0, "the killed LLM had served nothing"
        after_kill = [r for r in results if r.started >= killed["at"]]
        assert len(after_kill) >= requests - kill_after - clients, "the kill came too late to test anything"
        failed = errors(results)
        assert failed == [], f"{len(failed)} requests failed although a replica of each kind was up:\n" + \
            describe(failed)

        ready = httpx.get(f"{gateway.url}/ready", timeout=10)
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["encoders"] == {encoder1.address: True, encoder2.address: False}
        assert ready.json()["llms"] == {llm1.address: True, llm2.address: False}

        # both encoders down: a new video is a 503, a cached one is still answered (no encoder needed)
        encoder1.kill()
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=tiny_video_chat(seed=9999),
                              timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 503, response.text
        assert "encoder" in response.json()["error"]["message"]
        assert response.headers["retry-after"] == "1"
        cached = httpx.post(f"{gateway.url}/v1/chat/completions", json=bodies[0], timeout=REQUEST_TIMEOUT_S)
        assert cached.status_code == 200, cached.text
        assert cached.headers["x-videollm-cache"] == "hit"
        assert httpx.get(f"{gateway.url}/ready", timeout=10).status_code == 503

        # both LLMs down as well: even a text-only chat is a 503
        llm1.kill()
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=text_chat(), timeout=REQUEST_TIMEOUT_S)
        assert response.status_code == 503, response.text
        assert "LLM" in response.json()["error"]["message"]
        assert response.json()["error"]["code"] == "backend_unavailable"


# -- (b) Redis stopped under traffic and restarted -----------------------------------------------


def test_redis_stopped_under_traffic_degrades_to_misses_and_the_cache_returns(encoder_service, llm_service,
                                                                               own_redis, tmp_path):
    settings = gateway_settings([encoder_service.address], [llm_service.address], own_redis["url"])
    warm = tiny_video_chat(seed=9100)
    traffic_bodies = [warm] + [tiny_video_chat(seed=9101 + i) for i in range(3)]
    marks: dict[str, float] = {}

    async def scenario(url: str) -> tuple[list[Result], dict]:
        results: list[Result] = []
        seen: dict = {}
        stop = asyncio.Event()

        async def client_loop(client: httpx.AsyncClient, offset: int):
            count = 0
            while not stop.is_set():
                index = offset + 2 * count
                results.append(await post_one(client, url, index, traffic_bodies[index % len(traffic_bodies)]))
                count += 1

        async def completed_since(mark: float, count: int, timeout_s: float = 60) -> None:
            deadline = time.monotonic() + timeout_s
            while sum(r.started >= mark for r in results) < count:
                assert time.monotonic() < deadline, "the traffic stalled"
                await asyncio.sleep(0.05)

        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            first = await post_one(client, url, -1, warm)
            again = await post_one(client, url, -2, warm)
            seen["warm"] = (first.status, first.cache, again.status, again.cache)
            loops = [asyncio.create_task(client_loop(client, offset)) for offset in (0, 1)]
            marks["start"] = time.monotonic()
            await completed_since(marks["start"], 2)

            own_redis["process"].kill()  # Redis dies under traffic
            own_redis["process"].wait(10)
            marks["down"] = time.monotonic()
            await completed_since(marks["down"], 6)
            ready = await client.get(f"{url}/ready")
            seen["ready_down"] = (ready.status_code, ready.json())

            own_redis["process"] = await asyncio.to_thread(start_redis, own_redis["port"], tmp_path)
            marks["up"] = time.monotonic()
            await completed_since(marks["up"], 2)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*loops), REQUEST_TIMEOUT_S)

            fresh = tiny_video_chat(seed=9200)
            seen["after"] = [(r.status, r.cache) for r in [await post_one(client, url, -3, fresh),
                                                           await post_one(client, url, -4, fresh)]]
            ready = await client.get(f"{url}/ready")
            seen["ready_up"] = (ready.status_code, ready.json())
        return results, seen

    with GatewayServer(settings) as gateway:
        results, seen = asyncio.run(scenario(gateway.url))

    assert seen["warm"] == (200, "miss", 200, "hit")
    failed = errors(results)
    assert failed == [], "requests failed while Redis was down or coming back:\n" + describe(failed)
    while_down = [r for r in results if r.started >= marks["down"] and r.finished <= marks["up"]]
    assert len(while_down) >= 4
    assert {r.cache for r in while_down} == {"miss"}, [(r.index, r.cache) for r in while_down]
    # the warm video was cached before the outage: while Redis is down it is a miss like any other
    assert any(r.index % len(traffic_bodies) == 0 for r in while_down)
    status, body = seen["ready_down"]
    assert status == 200 and body["status"] == "degraded" and body["redis"] == "unavailable", body
    assert seen["after"] == [(200, "miss"), (200, "hit")]  # the restarted Redis caches again
    status, body = seen["ready_up"]
    assert status == 200 and body["status"] == "ready" and body["redis"] == "ok", body


# -- (c) damaged entries, truncated before or inside the header ----------------------------------


def _header_length(entry: bytes) -> int:
    return int.from_bytes(entry[len(MAGIC) : len(MAGIC) + 4], "little")


TRUNCATIONS = {
    # test_cache.py covers a flipped payload byte, a value cut in half and b"garbage"
    "shorter than the magic": lambda good: good[: len(MAGIC) - 3],
    "the magic alone": lambda good: good[: len(MAGIC)],
    "magic and a partial length": lambda good: good[: len(MAGIC) + 2],
    "magic and length, no header": lambda good: good[: len(MAGIC) + 4],
    # dropping the last byte of a protobuf message always cuts its last field: never parses
    "header missing its last byte": lambda good: good[: len(MAGIC) + 4 + _header_length(good) - 1],
    "header complete, no payload": lambda good: good[: len(MAGIC) + 4 + _header_length(good)],
    "empty value": lambda good: b"",
}


@pytest.mark.parametrize("damage", list(TRUNCATIONS))
def test_a_truncated_entry_is_a_miss_and_is_replaced(gateway, encoder_service, clean_redis, damage):
    body = video_chat(data_url(make_video("mp4", n_frames=12, seed=9300)), videollm={"num_frames": 2}, max_tokens=4)
    first = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert first.status_code == 200, first.text
    (key,) = clean_redis.keys(TOKEN_KEYS)
    good = clean_redis.get(key)
    bad = TRUNCATIONS[damage](good)
    assert len(bad) < len(good)
    clean_redis.set(key, bad)

    before = encoder_calls(encoder_service)
    again = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert again.status_code == 200, again.text
    assert again.headers["x-videollm-cache"] == "miss"
    assert encoder_calls(encoder_service) == before + 1
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    stored = clean_redis.get(key)  # replaced by a verified entry
    assert stored is not None and len(stored) == len(good)
    assert EncodedVideo.from_bytes(stored).payload == EncodedVideo.from_bytes(good).payload
    hit = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    assert hit.status_code == 200 and hit.headers["x-videollm-cache"] == "hit"


# -- (d) a streaming client that hangs up stops the decoding -------------------------------------

LONG_ANSWER_TOKENS = 1500  # greedy decoding of text_chat() runs to max_tokens (no EOS) on the tiny model


def sse_payloads(lines):
    """The payloads of server-sent events as they arrive (a generator: reading stops when the caller stops)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def wait_for_generations(replica: Replica, count: int, timeout_s: float) -> float | None:
    """Seconds until the replica's Info reports `count` finished generations, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if replica.info().generations_completed >= count:
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_a_client_that_hangs_up_mid_stream_stops_the_llm_decoding(replicas):
    (llm,) = replicas.take("llm")
    settings = gateway_settings([f"127.0.0.1:{free_port()}"], [llm.address], None)  # text only: no encoder
    body = text_chat(max_tokens=LONG_ANSWER_TOKENS)
    try:
        with GatewayServer(settings) as gateway:
            # the same request run to its end: how long a decode that ignores the hang-up would take
            started = time.monotonic()
            whole = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S)
            full_s = time.monotonic() - started
            assert whole.status_code == 200, whole.text
            assert whole.json()["usage"]["completion_tokens"] == LONG_ANSWER_TOKENS
            assert whole.json()["choices"][0]["finish_reason"] == "length"

            completed = llm.info().generations_completed
            started = time.monotonic()
            streamed = {**body, "stream": True}
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
                with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=streamed) as response:
                    assert response.status_code == 200
                    for payload in sse_payloads(response.iter_lines()):
                        if payload != "[DONE]" and payload["choices"] and payload["choices"][0]["delta"].get("content"):
                            break  # hang up after the first content chunk
                    else:
                        pytest.fail("the stream ended before any content")
            hung_up_s = time.monotonic() - started  # the client and its connection are closed here
            assert hung_up_s < full_s / 3, f"hanging up took {hung_up_s:.2f} s: the stream was read to its end"
            freed_s = wait_for_generations(llm, completed + 1, timeout_s=full_s + 30)
            assert freed_s is not None, "the abandoned generation never ended"
            assert freed_s < full_s / 3, (
                f"the LLM went on decoding after the client left: it finished {freed_s:.2f} s after the hang-up; "
                f"the whole answer takes {full_s:.2f} s")
            # and it is free: a new request is not queued behind the abandoned one
            short = httpx.post(f"{gateway.url}/v1/chat/completions", json=text_chat(max_tokens=4),
                               timeout=REQUEST_TIMEOUT_S)
            assert short.status_code == 200, short.text
            assert short.json()["videollm"]["timings_ms"]["llm_queue"] < full_s * 1e3 / 3
    finally:
        replicas.give_back(llm)


# -- (e) SIGTERM while an answer is generated ----------------------------------------------------


def test_sigterm_lets_the_answer_in_flight_finish_then_the_llm_exits_cleanly(replicas):
    (llm,) = replicas.take("llm")
    max_tokens = 2000
    settings = gateway_settings([f"127.0.0.1:{free_port()}"], [llm.address], None)
    body = text_chat(max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    not_serving_at: list[float] = []
    stop_polling = threading.Event()

    def poll_health():
        while not stop_polling.is_set():
            if not llm.serving():
                not_serving_at.append(time.monotonic())
                return
            time.sleep(0.05)

    with GatewayServer(settings) as gateway:
        payloads, signalled_at, last_content_at = [], None, None
        poller = threading.Thread(target=poll_health, daemon=True)
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            with client.stream("POST", f"{gateway.url}/v1/chat/completions", json=body) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    payloads.append(payload)
                    if payload == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        last_content_at = time.monotonic()
                        if signalled_at is None:
                            assert llm.alive()
                            llm.process.send_signal(signal.SIGTERM)
                            signalled_at = time.monotonic()
                            poller.start()
        stop_polling.set()
        poller.join(5)
        ended_at = time.monotonic()

    assert signalled_at is not None, "no content arrived"
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
    finals = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == max_tokens  # the whole answer, not a cut one
    # the replica had begun shutting down (NOT_SERVING / refusing calls) while the answer still streamed
    assert not_serving_at, "the replica kept reporting SERVING after SIGTERM"
    assert not_serving_at[0] < last_content_at, "the answer had ended before the shutdown began: nothing drained"
    try:
        code = llm.process.wait(timeout=max(1.0, DRAIN_GRACE_S + 5 - (time.monotonic() - ended_at)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the LLM did not exit within the {DRAIN_GRACE_S} s grace period\n{llm.log_tail()}")
    assert code == 0, llm.log_tail()

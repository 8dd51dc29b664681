"""REST clients of the benchmark and the load test (scripts/loadtest.py): request bodies, one
streamed completion timed as a client sees it, and closed-loop clients."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import httpx

QUESTION = "Describe what happens in this video, scene by scene."


@dataclass
class Sample:
    """One streamed completion as the client saw it."""

    ttft_ms: float | None = None  # request sent -> first content delta (the end when the answer is empty)
    total_ms: float | None = None
    cache: str = ""  # the x-videollm-cache header
    videollm: dict = field(default_factory=dict)  # the answer's videollm object
    completion_tokens: int = 0
    rejected_429: int = 0  # 429 answers, retried or not
    error: str | None = None  # why the request failed; None for a complete answer

    @property
    def ok(self) -> bool:
        return self.error is None


def data_url(video: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(video).decode()


def video_content(url: str, question: str) -> list[dict]:
    """A user message's content: the video (a data URL or an uploaded video's id) and a question."""
    return [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]


def completion_body(content: str | list[dict], max_tokens: int, *, model: str = "videollm", stream: bool = True,
                    videollm: dict | None = None) -> dict:
    """A chat completion with one user message; a streamed one asks for the usage chunk."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if videollm is not None:
        body["videollm"] = videollm
    return body


def chat_body(video: bytes, frames: int, compression: dict, max_tokens: int) -> dict:
    """The benchmark's request: the video inline, QUESTION, streamed."""
    return completion_body(video_content(data_url(video), QUESTION), max_tokens,
                           videollm={"num_frames": frames, "compression": compression})


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict, max_retries: int = 0) -> Sample:
    """One streamed chat completion. A 429 is retried after its Retry-After, as OpenAI's clients do,
    up to max_retries times (the latencies include the waits). A failure is the sample's `error`:
    another status than 200, an error event, a stream that ends without [DONE], a broken connection."""
    sample = Sample()
    start = time.perf_counter()
    try:
        for attempt in range(max_retries + 1):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code == 429:
                    sample.rejected_429 += 1
                    if attempt < max_retries:
                        await response.aread()
                        await asyncio.sleep(float(response.headers.get("retry-after") or 1))
                        continue
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    sample.error = f"HTTP {response.status_code}: {text[:200]}"
                    return sample
                sample.cache = response.headers.get("x-videollm-cache", "")
                await _read_stream(response, sample, start)
                return sample
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as err:
        sample.error = f"{type(err).__name__}: {err}"[:200]
    return sample


async def _read_stream(response: httpx.Response, sample: Sample, start: float) -> None:
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            sample.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
            return
        for choice in chunk.get("choices") or []:
            if choice.get("delta", {}).get("content") and sample.ttft_ms is None:
                sample.ttft_ms = (time.perf_counter() - start) * 1e3
        sample.videollm = chunk.get("videollm", sample.videollm)
        if chunk.get("usage"):
            sample.completion_tokens = chunk["usage"]["completion_tokens"]
    if not done:
        sample.error = "the stream ended without [DONE]"
        return
    sample.total_ms = (time.perf_counter() - start) * 1e3
    if sample.ttft_ms is None:  # an empty answer: the first token was the end
        sample.ttft_ms = sample.total_ms


async def stream_once(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    """One streamed chat completion, no retries; raises RuntimeError when it fails."""
    sample = await stream_chat(client, url, body)
    if sample.error is not None:
        raise RuntimeError(sample.error)
    return sample


async def run_clients(url: str, bodies: list[dict], clients: int, *, timeout: httpx.Timeout | float = 600,
                      deadline: float | None = None, max_retries: int = 0) -> tuple[list[Sample | None], float]:
    """`clients` concurrent clients send `bodies` in order, each one its next as soon as its last answer
    is in (a closed loop). Returns the sample of each body (None: not started by `deadline`, a
    time.perf_counter() value) and the seconds the clients ran."""
    results: list[Sample | None] = [None] * len(bodies)
    next_body = iter(range(len(bodies)))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while deadline is None or time.perf_counter() < deadline:
            i = next(next_body, None)
            if i is None:
                return
            try:
                results[i] = await stream_chat(client, url, bodies[i], max_retries)
            except Exception as err:  # noqa: BLE001 - that request's failure; the run goes on
                results[i] = Sample(error=f"{type(err).__name__}: {err}"[:200])

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return results, elapsed


def percentile(values: list[float], q: float, interpolate: bool = False) -> float:
    """The q-th percentile: the nearest rank (the benchmark's tables), or with `interpolate` linear
    between the two closest ranks (numpy's default; the load test's); nan without values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if not interpolate:
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def closed_loop(url: str, bodies: list[dict], clients: int, timeout_s: float = 600) -> dict:
    """`clients` concurrent clients send `bodies` (each once) as fast as answers come back."""
    results, elapsed = await run_clients(url, bodies, clients, timeout=timeout_s)
    samples = [s for s in results if s.ok]
    errors = [s.error for s in results if not s.ok]
    ttfts = [s.ttft_ms for s in samples]
    batches = [s.videollm["encoder_batch"]["requests"] for s in samples if "encoder_batch" in s.videollm]
    return {
        "clients": clients,
        "requests": len(samples),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": elapsed,
        "rps": len(samples) / elapsed if elapsed > 0 else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "ttft_mean_ms": statistics.fmean(ttfts) if ttfts else float("nan"),
        # tokens per answer, as the server's usage chunk counted them (both systems stop at EOS or max_tokens)
        "completion_tokens_mean": statistics.fmean(s.completion_tokens for s in samples) if samples else float("nan"),
        # requests whose frames went through the encoder's tower together, on average (1 = never batched)
        "encoder_batch_mean": statistics.fmean(batches) if batches else float("nan"),
    }

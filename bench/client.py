"""REST clients of the benchmark and the load test (scripts/loadtest.py): request bodies, uploads,
one streamed completion timed as a client sees it, and closed-loop clients.

A body is a dict (sent as JSON), its JSON bytes, or a BodyFile (JSON bytes prepared on disk and
streamed from there). Bodies are serialised before the clock starts: json.dumps of a 61 MB clip's
data URL alone takes about 0.3 s, which is the client's cost, not the server's. Large videos go
to disk so that many prepared requests (16 clients x 2 requests of a 61 MB clip: 2.6 GB of
base64) do not have to be held in memory at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

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


def chat_body(video: bytes | str, frames: int, compression: dict, max_tokens: int) -> dict:
    """The benchmark's request: the video inline (bytes) or by URL or uploaded id (str), QUESTION,
    streamed."""
    url = data_url(video) if isinstance(video, bytes) else video
    return completion_body(video_content(url, QUESTION), max_tokens,
                           videollm={"num_frames": frames, "compression": compression})


_VIDEO_MARK = "@@videollm-bench-video@@"  # no JSON escapes in it: json.dumps leaves it as it is


def chat_body_parts(video: bytes, frames: int, compression: dict, max_tokens: int) -> tuple[bytes, ...]:
    """chat_body(video, ...) as the JSON bytes sent, in pieces to join or write one after the other:
    the base64 text goes in as it is (it needs no escaping), never through json.dumps as a str."""
    head, tail = json.dumps(chat_body(_VIDEO_MARK, frames, compression, max_tokens)).encode().split(
        _VIDEO_MARK.encode())
    return head, b"data:video/mp4;base64,", base64.b64encode(video), tail


def chat_bytes(video: bytes, frames: int, compression: dict, max_tokens: int) -> bytes:
    """chat_body(video, ...) serialised, ready to send."""
    return b"".join(chat_body_parts(video, frames, compression, max_tokens))


@dataclass(frozen=True)
class BodyFile:
    """A request body's JSON bytes in a file, sent in chunks as it is read."""

    path: Path
    size: int

    @classmethod
    def write(cls, path: Path, parts: tuple[bytes, ...]) -> BodyFile:
        with open(path, "wb") as handle:
            handle.writelines(parts)
        return cls(path, sum(len(part) for part in parts))

    async def chunks(self, chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        # reads of a file just written come from the page cache: short enough for the event loop
        with open(self.path, "rb") as handle:
            while chunk := handle.read(chunk_bytes):
                yield chunk


def _request_body(body: dict | bytes | BodyFile) -> bytes | BodyFile:
    """A dict's JSON bytes (a body's serialisation is the client's cost, outside the timing); the
    others as they are."""
    return json.dumps(body).encode() if isinstance(body, dict) else body


def _send_args(body: bytes | BodyFile) -> dict:
    """client.stream's keyword arguments for a serialised body (a fresh chunk reader each time, so a
    retried request sends it again)."""
    if isinstance(body, BodyFile):  # a given content-length: sent as is, not chunked
        return {"content": body.chunks(),
                "headers": {"content-type": "application/json", "content-length": str(body.size)}}
    return {"content": body, "headers": {"content-type": "application/json"}}


async def upload_video(client: httpx.AsyncClient, url: str, video: bytes, filename: str = "clip.mp4") -> dict:
    """POST /v1/videos (multipart, field "file"); the answer (its "id" names the video in a chat
    request). Raises RuntimeError when the upload is refused."""
    response = await client.post(f"{url}/v1/videos", files={"file": (filename, video, "video/mp4")})
    if response.status_code != 200:
        raise RuntimeError(f"the upload failed: HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict | bytes | BodyFile,
                      max_retries: int = 0) -> Sample:
    """One streamed chat completion, timed from when the (already serialised) body starts to go out.
    A 429 is retried after its Retry-After, as OpenAI's clients do, up to max_retries times (the
    latencies include the waits). A failure is the sample's `error`: another status than 200, an
    error event, a stream that ends without [DONE], a broken connection."""
    sample = Sample()
    body = _request_body(body)
    start = time.perf_counter()
    try:
        for attempt in range(max_retries + 1):
            async with client.stream("POST", f"{url}/v1/chat/completions", **_send_args(body)) as response:
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


async def stream_once(client: httpx.AsyncClient, url: str, body: dict | bytes | BodyFile) -> Sample:
    """One streamed chat completion, no retries; raises RuntimeError when it fails."""
    sample = await stream_chat(client, url, body)
    if sample.error is not None:
        raise RuntimeError(sample.error)
    return sample


async def run_clients(url: str, bodies: list[dict | bytes | BodyFile], clients: int, *,
                      timeout: httpx.Timeout | float = 600, deadline: float | None = None,
                      max_retries: int = 0) -> tuple[list[Sample | None], float]:
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


async def closed_loop(url: str, bodies: list[dict | bytes | BodyFile], clients: int, timeout_s: float = 600) -> dict:
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

"""Benchmark requests through REST: one streamed completion, timed as a client sees it."""

from __future__ import annotations

import asyncio
import base64
import json
import statistics
import time
from dataclasses import dataclass

import httpx


@dataclass
class Sample:
    ttft_ms: float  # request sent -> first content delta
    total_ms: float
    cache: str
    videollm: dict
    completion_tokens: int


def chat_body(video: bytes, frames: int, compression: dict, max_tokens: int) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(video).decode()
    return {
        "model": "videollm",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}},
            {"type": "text", "text": "Describe what happens in this video, scene by scene."}]}],
        "videollm": {"num_frames": frames, "compression": compression},
    }


async def stream_once(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    start = time.perf_counter()
    first = None
    videollm, tokens = {}, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:500]}")
        cache = response.headers.get("x-videollm-cache", "")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and first is None:
                    first = time.perf_counter()
            videollm = chunk.get("videollm", videollm)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return Sample((first - start) * 1e3, (end - start) * 1e3, cache, videollm, tokens)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def closed_loop(url: str, bodies: list[dict], clients: int, timeout_s: float = 600) -> dict:
    """`clients` concurrent clients send `bodies` (each once) as fast as answers come back."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    samples: list[Sample] = []
    errors: list[str] = []

    async def client_loop(client: httpx.AsyncClient):
        while not queue.empty():
            body = queue.get_nowait()
            try:
                samples.append(await stream_once(client, url, body))
            except Exception as err:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(str(err)[:200])

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
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

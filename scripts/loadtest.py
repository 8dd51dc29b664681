#!/usr/bin/env python3
"""A bounded load test of the REST API: a loopback client, a fixed request count and a time limit.

Runs against a gateway (--url), or starts the local stack itself (`videollm serve` on a free
loopback port, stopped at the end) when no --url is given. For each concurrency level (default 1,
8 and 32 clients) it sends --requests streamed chat completions, a fixed mix of

  hit   a question about one of a few videos encoded before the run (a cache hit),
  miss  a question about a video never sent before (a cache miss: decode + encode),
  text  a text-only chat (no video),

and prints a markdown table per level: p50/p99 of the time to the first content token (TTFT) and
of the whole answer, requests per second, and the error count. --out writes the same as JSON.

A 429 (a service at its concurrency limit) is retried after its Retry-After, as OpenAI's clients
do, up to --max-retries times; latencies include those waits and the table counts the 429s. A
request that still fails, times out, or whose stream breaks counts as an error. Requests not
started within --time-limit seconds of a level's start are skipped and reported. The exit status
is 0 only when every request of every level completed without error.

Defaults are sized for the embedded tiny model on a 2-core CPU (small videos, num_frames 4,
max_tokens 8): the whole run takes a few minutes.

    .venv/bin/python scripts/loadtest.py                       # starts the local stack itself
    .venv/bin/python scripts/loadtest.py --url http://127.0.0.1:8000 --out loadtest.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.client import Sample, completion_body, data_url, percentile, run_clients, video_content
from bench.video import encode, moving_frames

KINDS = ("hit", "miss", "text")
QUESTIONS = ("What happens in this video?", "Describe the moving square.", "What colours do you see?",
             "Is anything moving?")
TEXT_QUESTIONS = ("Name three colours.", "Say hello.", "What is a video?", "Count to five.")


# -- videos ---------------------------------------------------------------------------------------


def make_video(seed: int, frames: int = 16, width: int = 160, height: int = 120, fps: int = 8) -> bytes:
    """A small H.264 clip: a gradient with a moving square; every seed gives different bytes."""
    return encode(moving_frames(frames, width, height, seed), "mp4", fps)


# -- requests -------------------------------------------------------------------------------------


@dataclass
class Planned:
    kind: str  # "hit" | "miss" | "text"
    body: dict


def chat_body(args, content, stream: bool = True) -> dict:
    return completion_body(content, args.max_tokens, model=args.model_name, stream=stream)


def video_body(args, url: str, question: str, stream: bool = True) -> dict:
    return completion_body(video_content(url, question), args.max_tokens, model=args.model_name, stream=stream,
                           videollm={"num_frames": args.num_frames})


def parse_mix(text: str) -> list[str]:
    """'hit=2,miss=1,text=1' -> the repeating pattern ['hit', 'miss', 'hit', 'text'] (interleaved)."""
    weights = {}
    for part in text.split(","):
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown request kind {name!r}; use {', '.join(KINDS)}")
        weights[name] = int(count or 1)
        if weights[name] < 0:
            raise argparse.ArgumentTypeError(f"negative weight for {name}")
    if sum(weights.values()) <= 0:
        raise argparse.ArgumentTypeError("the mix needs at least one request kind with a positive weight")
    pattern, left = [], dict(weights)
    while any(left.values()):  # round robin over the kinds, so a short run still sees every kind
        for name in KINDS:
            if left.get(name, 0) > 0:
                pattern.append(name)
                left[name] -= 1
    return pattern


def plan_level(args, level: int, hit_urls: list[str], seeds) -> list[Planned]:
    pattern = parse_mix(args.mix)
    planned = []
    for i in range(args.requests):
        kind = pattern[i % len(pattern)]
        question = QUESTIONS[i % len(QUESTIONS)]
        if kind == "hit":
            body = video_body(args, hit_urls[i % len(hit_urls)], question)
        elif kind == "miss":
            body = video_body(args, data_url(make_video(next(seeds))), question)
        else:
            body = chat_body(args, f"{TEXT_QUESTIONS[i % len(TEXT_QUESTIONS)]} (client {level}, request {i})")
        planned.append(Planned(kind, body))
    return planned


@dataclass
class LevelResult:
    clients: int
    requests: int
    completed: int = 0
    errors: int = 0
    skipped: int = 0  # not started within the time limit
    rejected_429: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    total_p50_ms: float | None = None
    total_p99_ms: float | None = None
    kinds: dict = field(default_factory=dict)  # kind -> requests sent
    cache: dict = field(default_factory=dict)  # x-videollm-cache value -> answers
    completion_tokens: int = 0
    error_examples: list = field(default_factory=list)


async def run_level(args, url: str, clients: int, planned: list[Planned]) -> LevelResult:
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    results, seconds = await run_clients(url, [p.body for p in planned], clients, timeout=timeout,
                                         deadline=time.perf_counter() + args.time_limit, max_retries=args.max_retries)
    sent: list[tuple[str, Sample]] = [(p.kind, s) for p, s in zip(planned, results) if s is not None]
    samples = [s for _, s in sent]
    ok = [s for s in samples if s.ok]
    result = LevelResult(clients=clients, requests=len(planned), completed=len(ok),
                         errors=len(samples) - len(ok), skipped=len(planned) - len(samples), seconds=round(seconds, 3))
    result.rejected_429 = sum(s.rejected_429 for s in samples)
    result.rps = round(len(ok) / seconds, 3) if seconds > 0 else 0.0
    for name, values in (("ttft", [s.ttft_ms for s in ok]), ("total", [s.total_ms for s in ok])):
        for q in (50, 99):
            value = round(percentile(values, q, interpolate=True), 1) if values else None
            setattr(result, f"{name}_p{q}_ms", value)
    for kind, s in sent:
        result.kinds[kind] = result.kinds.get(kind, 0) + 1
        if s.ok:
            result.cache[s.cache or "?"] = result.cache.get(s.cache or "?", 0) + 1
    result.completion_tokens = sum(s.completion_tokens for s in ok)
    result.error_examples = [s.error for s in samples if not s.ok][:3]
    return result


# -- the local stack ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_stack(args) -> tuple[str, subprocess.Popen]:
    port = free_port()
    argv = [sys.executable, "-m", "videollm.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
            "--port", str(port)]
    if args.model:
        argv += ["--model", str(args.model)]
    # the stack's own output goes to stderr, so stdout holds only the table
    process = subprocess.Popen(argv, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"videollm serve exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return url, process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_stack(process)
    raise RuntimeError(f"the local stack was not ready within {args.start_timeout:.0f} s")


def stop_stack(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)  # serve stops its children: gateway first, Redis last
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- report ---------------------------------------------------------------------------------------

COLUMNS = [  # header, LevelResult attribute
    ("clients", "clients"), ("requests", "requests"), ("ok", "completed"), ("errors", "errors"),
    ("skipped", "skipped"), ("429s retried", "rejected_429"), ("hit/miss/none", None), ("req/s", "rps"),
    ("TTFT p50 ms", "ttft_p50_ms"), ("TTFT p99 ms", "ttft_p99_ms"),
    ("total p50 ms", "total_p50_ms"), ("total p99 ms", "total_p99_ms"), ("wall s", "seconds"),
]


def cell(result: LevelResult, attribute: str | None) -> str:
    if attribute is None:
        return "/".join(str(result.cache.get(name, 0)) for name in ("hit", "miss", "none"))
    value = getattr(result, attribute)
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(results: list[LevelResult]) -> str:
    lines = ["| " + " | ".join(header for header, _ in COLUMNS) + " |",
             "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for result in results:
        lines.append("| " + " | ".join(cell(result, attribute) for _, attribute in COLUMNS) + " |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="gateway base URL; without it the local stack is started (videollm serve)")
    parser.add_argument("--model", type=Path, help="checkpoint for the local stack (default: the embedded model)")
    parser.add_argument("--concurrency", default="1,8,32",
                        type=lambda text: [int(x) for x in text.split(",") if x.strip()],
                        help="comma-separated client counts, one level each (default 1,8,32)")
    parser.add_argument("--requests", type=int, default=48, help="requests per level (default 48)")
    parser.add_argument("--mix", default="hit=2,miss=1,text=1",
                        help="weights of the request kinds hit, miss and text (default hit=2,miss=1,text=1)")
    parser.add_argument("--hit-videos", type=int, default=4, help="videos encoded before the run, for hits (4)")
    parser.add_argument("--num-frames", type=int, default=4, help="frames sampled per video (default 4)")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens per answer (default 8)")
    parser.add_argument("--time-limit", type=float, default=90.0,
                        help="seconds per level after which no new request starts (default 90)")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--max-retries", type=int, default=10, help="retries of a 429 per request (default 10)")
    parser.add_argument("--start-timeout", type=float, default=600.0,
                        help="seconds to wait for the local stack (the first run builds the model)")
    parser.add_argument("--model-name", default="videollm", help="the model name the gateway serves")
    parser.add_argument("--seed", type=int, default=None,
                        help="first seed of the cache-miss videos (default: from the clock, so reruns miss)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        pattern = parse_mix(args.mix)
    except (argparse.ArgumentTypeError, ValueError) as err:
        parser.error(f"--mix: {err}")
    if "hit" in pattern and args.hit_videos < 1:
        parser.error("a mix with hits needs --hit-videos of at least 1")
    if args.requests < 1 or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--requests and every --concurrency level must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            print("starting the local stack (videollm serve) ...", file=sys.stderr, flush=True)
            url, process = start_stack(args)
        return asyncio.run(run(args, url))
    except RuntimeError as err:
        print(f"loadtest failed: {err}", file=sys.stderr)
        return 2
    finally:
        if process is not None:
            stop_stack(process)


async def run(args, url: str) -> int:
    first_seed = args.seed if args.seed is not None else int(time.time() * 1000) % (1 << 31)
    seeds = iter(range(first_seed + args.hit_videos, 1 << 62))
    hit_urls = [data_url(make_video(first_seed + i)) for i in range(args.hit_videos)]
    # warm the cache: one answer per hit video (not measured)
    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        for i, video in enumerate(hit_urls):
            response = await client.post(f"{url}/v1/chat/completions",
                                         json=video_body(args, video, QUESTIONS[0], stream=False))
            if response.status_code != 200:
                raise RuntimeError(f"warming the cache failed for video {i}: HTTP {response.status_code}: "
                                   f"{response.text[:300]}")

    results = []
    for clients in args.concurrency:
        planned = await asyncio.to_thread(plan_level, args, clients, hit_urls, seeds)
        result = await run_level(args, url, clients, planned)
        results.append(result)
        print(f"{clients} clients: {result.completed}/{result.requests} ok, {result.errors} errors, "
              f"{result.rps:.2f} req/s", file=sys.stderr, flush=True)

    print(f"\nLoad test of {url}: {args.requests} streamed requests per level, mix {args.mix} "
          f"(hit = cached video, miss = new video, none = text only), num_frames {args.num_frames}, "
          f"max_tokens {args.max_tokens}; latencies include 429 retries\n")
    print(markdown_table(results))
    for result in results:
        for example in result.error_examples:
            print(f"\n{result.clients} clients, error: {example}")
    if args.out:
        report = {
            "url": url,
            "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                         if key not in ("out", "url")},
            "levels": [asdict(result) for result in results],
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    complete = all(r.errors == 0 and r.skipped == 0 and r.completed == r.requests for r in results)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())

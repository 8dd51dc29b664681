"""Time the gateway's handling of large request bodies (python -m bench.gateway_body).

Two tables, printed as markdown:
1. The CPU steps alone, on a random payload of each size: a memory copy of the body (the
   reference), how Starlette receives it, FastAPI's default parse (stdlib json, then pydantic on the
   dict) with the data-URL regex, stdlib base64 and sha256 one by one, and the gateway's handling
   as it is served now.
2. End to end on a real stack (Redis, the encoder and the LLM with the embedded default on the CPU,
   the gateway; each its own process): a miss and a hit with the video inline, the upload, a hit
   and a miss asking by the uploaded id. The clips are lossless noise, so that they are as large as
   asked and still decode.

Every figure is the median of --repeats calls. Timings are measured, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pybase64

from bench.client import QUESTION, completion_body, data_url, video_content
from bench.timing import median_ms
from bench.video import encode

MB = 1 << 20
CHUNK = 1 << 18  # uvicorn (httptools, uvloop) handed the app a 51 MB body in messages of about 256 KiB
CLIP_FRAMES = 48


def chat_body(url: str, frames: int = 4) -> bytes:
    """A whole (not streamed) chat completion of one token, serialised once as a client would."""
    body = completion_body(video_content(url, QUESTION), 1, stream=False, videollm={"num_frames": frames})
    return json.dumps(body).encode()


# -- 1. the CPU steps ------------------------------------------------------------------------------


def fastapi_default(body: bytes, max_bytes: int) -> str:
    """What the gateway did before issue 14, step for step: FastAPI's stdlib json and pydantic on the
    dict, the data-URL regex, a slice, stdlib base64 with validation, sha256."""
    from gateway.schemas import ChatCompletionRequest
    from gateway.videos import DATA_URL

    request = ChatCompletionRequest.model_validate(json.loads(body))
    url = request.messages[0].content[0].video_url.url
    encoded = url[DATA_URL.match(url).end() :]
    assert len(encoded) * 3 // 4 <= max_bytes + 3
    return hashlib.sha256(base64.b64decode(encoded, validate=True)).hexdigest()


def served(body: bytes, max_bytes: int) -> str:
    """The gateway's handling as it is served now, from the body's bytes to the video's sha256."""
    from gateway.body import parse_chat_body
    from gateway.videos import Video, decode_data_url

    video_url = parse_chat_body(body).messages[0].content[0].video_url
    return Video.of(decode_data_url(video_url.url, max_bytes, video_url.payload)).sha256


def read_body(body: bytes, request_class) -> Callable[[], None]:
    """request_class(...).body() as FastAPI calls it, fed the body in uvicorn's messages."""
    pieces = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    loop = asyncio.new_event_loop()

    async def read() -> None:
        messages = iter(pieces)

        async def receive():
            piece = next(messages)
            return {"type": "http.request", "body": piece, "more_body": piece is not pieces[-1]}

        await request_class({"type": "http", "method": "POST", "headers": []}, receive).body()

    return lambda: loop.run_until_complete(read())


def step_rows(sizes_mb: list[int], repeats: int) -> list[dict]:
    """{step, size -> ms} for each step, on random bytes of each size."""
    from starlette.requests import Request

    from gateway.body import ChatBodyRequest, parse_chat_body
    from gateway.schemas import ChatCompletionRequest
    from gateway.videos import DATA_URL

    rows: dict[str, dict] = {}
    for size in sizes_mb:
        video = np.random.default_rng(size).bytes(size * MB)
        url = data_url(video)
        body = chat_body(url)
        parsed = json.loads(body)
        start = DATA_URL.match(url).end()
        encoded = url[start:]
        payload = parse_chat_body(body).messages[0].content[0].video_url.payload
        max_bytes = len(video) + MB
        steps = {
            "memory copy of the body (reference)": lambda: bytearray(body),
            "Starlette: keep the body's messages, join them": read_body(body, Request),
            "gateway: grow one buffer as the messages arrive": read_body(body, ChatBodyRequest),
            "FastAPI: json.loads": lambda: json.loads(body),
            "FastAPI: pydantic validates the dict": lambda: ChatCompletionRequest.model_validate(parsed),
            "pydantic: model_validate_json of the whole body": lambda: ChatCompletionRequest.model_validate_json(body),
            "gateway: parse_chat_body (the payload left in the body)": lambda: parse_chat_body(body),
            "data-URL regex": lambda: DATA_URL.match(url),
            "slice the payload out of the URL": lambda: url[start:],
            "base64.b64decode(validate=True)": lambda: base64.b64decode(encoded, validate=True),
            "pybase64.b64decode(validate=True) of the payload in the body": lambda: pybase64.b64decode(
                payload, validate=True),
            "sha256 of the video": lambda: hashlib.sha256(video).hexdigest(),
            "**before**: FastAPI's parse + regex + slice + stdlib base64 + sha256": lambda: fastapi_default(
                body, max_bytes),
            "**served now**: the gateway's parse, base64 and sha256": lambda: served(body, max_bytes),
        }
        for name, step in steps.items():
            rows.setdefault(name, {"step": name})[size] = median_ms(step, repeats)
        rows["body MB"] = {**rows.get("body MB", {"step": "body MB"}), size: len(body) / MB}
    return list(rows.values())


def print_step_table(rows: list[dict], sizes_mb: list[int]) -> None:
    sizes = {row["step"]: row for row in rows}
    copy, body_mb = sizes["memory copy of the body (reference)"], sizes["body MB"]
    print("| step | " + " | ".join(f"{s} MB video ({body_mb[s]:.1f} MB body)" for s in sizes_mb) + " |")
    print("|---|" + "---:|" * len(sizes_mb))
    for row in rows:
        if row["step"] != "body MB":
            cells = [f"{row[s]:.2f} ms ({row[s] / copy[s]:.1f}x)" for s in sizes_mb]
            print(f"| {row['step']} | " + " | ".join(cells) + " |")


# -- 2. end to end ---------------------------------------------------------------------------------


def noise_clip(size_mb: int) -> bytes:
    """A lossless H.264 clip of CLIP_FRAMES noise frames, about size_mb large (noise does not compress)."""
    bytes_per_pixel = 4.0  # measured: lossless yuv444 noise
    pixels = size_mb * MB / CLIP_FRAMES / bytes_per_pixel
    height = max(16, int((pixels * 3 / 4) ** 0.5) // 16 * 16)
    width = max(16, int(height * 4 / 3) // 16 * 16)
    frames = np.random.default_rng(size_mb).integers(0, 256, (CLIP_FRAMES, height, width, 3), dtype=np.uint8)
    return encode(frames, "mp4-lossless", options={"preset": "ultrafast"})


def post(client: httpx.Client, url: str, body: bytes) -> tuple[float, dict]:
    """(client ms, the answer's timings_ms with the cache result) of one chat completion."""
    start = time.perf_counter()
    response = client.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    elapsed = (time.perf_counter() - start) * 1e3
    if response.status_code != 200:
        raise RuntimeError(f"the gateway answered {response.status_code}: {response.text[:300]}")
    videollm = response.json()["videollm"]
    return elapsed, {**videollm["timings_ms"], "cache": videollm["cache"]}


def gateway_to_encode(timings: dict) -> float:
    """Request in (headers read) -> the Encode call: the body, then the route's work before the call."""
    return (timings.get("body") or 0.0) + timings["gateway_in"]


def stack_rows(sizes_mb: list[int], repeats: int, model: Path, redis_server: str, log_dir: Path) -> list[dict]:
    from bench.stack import Placement, start_stack

    stack = start_stack(model, Placement([""], [""]), "cpu", redis_server, log_dir)
    rows = []
    try:
        with httpx.Client(timeout=600) as client:
            for size in sizes_mb:
                clip = noise_clip(size)
                inline = data_url(clip)
                frames = iter(range(4, 1000))  # a new frame count is a new cache key: a miss on the same bytes
                misses = [post(client, stack.url, chat_body(inline, next(frames))) for _ in range(repeats)]
                hit_frames = next(frames)
                post(client, stack.url, chat_body(inline, hit_frames))  # the miss that fills the cache
                hits = [post(client, stack.url, chat_body(inline, hit_frames)) for _ in range(repeats)]
                start = time.perf_counter()
                upload = client.post(f"{stack.url}/v1/videos", files={"file": ("clip.mp4", clip, "video/mp4")})
                upload_ms = (time.perf_counter() - start) * 1e3
                upload.raise_for_status()
                video_id = upload.json()["id"]
                id_hits = [post(client, stack.url, chat_body(video_id, hit_frames)) for _ in range(repeats)]
                id_misses = [post(client, stack.url, chat_body(video_id, next(frames))) for _ in range(repeats)]
                for name, samples in (("miss", misses), ("hit", hits), ("id hit", id_hits), ("id miss", id_misses)):
                    expected = "miss" if "miss" in name else "hit"
                    assert all(t["cache"] == expected for _, t in samples), f"{name}: {[t['cache'] for _, t in samples]}"
                med = statistics.median
                rows.append({
                    "clip_mb": len(clip) / MB,
                    "body_mb": len(chat_body(inline)) / MB,
                    "miss_body_ms": med(t["body"] for _, t in misses),
                    "miss_to_encode_ms": med(gateway_to_encode(t) for _, t in misses),
                    "hit_client_ms": med(ms for ms, _ in hits),
                    "hit_to_llm_ms": med(t["body"] + t["to_llm_call"] for _, t in hits),
                    "upload_ms": upload_ms,
                    "id_hit_client_ms": med(ms for ms, _ in id_hits),
                    "id_hit_to_llm_ms": med(t["body"] + t["to_llm_call"] for _, t in id_hits),
                    "id_miss_to_encode_ms": med(gateway_to_encode(t) for _, t in id_misses),
                })
    finally:
        stack.stop()
    return rows


STACK_COLUMNS = {
    "clip_mb": "clip MB",
    "body_mb": "JSON body MB",
    "miss_body_ms": "inline miss: body received + parsed ms",
    "miss_to_encode_ms": "inline miss: request in -> Encode call ms",
    "hit_client_ms": "inline hit: answer (1 token) at the client ms",
    "hit_to_llm_ms": "inline hit: request in -> LLM call ms",
    "upload_ms": "upload (POST /v1/videos) ms",
    "id_hit_client_ms": "hit by id: answer at the client ms",
    "id_hit_to_llm_ms": "hit by id: request in -> LLM call ms",
    "id_miss_to_encode_ms": "miss by id: request in -> Encode call ms",
}


def print_stack_table(rows: list[dict]) -> None:
    print("| " + " | ".join(STACK_COLUMNS.values()) + " |")
    print("|" + "---:|" * len(STACK_COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"{row[key]:.1f}" for key in STACK_COLUMNS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="1,10,40", help="video sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-stack", action="store_true", help="the CPU steps only")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the embedded default)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"), help="the redis-server binary")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    print(f"## The gateway's steps alone (median of {args.repeats}; in brackets: times the memory copy)\n")
    print_step_table(step_rows(sizes, args.repeats), sizes)
    if args.skip_stack:
        return
    from videollm.stack import ensure_model

    if args.redis_server is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server, or pass --redis-server")
    log_dir = Path(tempfile.mkdtemp(prefix="gateway-body-"))
    print(f"\n## End to end: Redis, encoder and LLM on the CPU (embedded default), the gateway "
          f"(median of {args.repeats}; service logs in {log_dir})\n")
    print_stack_table(stack_rows(sizes, args.repeats, ensure_model(args.model), args.redis_server, log_dir))


if __name__ == "__main__":
    main()

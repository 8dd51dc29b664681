"""videollm bench: the real stack against transformers' monolithic model, in one run, on one machine.

    python -m bench.run --shape 7b --device cuda --out docs/bench-7b      (or: videollm bench ...)
    videollm bench --clips 360p,1080p-30s,720p-2min --clip-frames 720p-2min=32,64 --throughput-clip 1080p-30s ...

Builds a random-weight checkpoint at the chosen shape, loads the benchmark clips (--clips: names of
bench/clips.py, generated once and cached, or paths of video files), starts Redis, the encoder and
LLM replicas (placed on GPUs by --placement) and the gateway as separate processes, and measures
through REST, for each clip, frame count and retain ratio: TTFT on a cache miss and on a hit two
ways (the same data URL sent again; a video uploaded to /v1/videos once and asked for by its id,
first a miss, then a hit), the upload, encoder, prefill and decode figures and where a miss's TTFT
goes; then throughput with concurrent clients on one clip (--throughput-clip). Then it stops the
stack and measures the monolithic model on the same GPU: one request at a time in-process (TTFT,
decode) on each clip, and (--baseline-throughput measured, the default) its throughput behind
bench/baseline_server.py, an HTTP front in its own process that serves one request at a time,
driven by the same closed-loop clients and request counts as videollm's throughput runs.
--baseline-throughput modeled computes the baseline's throughput from the one measured request
instead (req/s = 1000 / service_ms; the tables and results.json label it "modeled" with the
formula); both does both. It prints a markdown table, writes results.json, results.md and (when
matplotlib is importable) ttft_vs_tokens.png into --out.

Every request sends new video bytes where it means a miss (the clip remuxed with a tag, the same
frames), inline as a base64 data URL in the JSON body, serialised before its clock starts. The
throughput runs' bodies are written to OUT/bodies first and streamed from there, so memory stays
bounded however large the clip (16 clients x 2 requests of the 61 MB clip are 2.6 GB of base64).
The stack's gateway accepts videos of up to 1 GiB; the product defaults (256 MiB a video) hold
the 121 MB 2-minute clip as well, inline or uploaded.

On a GPU machine without a package registry, bring the wheels of the web server, Redis client and
video decoder (fastapi, starlette, uvicorn, pydantic, pydantic-core, pydantic-settings,
python-dotenv, typing-inspection, annotated-types, annotated-doc, python-multipart, redis, av,
grpcio, grpcio-health-checking, protobuf; and httptools and uvloop, which `uvicorn[standard]` brings
in a normal install: without them the gateway parses HTTP in pure Python (h11) on asyncio's own
loop, which is slower for large request bodies) and a redis-server binary (Debian's redis-server,
redis-tools, liblzf1 and libjemalloc2 packages unpacked with dpkg -x), install the wheels with
`pip install --no-index --target DIR` and put DIR on PYTHONPATH, and pass --redis-server PATH (with
LD_LIBRARY_PATH pointing at the unpacked libraries).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import redis

from bench.baseline import MODELED_FORMULA, Monolithic, queueing
from bench.baseline_server import start_server
from bench.checkpoint import SHAPES, build_checkpoint
from bench.client import BodyFile, chat_body, chat_body_parts, chat_bytes, closed_loop, stream_once, upload_video
from bench.clips import CLIPS, clip, describe
from bench.stack import Placement, start_stack
from bench.tables import fig
from bench.video import variant
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="videollm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="checkpoint shape (random weights)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint is built (default: OUT/../ckpt-SHAPE)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json/.md/.png")
    parser.add_argument("--clips", default="360p",
                        help=f"clips of the latency matrix, comma-separated: names of bench/clips.py "
                             f"({', '.join(CLIPS)}; generated once, then cached) or paths of video files (named by "
                             "their stem)")
    parser.add_argument("--throughput-clip", help="the clip of the throughput runs, the baseline's too (default: the "
                                                  "first of --clips)")
    parser.add_argument("--frames", default="32,64", help="frame counts of the latency matrix (each clip but those of "
                                                       "--clip-frames)")
    parser.add_argument("--clip-frames", action="append", default=[], metavar="CLIP=FRAMES",
                        help="frame counts of one clip instead of --frames, e.g. 720p-2min=32,64 (repeatable)")
    parser.add_argument("--retain", default="1.0,0.25,0.1", help="retain ratios (1.0 = no compression)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients of the throughput runs")
    parser.add_argument("--throughput-retain", default="0.1", help="retain ratios of the throughput runs")
    parser.add_argument("--throughput-frames", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per latency cell (median)")
    parser.add_argument("--placement", action="append", default=None,
                        help="ENCODER_GPUS/LLM_GPUS, one GPU per replica, e.g. 0/0, 0/1, 0,1/1 (repeatable; "
                             "the latency matrix runs on the first)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-throughput", choices=("measured", "modeled", "both"), default="measured",
                        help="the baseline's throughput: measured behind bench/baseline_server.py with the same "
                             "closed-loop clients (default), modeled from one measured request, or both")
    parser.add_argument("--skip-latency", action="store_true", help="throughput runs only")
    return parser.parse_args(argv)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def compression_for(retain: float) -> dict:
    return {"method": "none"} if retain >= 1.0 else {"method": "earlytom", "retain_ratio": retain}


def service_memory(running) -> dict:
    import grpc

    memory = {}
    for address in running.encoder_addresses:
        with grpc.insecure_channel(address) as channel:
            memory[f"encoder {address}"] = encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest()).peak_memory_bytes
    for address in running.llm_addresses:
        with grpc.insecure_channel(address) as channel:
            memory[f"llm {address}"] = llm_pb2_grpc.LLMStub(channel).Info(llm_pb2.LLMInfoRequest()).peak_memory_bytes
    return memory


LEGACY_CLIP = "360p"  # results written before --clips measured the 360p clip only, and their rows say no clip


def split_names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def clip_name(spec: str) -> str:
    """A clip's name in the results: its name in bench/clips.py, or a video file's name without suffix."""
    return spec if spec in CLIPS else Path(spec).stem


def clip_specs(args) -> dict[str, str]:
    """name -> spec of --clips and --throughput-clip, checked before anything starts."""
    specs = split_names(args.clips)
    if not specs:
        raise SystemExit("--clips: give at least one clip")
    args.throughput_clip = args.throughput_clip or specs[0]
    named: dict[str, str] = {}
    for spec in [*specs, args.throughput_clip]:
        if spec not in CLIPS and not Path(spec).is_file():
            raise SystemExit(f"{spec!r} is neither a clip of bench/clips.py ({', '.join(CLIPS)}) nor a video file")
        if named.setdefault(clip_name(spec), spec) != spec:
            raise SystemExit(f"two clips are named {clip_name(spec)!r} ({named[clip_name(spec)]} and {spec}): "
                             "rename one of the files")
    return named


def frames_per_clip(args, names: list[str]) -> dict[str, list[int]]:
    """Each clip's frame counts: --frames, or its own --clip-frames."""
    frames = {name: ints(args.frames) for name in names}
    for text in args.clip_frames:
        name, _, counts = text.partition("=")
        if name not in frames or not all(x.strip().isdigit() for x in counts.split(",")):
            raise SystemExit(f"--clip-frames {text!r}: expected CLIP=FRAMES with CLIP one of --clips "
                             f"({', '.join(names)}), e.g. {names[-1]}=32,64")
        frames[name] = ints(counts)
    return frames


def load_clip(spec: str) -> bytes:
    return clip(spec) if spec in CLIPS else Path(spec).read_bytes()


async def latency_matrix(url: str, redis_url: str, clips: dict[str, bytes], args) -> list[dict]:
    store = redis.Redis.from_url(redis_url)
    rows = []
    async with httpx.AsyncClient(timeout=900) as client:
        first = next(iter(clips.values()))
        await stream_once(client, url, chat_bytes(variant(first, 10_000), 8, {"method": "none"}, 4))  # warm-up
        # the first upload and request by id pay first-use costs too (the gateway's upload prober)
        uploaded = await upload_video(client, url, variant(first, 10_001))
        await stream_once(client, url, chat_body(uploaded["id"], 8, {"method": "none"}, 4))
        variants = iter(range(20_000, 30_000))
        for name, data in clips.items():
            for frames in args.frames_of[name]:
                for retain in floats(args.retain):
                    # Redis holds one cell's uploads and encodings at a time: a 121 MB clip's would add up
                    store.flushall()
                    rows.append(await latency_cell(client, url, name, data, frames, retain, args, variants))
                    print(f"  {name}, {frames} frames, retain {retain}: {json.dumps(rows[-1], default=str)[:300]}",
                          flush=True)
    store.close()
    return rows


async def latency_cell(client: httpx.AsyncClient, url: str, name: str, data: bytes, frames: int, retain: float,
                       args, variants) -> dict:
    """One cell of the latency matrix, after a warm-up request of its shape; per repeat, new bytes of
    the same frames (a miss in Redis and in the LLM's prefix cache) sent inline twice (a miss, then a
    hit: the same data URL sent again), then other new bytes uploaded once and asked for by their id
    twice (a miss, then a hit)."""
    compression = compression_for(retain)

    def inline() -> bytes:
        return chat_bytes(variant(data, next(variants)), frames, compression, args.max_tokens)

    await stream_once(client, url, inline())  # warm-up of this shape
    samples: dict[str, list] = {"miss": [], "hit": [], "miss_id": [], "hit_id": []}
    uploads = []
    for _ in range(args.repeats):
        body = inline()
        samples["miss"].append(await stream_once(client, url, body))
        samples["hit"].append(await stream_once(client, url, body))
        video = variant(data, next(variants))
        start = time.perf_counter()
        video_id = (await upload_video(client, url, video))["id"]
        uploads.append((time.perf_counter() - start) * 1e3)
        by_id = chat_body(video_id, frames, compression, args.max_tokens)
        samples["miss_id"].append(await stream_once(client, url, by_id))
        samples["hit_id"].append(await stream_once(client, url, by_id))
    cache = {kind: [s.cache for s in got] for kind, got in samples.items()}
    wrong = {kind: said for kind, said in cache.items() if set(said) != {kind.removesuffix("_id")}}
    if wrong:
        raise RuntimeError(f"{name}, {frames} frames, retain {retain}: x-videollm-cache should say miss then hit, "
                           f"inline and by id; it said {wrong} (is the gateway's cache, Redis, working?)")
    misses, hits, misses_id, hits_id = samples.values()
    meta = misses[-1].videollm
    median = statistics.median

    def timing(got, key: str, part: str = "timings_ms") -> float:
        return median(s.videollm[part][key] for s in got)

    return {
        "clip": name,
        "frames": frames,
        "retain": retain,
        "frames_after_merge": meta.get("frames_after_merge", frames),
        "visual_tokens": meta.get("visual_tokens"),
        "ttft_miss_ms": median(s.ttft_ms for s in misses),
        "ttft_hit_ms": median(s.ttft_ms for s in hits),  # the same data URL sent again
        "upload_ms": median(uploads),  # POST /v1/videos of the video's bytes, to the answer
        "ttft_miss_id_ms": median(s.ttft_ms for s in misses_id),
        "ttft_hit_id_ms": median(s.ttft_ms for s in hits_id),
        "encode_ms": timing(misses, "encode"),
        "encoder_vision_ms": timing(misses, "vision", "encoder_timings_ms"),
        "encoder_decode_ms": timing(misses, "decode", "encoder_timings_ms"),
        "prefill_ms": timing(misses, "prefill"),
        "prefill_hit_ms": timing(hits, "prefill"),
        "handoff_miss_ms": timing(misses, "handoff"),
        "handoff_hit_ms": timing(hits, "handoff"),
        "gateway_ttft_hit_ms": timing(hits, "ttft"),
        "llm_ttft_hit_ms": timing(hits, "llm_ttft"),
        "gateway_ttft_hit_id_ms": timing(hits_id, "ttft"),
        "llm_ttft_hit_id_ms": timing(hits_id, "llm_ttft"),
        "decode_tokens_per_s": median(s.videollm["decode_tokens_per_s"] for got in samples.values() for s in got),
        "completion_tokens": misses[-1].completion_tokens,
        "flops": meta.get("flops"),
        "cache": cache,  # the x-videollm-cache header of each timed request
        "miss_parts_ms": miss_parts(misses),
        "miss_id_parts_ms": miss_parts(misses_id),
    }


def miss_parts(misses) -> dict:
    """Where a miss's TTFT goes, hop by hop (medians): what the client sees beyond the gateway (upload,
    body parsing, SSE), the gateway before the Encode call, the Encode call (the encoder's own total
    inside it), the gateway between header and Generate call, and the Generate call to the first
    token (the LLM's own TTFT, hand-off and prefill inside it)."""
    def med(fn):
        return statistics.median(fn(s, s.videollm["timings_ms"], s.videollm["encoder_timings_ms"]) for s in misses)

    return {
        "client_beyond_gateway": med(lambda s, t, e: s.ttft_ms - t["ttft"]),
        "gateway_in": med(lambda s, t, e: t["gateway_in"]),
        "encode_call": med(lambda s, t, e: t["encode_call"]),
        "encoder_total": med(lambda s, t, e: e["total"]),
        "encoder_decode": med(lambda s, t, e: e["decode"]),
        "encoder_vision": med(lambda s, t, e: e["vision"]),
        "encoder_projector": med(lambda s, t, e: e["projector"]),
        "header_to_llm_call": med(lambda s, t, e: t["to_llm_call"] - t["gateway_in"] - t["encode_call"]),
        "llm_call": med(lambda s, t, e: t["ttft"] - t["to_llm_call"]),
        "llm_ttft": med(lambda s, t, e: t["llm_ttft"]),
        "handoff": med(lambda s, t, e: t["handoff"]),
        "prefill": med(lambda s, t, e: t["prefill"]),
    }


@contextlib.contextmanager
def body_files(folder: Path, data: bytes, count: int, frames: int, compression: dict, max_tokens: int,
               counter: list[int]):
    """`count` chat bodies, each a new video (the clip remuxed: every request a miss), written to
    `folder` rather than held in memory, and removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        bodies = []
        for _ in range(count):
            counter[0] += 1
            parts = chat_body_parts(variant(data, counter[0]), frames, compression, max_tokens)
            bodies.append(BodyFile.write(folder / f"body-{counter[0]}.json", parts))
        yield bodies
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def throughput(url: str, redis_url: str, name: str, data: bytes, args, counter: list[int],
                     replicas: int) -> list[dict]:
    """Closed-loop runs per retain ratio and client count on one clip, after untimed warm-up requests
    that reach every replica (first-use costs: CUDA graph captures, kernel plans for new shapes)."""
    store = redis.Redis.from_url(redis_url)
    folder = args.out / "bodies"
    rows = []
    for retain in floats(args.throughput_retain):
        compression = compression_for(retain)
        with body_files(folder, data, 2 * replicas, args.throughput_frames, compression, args.max_tokens,
                        counter) as warm:
            await closed_loop(url, warm, 2 * replicas)
        for clients in ints(args.clients):
            store.flushall()
            with body_files(folder, data, clients * args.requests_per_client, args.throughput_frames, compression,
                            args.max_tokens, counter) as bodies:
                result = await closed_loop(url, bodies, clients)
            result.update(clip=name, retain=retain)
            rows.append(result)
            print(f"  {name}, retain {retain}, {clients} clients: {json.dumps(result)[:300]}", flush=True)
    store.close()
    return rows


async def baseline_throughput(url: str, name: str, data: bytes, args, counter: list[int]) -> list[dict]:
    """The baseline server under the same closed-loop clients as videollm's throughput runs: the same
    client code, clip, clients and requests per client, each request a new video at
    --throughput-frames (full tokens: the baseline has no compression), after one untimed warm-up
    request (the server has one worker, and the first request pays its first-use costs)."""
    folder = args.out / "bodies"
    none = {"method": "none"}
    with body_files(folder, data, 1, args.throughput_frames, none, args.max_tokens, counter) as warm:
        await closed_loop(url, warm, 1)
    rows = []
    for clients in ints(args.clients):
        with body_files(folder, data, clients * args.requests_per_client, args.throughput_frames, none,
                        args.max_tokens, counter) as bodies:
            result = await closed_loop(url, bodies, clients)
        result.pop("encoder_batch_mean", None)  # no encoder
        result.update(kind="measured", clip=name, frames=args.throughput_frames, max_tokens=args.max_tokens,
                      note="transformers' monolithic generate behind bench/baseline_server.py (one request at "
                           "a time, streamed over HTTP), driven by the same closed-loop clients")
        rows.append(result)
        print(f"  baseline, {name}, {clients} clients: {json.dumps(result)[:300]}", flush=True)
    return rows


def environment(args, program: str = "videollm bench") -> dict:
    """The machine and versions, and the command (`program` and args.argv)."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device.startswith("cuda") else "none"
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": gpu,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": f"{program} " + " ".join(args.argv),
    }


def decode_floor_ms(model_dir: Path, bandwidth_tb_s: float) -> float:
    """The LLM's weight bytes, read once per decoded token, over the GPU's memory bandwidth."""
    from safetensors import safe_open

    llm_bytes = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if "language_model" in key or key.startswith("lm_head"):
                    tensor = handle.get_slice(key)
                    llm_bytes += math.prod(tensor.get_shape()) * 2  # bf16 when served
    return llm_bytes / (bandwidth_tb_s * 1e12) * 1e3


def _pair(row: dict, first: str, second: str) -> str:
    return f"{fig(row, first)}/{fig(row, second)}"


def _speedup(base: float, value: float | None) -> str:
    return f"{base / value:.2f}x" if value else "-"


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"# videollm benchmark: {results['shape']} shape, random weights",
             "",
             f"{env['date']} · GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · "
             f"Python {env['python']}",
             f"Command: `{env['command']}`",
             f"Placement of the latency matrix: {results['placements'][0]['placement']}",
             ""]
    if results.get("clips"):
        lines += ["## Clips", "",
                  "| clip | source | resolution | codec, profile | duration s | frames | keyframes | MB | Mbit/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, c in results["clips"].items():
            lines.append(f"| {name} | {c['source']} | {c['width']}x{c['height']} | {c['codec']}, {c['profile']} | "
                         f"{c['duration_s']} | {c['frames']} | {c['keyframes']} | {c['bytes'] / 1e6:.1f} | "
                         f"{c['mbit_per_s']} |")
        lines.append("")
    latency = results["placements"][0].get("latency", [])
    baseline = {(b.get("clip", LEGACY_CLIP), b["frames"]): b for b in results.get("baseline", [])}
    lines += ["## Latency (one request at a time, through REST, streamed)", "",
              "A hit is the same data URL sent again, or (id) a video uploaded to /v1/videos once and asked for by "
              "its id, after one miss by that id.", "",
              "| clip | frames | retain | frames after merge | visual tokens | TTFT miss ms | TTFT hit ms | "
              "TTFT hit ms (id) | encode ms | prefill ms | hand-off ms miss/hit | decode tok/s | "
              "baseline TTFT ms (measured) | miss speed-up | hit speed-up | hit speed-up (id) |",
              "|---" * 16 + "|"]
    for row in latency:
        base = baseline.get((row.get("clip", LEGACY_CLIP), row["frames"]))
        compared = (f"{base['ttft_ms']:.1f} | {_speedup(base['ttft_ms'], row['ttft_miss_ms'])} | "
                    f"{_speedup(base['ttft_ms'], row['ttft_hit_ms'])} | "
                    f"{_speedup(base['ttft_ms'], row.get('ttft_hit_id_ms'))}" if base else "- | - | - | -")
        lines.append(
            f"| {row.get('clip', LEGACY_CLIP)} | {row['frames']} | {row['retain']} | {row['frames_after_merge']} | "
            f"{row['visual_tokens']} | {fig(row, 'ttft_miss_ms')} | {fig(row, 'ttft_hit_ms')} | "
            f"{fig(row, 'ttft_hit_id_ms')} | {fig(row, 'encode_ms')} | {fig(row, 'prefill_ms')} | "
            f"{_pair(row, 'handoff_miss_ms', 'handoff_hit_ms')} | {fig(row, 'decode_tokens_per_s')} | {compared} |")
    if latency:
        lines += ["", "## Cache hits: the same data URL sent again, or an uploaded video's id (medians, ms)", "",
                  "in gateway/LLM: the hit's TTFT as the gateway and the LLM measured it; upload: POST /v1/videos of "
                  "the video's bytes until its answer.", "",
                  "| clip | frames | retain | TTFT hit | in gateway/LLM | upload | TTFT miss (id) | TTFT hit (id) | "
                  "in gateway/LLM (id) |", "|---" * 9 + "|"]
        for row in latency:
            lines.append(f"| {row.get('clip', LEGACY_CLIP)} | {row['frames']} | {row['retain']} | "
                         f"{fig(row, 'ttft_hit_ms')} | {_pair(row, 'gateway_ttft_hit_ms', 'llm_ttft_hit_ms')} | "
                         f"{fig(row, 'upload_ms')} | {fig(row, 'ttft_miss_id_ms')} | {fig(row, 'ttft_hit_id_ms')} | "
                         f"{_pair(row, 'gateway_ttft_hit_id_ms', 'llm_ttft_hit_id_ms')} |")
    parts = [row for row in latency if "miss_parts_ms" in row]
    if parts:
        names = list(parts[0]["miss_parts_ms"])
        lines += ["", "## Where a miss's TTFT goes (medians, ms)", "",
                  "client beyond gateway = upload, body parsing and SSE; encode call holds the encoder's total "
                  "(decode, vision, projector inside it); LLM call holds the LLM's TTFT (hand-off, prefill inside it). "
                  "video: sent inline as a data URL, or asked for by an uploaded id.",
                  "", "| clip | frames | retain | video | TTFT miss | " + " | ".join(n.replace("_", " ") for n in names)
                  + " |", "|---" * (5 + len(names)) + "|"]
        for row in parts:
            for video, key, ttft in (("data URL", "miss_parts_ms", "ttft_miss_ms"),
                                     ("uploaded id", "miss_id_parts_ms", "ttft_miss_id_ms")):
                if key in row:
                    lines.append(f"| {row.get('clip', LEGACY_CLIP)} | {row['frames']} | {row['retain']} | {video} | "
                                 f"{row[ttft]:.1f} | " + " | ".join(fig(row[key], n) for n in names) + " |")
    if baseline:
        lines += ["", "## Baseline: transformers' monolithic `generate`, full tokens (measured in-process, one request "
                  "at a time)", "",
                  "| clip | frames | visual tokens | TTFT ms | decode+preprocess ms | vision ms | prefill ms | "
                  "decode ms/token | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|"]
        for b in results["baseline"]:
            lines.append(f"| {b.get('clip', LEGACY_CLIP)} | {b['frames']} | {b['visual_tokens']} | "
                         f"{b['ttft_ms']:.1f} | {b['decode_ms'] + b['preprocess_ms']:.1f} | {b['vision_ms']:.1f} | {b['prefill_ms']:.1f} | "
                         f"{b['decode_ms_per_token']:.2f} | {b['peak_memory_bytes'] / 2**30:.1f} |")
    base_tp = results.get("baseline_throughput", [])
    kinds = [kind for kind in ("measured", "modeled") if any(baseline_kind(b) == kind for b in base_tp)]
    by_kind = {(baseline_kind(b), b["clients"]): b for b in base_tp}
    header = "| placement | retain | clients | requests | errors | req/s | TTFT p50 ms | TTFT p99 ms | encoder batch |"
    for kind in kinds:
        header += f" baseline req/s ({kind}) | baseline TTFT p50/p99 ms ({kind}) | req/s ratio (vs {kind} baseline) |"
    throughput_clips = ", ".join(dict.fromkeys(row.get("clip", LEGACY_CLIP) for placement in results["placements"]
                                               for row in placement["throughput"])) or LEGACY_CLIP
    lines += ["", f"## Throughput on the {throughput_clips} clip (closed-loop clients, each request a different video: "
              "all cache misses)", "",
              "`encoder batch`: requests whose frames went through the vision tower together, on average.", "",
              header, "|---" * (9 + 3 * len(kinds)) + "|"]
    for placement in results["placements"]:
        for row in placement["throughput"]:
            cells = (f"| {placement['placement']} | {row['retain']} | {row['clients']} | {row['requests']} | "
                     f"{row['errors']} | {row['rps']:.2f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                     f"{fig(row, 'encoder_batch_mean', 2)} |")
            for kind in kinds:
                b = by_kind.get((kind, row["clients"]))
                if b is None:
                    cells += " - | - | - |"
                    continue
                ratio = f"{row['rps'] / b['rps']:.2f}x" if b["rps"] > 0 else "-"
                cells += f" {b['rps']:.2f} | {b['ttft_p50_ms']:.0f}/{b['ttft_p99_ms']:.0f} | {ratio} |"
            lines.append(cells)
    if base_tp:
        base_clips = ", ".join(dict.fromkeys(b.get("clip", LEGACY_CLIP) for b in base_tp))
        lines += ["", f"## Baseline throughput on the {base_clips} clip: transformers' monolithic `generate`, one "
                  "request at a time", ""]
        lines += [f"- {baseline_note(kind, [b for b in base_tp if baseline_kind(b) == kind])}" for kind in kinds]
        lines += ["", "| kind | frames | clients | requests | errors | req/s | TTFT p50 ms | TTFT p99 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in base_tp:
            measured = baseline_kind(b) == "measured"
            lines.append(f"| {baseline_kind(b)} | {b.get('frames', '-')} | {b['clients']} | "
                         f"{b['requests'] if measured else '- (modeled)'} | {b['errors'] if measured else '-'} | "
                         f"{b['rps']:.2f} | {b['ttft_p50_ms']:.0f} | {b['ttft_p99_ms']:.0f} |")
    lines += ["", "## Peak GPU memory per service", ""]
    for placement in results["placements"]:
        for name, value in placement.get("memory", {}).items():
            lines.append(f"- {placement['placement']}: {name}: {value / 2**30:.2f} GiB")
    if "decode_floor_ms" in results:
        lines += ["", f"Decode floor from memory bandwidth (weights read once per token): "
                      f"{results['decode_floor_ms']:.2f} ms/token."]
    return "\n".join(lines) + "\n"


def baseline_kind(entry: dict) -> str:
    """"measured" or "modeled"; entries written before the field existed were all modeled."""
    return entry.get("kind", "modeled")


def baseline_note(kind: str, entries: list[dict]) -> str:
    if kind == "measured":
        return ("measured: transformers' monolithic `generate` behind bench/baseline_server.py (an HTTP front "
                "in its own process that serves one request at a time, streamed), driven by the same "
                "closed-loop client code, client counts and requests per client as videollm's runs, each "
                "request a new video at full tokens.")
    first = entries[0]
    if "service_ms" not in first:
        return f"{MODELED_FORMULA}."
    at = ", ".join(f"{first[key]} {unit}" for key, unit in (("frames", "frames"), ("max_tokens", "tokens"))
                   if key in first)
    return (f"{MODELED_FORMULA}. Here service_ms = {first['service_ms']:.1f} ms and TTFT = {first['ttft_ms']:.1f} ms"
            + (f" ({at})." if at else "."))


def _pyplot():
    """matplotlib's pyplot without a display, or None where matplotlib is not installed."""
    try:
        import matplotlib  # optional dependency: the `bench` extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional dependency
    except ImportError:
        return None
    return plt


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_size: int) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(results: dict, path: Path) -> bool:
    if (plt := _pyplot()) is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    latency = results["placements"][0]["latency"]
    for clip_frames in dict.fromkeys((r.get("clip", LEGACY_CLIP), r["frames"]) for r in latency):
        rows = [r for r in latency if (r.get("clip", LEGACY_CLIP), r["frames"]) == clip_frames]
        label = f"videollm, {clip_frames[0]}, {clip_frames[1]} frames"
        line, = ax.plot([r["visual_tokens"] for r in rows], [r["ttft_miss_ms"] for r in rows], "o-",
                        label=f"{label}, miss")
        ax.plot([r["visual_tokens"] for r in rows], [r["ttft_hit_ms"] for r in rows], "s--", color=line.get_color(),
                label=f"{label}, hit")
    for b in results.get("baseline", []):
        ax.plot([b["visual_tokens"]], [b["ttft_ms"]], "k*", markersize=12)
        ax.annotate(f"transformers, {b.get('clip', LEGACY_CLIP)}, {b['frames']} frames",
                    (b["visual_tokens"], b["ttft_ms"]), textcoords="offset points", xytext=(-60, 8), fontsize=7)
    _finish(fig, ax, path, "visual tokens sent to the LLM", "time to first token, ms",
            f"TTFT vs retained tokens ({results['shape']}, {results['environment']['gpu']})", legend_size=7)
    return True


def plot_throughput(results: dict, path: Path) -> bool:
    if (plt := _pyplot()) is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for placement in results["placements"]:
        for retain in sorted({r["retain"] for r in placement["throughput"]}):
            rows = [r for r in placement["throughput"] if r["retain"] == retain]
            ax.plot([r["clients"] for r in rows], [r["rps"] for r in rows], "o-",
                    label=f"encoders/LLMs on GPUs {placement['placement']}, retain {retain}")
    for kind, style in (("measured", "k*-"), ("modeled", "k*:")):
        base = [b for b in results.get("baseline_throughput", []) if baseline_kind(b) == kind]
        if base:
            ax.plot([b["clients"] for b in base], [b["rps"] for b in base], style,
                    label=f"transformers, one GPU, one request at a time ({kind})")
    ax.set_xscale("log", base=2)
    _finish(fig, ax, path, "concurrent clients", "requests per second",
            f"Throughput ({results['shape']}, {results['environment']['gpu']})", legend_size=7)
    return True


def main(argv=None) -> int:
    import torch

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    specs = clip_specs(args)  # before the checkpoint: a wrong name fails at once
    args.frames_of = frames_per_clip(args, [clip_name(spec) for spec in split_names(args.clips)])
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint_dir or args.out.parent / f"ckpt-{args.shape}"
    print(f"building the {args.shape} checkpoint in {checkpoint}", flush=True)
    model_dir = build_checkpoint(args.shape, checkpoint, args.device)
    videos = {}
    for name, spec in specs.items():
        print(f"loading the {name} clip (a long clip is generated once, in a minute or two, then cached)", flush=True)
        videos[name] = load_clip(spec)
    clips = {name: videos[name] for name in map(clip_name, split_names(args.clips))}  # the latency matrix's
    tp_name = clip_name(args.throughput_clip)
    results = {"shape": args.shape, "environment": environment(args), "placements": [], "args": vars(args),
               "clips": {name: {"source": "bench/clips.py" if spec in CLIPS else spec, **describe(videos[name])}
                         for name, spec in specs.items()}}
    counter = [0]
    placements = args.placement or ["0/0"]
    for index, text in enumerate(placements):
        encoders, llms = text.split("/")
        placement = Placement(Placement.parse(encoders), Placement.parse(llms))
        if not args.device.startswith("cuda"):
            placement = Placement([""] * len(placement.encoders), [""] * len(placement.llms))
        print(f"starting the stack: {placement.describe()}", flush=True)
        running = start_stack(model_dir, placement, args.device, args.redis_server, args.out)
        try:
            entry = {"placement": text, "latency": [], "throughput": []}
            if index == 0 and not args.skip_latency:
                entry["latency"] = asyncio.run(latency_matrix(running.url, running.redis_url, clips, args))
            replicas = len(placement.encoders) + len(placement.llms)
            entry["throughput"] = asyncio.run(
                throughput(running.url, running.redis_url, tp_name, videos[tp_name], args, counter, replicas))
            entry["memory"] = service_memory(running)
            results["placements"].append(entry)
        finally:
            running.stop()
    if not args.skip_baseline:
        print("measuring transformers' monolithic model", flush=True)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        device = "cuda:0" if args.device.startswith("cuda") else "cpu"
        monolithic = Monolithic(model_dir, device, dtype)
        results["baseline"] = []
        cells = [(name, frames) for name in clips for frames in args.frames_of[name]]
        if args.baseline_throughput in ("modeled", "both") and (tp_name, args.throughput_frames) not in cells:
            cells.append((tp_name, args.throughput_frames))  # the modeled throughput's one request
        for name, frames in cells:
            measured = {"clip": name, "frames": frames,
                        **monolithic.measure(videos[name], frames, args.max_tokens, args.repeats)}
            results["baseline"].append(measured)
            print(f"  baseline {name}, {frames} frames: {json.dumps(measured)[:300]}", flush=True)
        results["baseline_throughput"] = []
        if args.baseline_throughput in ("modeled", "both"):  # from one measured request, labelled "modeled"
            base = next(b for b in results["baseline"] if (b["clip"], b["frames"]) == (tp_name, args.throughput_frames))
            results["baseline_throughput"] = [dict(queueing(base["service_ms"], base["ttft_ms"], c), clip=tp_name,
                                                   frames=base["frames"], max_tokens=args.max_tokens)
                                              for c in ints(args.clients)]
        monolithic.close()
        del monolithic
        if args.baseline_throughput in ("measured", "both"):
            print("measuring the monolithic model's throughput behind a one-at-a-time HTTP server", flush=True)
            url, server = start_server(model_dir, device, "bfloat16" if dtype == torch.bfloat16 else "float32",
                                       args.out / "baseline_server.log")
            try:
                results["baseline_throughput"][:0] = asyncio.run(
                    baseline_throughput(url, tp_name, videos[tp_name], args, counter))
            finally:
                server.stop()
    if args.device.startswith("cuda"):
        bandwidth = 4.8 if "H200" in results["environment"]["gpu"] else 3.35
        results["decode_floor_ms"] = decode_floor_ms(model_dir, bandwidth)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = report(results)
    (args.out / "results.md").write_text(table)
    drawn = plot(results, args.out / "ttft_vs_tokens.png") if results["placements"][0]["latency"] else False
    if len(results["placements"]) > 1:
        plot_throughput(results, args.out / "throughput_vs_clients.png")
    print(table)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + (f", {args.out / 'ttft_vs_tokens.png'}" if drawn else " (no plot: matplotlib is not installed)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

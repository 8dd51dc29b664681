"""python -m bench.long_video: a 10-minute video through the real stack (issue 16), on one GPU.

    python -m bench.long_video --shape 7b --device cuda --redis-server PATH
    python -m bench.long_video --shape tiny --device cpu --long-clip small.mp4 --short-clip 360p ...  (a smoke run)

Starts the stack as `videollm bench` does (a random-weight checkpoint of --shape, Redis, the encoder and
the LLM on GPU 0, the gateway), each video uploaded to POST /v1/videos and asked about by its id, and
measures through REST, in this order:

1. The long request: --long-clip (default `720p-10min` of bench/clips.py: 1280x720, 30 fps, 10 min,
   ~8 Mbit/s) with `fps` --long-fps (1: 600 frames) and retain --long-retain (0.05). Each miss is a
   fresh upload (the clip remuxed with a tag: the same frames, other bytes, so neither Redis nor the
   LLM's prefix cache has it): the first miss (first use of the long shapes) and --repeats more
   (median), where their TTFT goes (decode, preprocess, queue, vision, projector, prefill, ...), the
   visual tokens against their bound ceil(r*T*196) + T + 1, then the same request again as a hit.
   Then the encoder's peak GPU memory (its Info; there is no reset, so this runs first).
2. The latency cells of `videollm bench` (bench.run.latency_cell: a miss and a hit inline, a miss
   and a hit by uploaded id, medians of --repeats) on --short-clip (default `720p-2min`) at --frames
   (64,256) and --retain (0.1).
3. Interference: a --short-frames (32) request on the short clip alone (a miss), then the same
   request (a fresh miss) sent --interference-delay-s after the long one starts (default: so that it
   reaches the tower a third into the long one's pass, from the long miss's and the short request's
   own timings), so it reaches the encoder's tower while the long one is in it; both TTFTs, and what the short one waited for the
   tower (its encoder queue time).
4. After the stack is stopped, transformers' monolithic model (bench/baseline.py) on the long clip:
   the most frames whose full tokens (196 a frame + 1) fit with the prompt and --max-tokens in the
   LLM's context (the LLM's max_context_tokens, 32,768; --baseline-context-tokens to change), frames
   sampled uniformly over the whole clip, and --baseline-frames (64) for reference.

Named clips are generated once into --clips-dir and read from there afterwards; the ones not there
yet are generated in background processes (niced) from the start, while the checkpoint is built and
the stack starts (on a 16-core machine: the 10-minute clip in about a minute, in parallel segments;
the 2-minute clip, one x264 thread for reproducible bytes, in about two). The checkpoint is kept in
--checkpoint-dir. Progress lines carry the time since the start; results.json and results.md in
--out are rewritten after each step, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.baseline import Monolithic
from bench.checkpoint import SHAPES, build_checkpoint
from bench.client import QUESTION, chat_body, chat_bytes, completion_body, stream_once, upload_video, video_content
from bench.clips import CLIPS, clip, clip_path, default_cache_dir, describe
from bench.run import clip_name, compression_for, environment, ints, latency_cell, miss_parts, service_memory
from bench.stack import Placement, start_stack
from bench.tables import fig
from bench.video import encode, moving_frames, variant
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "python -m bench.long_video"
MAX_VIDEO_BYTES = 2 << 30  # the stack's upload limit here, the encoder's too: a 10-minute clip is ~600 MB


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="checkpoint shape (random weights); tiny for "
                                                                      "a CPU smoke run")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--out", type=Path, help="folder for results.json/.md and the services' logs (default: "
                                                 "docs/bench/long-video-SHAPE-DEVICE)")
    parser.add_argument("--clips-dir", type=Path, default=default_cache_dir(),
                        help="where named clips are generated once and then read from (default: %(default)s)")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint is built, once (default: "
                                                            "CLIPS_DIR/ckpt-SHAPE)")
    parser.add_argument("--long-clip", default="720p-10min", help="the long video: a name of bench/clips.py or a "
                                                                  "video file (default: %(default)s)")
    parser.add_argument("--short-clip", default="720p-2min", help="the clip of the latency cells and the short "
                                                                  "request (default: %(default)s)")
    parser.add_argument("--long-fps", type=float, default=1.0, help="the long request's fps (default: %(default)s)")
    parser.add_argument("--long-retain", type=float, default=0.05, help="the long request's retain ratio")
    parser.add_argument("--frames", default="64,256", help="frame counts of the latency cells on the short clip")
    parser.add_argument("--retain", type=float, default=0.1, help="retain ratio of the latency cells and the short "
                                                                  "request")
    parser.add_argument("--short-frames", type=int, default=32, help="frames of the short request (interference)")
    parser.add_argument("--interference-delay-s", type=float,
                        help="seconds between the long request and the short one (default: the long miss's "
                             "gateway_in + decode + preprocess + queue, from step 1)")
    parser.add_argument("--baseline-frames", type=int, default=64, help="the baseline's reference frame count")
    parser.add_argument("--baseline-context-tokens", type=int,
                        help="the context the baseline's frames must fit in (default: the LLM's max_context_tokens)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (medians); the long request's first "
                                                               "miss is reported besides")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.out = args.out or Path("docs") / "bench" / f"long-video-{args.shape}-{args.device.split(':')[0]}"
    args.checkpoint_dir = args.checkpoint_dir or args.clips_dir / f"ckpt-{args.shape}"
    for spec in (args.long_clip, args.short_clip):
        if spec not in CLIPS and not Path(spec).is_file():
            parser.error(f"{spec!r} is neither a clip of bench/clips.py ({', '.join(CLIPS)}) nor a video file")
    if clip_name(args.long_clip) == clip_name(args.short_clip):
        parser.error("--long-clip and --short-clip need different names")
    return args


class Progress:
    """Progress lines with the wall-clock time and the seconds since the start."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - self.start:6.1f} s] {message}", flush=True)


class ClipSource:
    """A clip of the run: a video file, or a name of bench/clips.py, generated by `python -m
    bench.clips` in a background process (niced, its own process group) when it is not cached yet."""

    def __init__(self, spec: str, cache_dir: Path, log_dir: Path, progress: Progress):
        self.spec, self.name, self.cache_dir = spec, clip_name(spec), cache_dir
        self.process: subprocess.Popen | None = None
        self.generation_s: float | None = None  # None: cached or a file
        self._done = threading.Event()
        path = clip_path(spec, cache_dir) if spec in CLIPS else None
        if path is None or path.exists():
            self._done.set()
            return
        progress(f"generating the {self.name} clip in the background (log: {log_dir / f'clip-{self.name}.log'})")
        started = time.perf_counter()
        # a process group of its own (stopped as one: the generator and its encoding processes), niced so
        # that the stack's start and the measurements come first
        nice = [shutil.which("nice"), "-n", "10"] if shutil.which("nice") else []
        with open(log_dir / f"clip-{self.name}.log", "w") as log:
            self.process = subprocess.Popen([*nice, sys.executable, "-m", "bench.clips", spec, "--cache-dir",
                                             str(cache_dir.resolve())], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=ROOT)

        def wait() -> None:
            self.process.wait()
            self.generation_s = time.perf_counter() - started
            self._done.set()

        threading.Thread(target=wait, daemon=True).start()

    @property
    def ready(self) -> bool:
        return self._done.is_set()

    def data(self, progress: Progress) -> bytes:
        if not self.ready:
            progress(f"waiting for the {self.name} clip to be generated")
            self._done.wait()
        if self.process is not None:
            if self.process.returncode != 0:
                raise RuntimeError(f"generating the {self.name} clip failed (exit {self.process.returncode}); see "
                                   f"clip-{self.name}.log in the output folder")
            progress(f"the {self.name} clip was generated in {self.generation_s:.1f} s")
        return clip(self.spec, self.cache_dir) if self.spec in CLIPS else Path(self.spec).read_bytes()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it may have ended just now
                os.killpg(self.process.pid, signal.SIGTERM)  # its group: the generator and its encoding processes
            self.process.wait()


def long_body(video_id: str, args) -> dict:
    return completion_body(video_content(video_id, QUESTION), args.max_tokens,
                           videollm={"fps": args.long_fps, "compression": compression_for(args.long_retain)})


def short_body(video_id: str, args) -> dict:
    return chat_body(video_id, args.short_frames, compression_for(args.retain), args.max_tokens)


async def fresh_upload(client: httpx.AsyncClient, url: str, data: bytes, variants) -> tuple[str, float]:
    """New bytes of the clip (the same frames, remuxed with a tag) uploaded: (its id, ms of the upload)."""
    video = await asyncio.to_thread(variant, data, next(variants))
    start = time.perf_counter()
    video_id = (await upload_video(client, url, video))["id"]
    return video_id, (time.perf_counter() - start) * 1e3


def expect_cache(sample, said: str, what: str) -> None:
    if sample.cache != said:
        raise RuntimeError(f"{what}: x-videollm-cache should say {said}, it said {sample.cache!r} (is Redis working?)")


def encoder_timing(samples, key: str) -> float:
    return statistics.median(s.videollm["encoder_timings_ms"][key] for s in samples)


def breakdown(samples) -> dict:
    """Where a miss's TTFT goes (medians): bench.run's hops, with the encoder's preprocessing and queue."""
    return {**miss_parts(samples), "encoder_preprocess": encoder_timing(samples, "preprocess"),
            "encoder_queue": encoder_timing(samples, "queue"),
            "ttft": statistics.median(s.ttft_ms for s in samples)}


def token_bound(retain: float, frames: int, tokens_per_frame: int) -> int:
    """The most visual tokens EarlyTom sends for T frames at retain r: ceil(r*T*196) + T + 1."""
    return math.ceil(round(retain * frames * tokens_per_frame, 6)) + frames + 1


async def warm_up(client: httpx.AsyncClient, url: str) -> None:
    """First-use costs outside the timings: a request inline, an upload, a request by id (a small clip)."""
    small = await asyncio.to_thread(encode, moving_frames(48, 320, 240), "mp4", 24)
    await stream_once(client, url, chat_bytes(small, 4, {"method": "none"}, 4))
    uploaded = await upload_video(client, url, variant(small, 1))
    await stream_once(client, url, chat_body(uploaded["id"], 4, {"method": "none"}, 4))


async def long_request(client: httpx.AsyncClient, url: str, name: str, data: bytes, args, variants,
                       tokens_per_frame: int, progress: Progress) -> dict:
    misses, uploads = [], []
    for index in range(1 + args.repeats):
        video_id, upload_ms = await fresh_upload(client, url, data, variants)
        uploads.append(upload_ms)
        sample = await stream_once(client, url, long_body(video_id, args))
        expect_cache(sample, "miss", "the long request")
        misses.append(sample)
        timings, encoder = sample.videollm["timings_ms"], sample.videollm["encoder_timings_ms"]
        progress(f"  long miss {index + 1}/{1 + args.repeats}{' (first)' if index == 0 else ''}: TTFT "
                 f"{sample.ttft_ms:.0f} ms, {sample.videollm.get('frames')} frames, "
                 f"{sample.videollm.get('visual_tokens')} tokens; decode {encoder['decode']:.0f}, vision "
                 f"{encoder['vision']:.0f}, prefill {timings['prefill']:.0f} ms; upload {upload_ms:.0f} ms")
    hits = []
    for _ in range(args.repeats):
        hits.append(await stream_once(client, url, long_body(video_id, args)))
        expect_cache(hits[-1], "hit", "the long request asked again")
    progress(f"  long hit: TTFT {statistics.median(s.ttft_ms for s in hits):.0f} ms")
    first, timed = misses[0], misses[1:]
    meta = timed[-1].videollm
    frames = meta["frames"]
    sampling = meta.get("sampling", {})
    stamps = sampling.get("timestamps_s") or [None]
    return {
        "clip": name,
        "fps": args.long_fps,
        "retain": args.long_retain,
        "frames": frames,
        "frames_after_merge": meta.get("frames_after_merge", frames),
        "visual_tokens": meta["visual_tokens"],
        "visual_token_bound": token_bound(args.long_retain, frames, tokens_per_frame),
        "uncompressed_tokens": frames * tokens_per_frame + 1,
        "first_timestamp_s": stamps[0],
        "last_timestamp_s": stamps[-1],
        "ttft_miss_first_ms": first.ttft_ms,
        "ttft_miss_ms": statistics.median(s.ttft_ms for s in timed),
        "ttft_miss_all_ms": [s.ttft_ms for s in misses],  # the first one included
        "ttft_hit_ms": statistics.median(s.ttft_ms for s in hits),
        "ttft_hit_all_ms": [s.ttft_ms for s in hits],
        "upload_ms": statistics.median(uploads),
        "upload_bytes": len(data),
        "miss_first_parts_ms": breakdown([first]),
        "miss_parts_ms": breakdown(timed),
        "cache": {"miss": [s.cache for s in misses], "hit": [s.cache for s in hits]},
        "completion_tokens": first.completion_tokens,
    }


def default_delay_s(long: dict, short_alone: list) -> float:
    """When to send the short request so that it reaches the tower a third into the long one's
    pass: the long miss's way to the tower (the gateway's part before the Encode call, the
    encoder's decoding, preprocessing and queue) and a third of its tower time, less the short
    one's own way to the tower (measured alone)."""
    parts, short = long["miss_parts_ms"], breakdown(short_alone)
    to_tower = parts["gateway_in"] + parts["encoder_decode"] + parts["encoder_preprocess"] + parts["encoder_queue"]
    short_to_tower = short["gateway_in"] + short["encoder_decode"] + short["encoder_preprocess"]
    return max(0.0, to_tower + parts["encoder_vision"] / 3 - short_to_tower) / 1e3


def request_figures(samples) -> dict:
    return {"ttft_ms": statistics.median(s.ttft_ms for s in samples), "ttft_all_ms": [s.ttft_ms for s in samples],
            "encoder_queue_ms": encoder_timing(samples, "queue"),
            "encoder_queue_all_ms": [s.videollm["encoder_timings_ms"]["queue"] for s in samples],
            "encoder_decode_ms": encoder_timing(samples, "decode"),
            "encoder_vision_ms": encoder_timing(samples, "vision"),
            "encoder_total_ms": encoder_timing(samples, "total"),
            "frames": samples[-1].videollm.get("frames"), "visual_tokens": samples[-1].videollm.get("visual_tokens")}


async def interference(client: httpx.AsyncClient, url: str, long_data: bytes, short_data: bytes, args, variants,
                       long: dict, progress: Progress) -> dict:
    """The short request alone, then sent while the long one is in the encoder's tower."""
    short_id, _ = await fresh_upload(client, url, short_data, variants)
    await stream_once(client, url, short_body(short_id, args))  # warm-up of the short request's shape
    alone = []
    for _ in range(args.repeats):
        short_id, _ = await fresh_upload(client, url, short_data, variants)
        alone.append(await stream_once(client, url, short_body(short_id, args)))
        expect_cache(alone[-1], "miss", "the short request alone")
    progress(f"  short request alone: TTFT {statistics.median(s.ttft_ms for s in alone):.0f} ms")
    given = args.interference_delay_s is not None
    delay_s = args.interference_delay_s if given else default_delay_s(long, alone)
    shorts, longs, long_done_first, short_first = [], [], [], []
    for index in range(args.repeats):
        long_id, _ = await fresh_upload(client, url, long_data, variants)
        short_id, _ = await fresh_upload(client, url, short_data, variants)
        long_task = asyncio.create_task(stream_once(client, url, long_body(long_id, args)))
        await asyncio.sleep(delay_s)
        short = await stream_once(client, url, short_body(short_id, args))
        long_sample = await long_task
        long_done_first.append(long_sample.ttft_ms < delay_s * 1e3)  # too long a delay: no interference measured
        for sample, what in ((short, "the short request"), (long_sample, "the long request")):
            expect_cache(sample, "miss", f"{what} (interference)")
        shorts.append(short)
        longs.append(long_sample)
        short_first.append(delay_s * 1e3 + short.ttft_ms < long_sample.ttft_ms)
        progress(f"  interference {index + 1}/{args.repeats}: short TTFT {short.ttft_ms:.0f} ms (encoder queue "
                 f"{short.videollm['encoder_timings_ms']['queue']:.0f} ms), long TTFT {long_sample.ttft_ms:.0f} ms, "
                 f"short sent {delay_s:.2f} s after the long")
    return {
        "delay_s": delay_s,
        "delay_source": "--interference-delay-s" if given else
        "the long miss's way to the tower and a third of its tower time, less the short one's way to the tower "
        "(medians)",
        "short_clip": clip_name(args.short_clip),
        "short_frames": args.short_frames,
        "retain": args.retain,
        "short_alone": request_figures(alone),
        "short_during_long": request_figures(shorts),
        "long_with_short": request_figures(longs),
        "long_alone_ttft_ms": long["ttft_miss_ms"],
        "long_first_token_before_short_sent": long_done_first,
        "short_first_token_before_long": short_first,
    }


def service_info(running) -> dict:
    """What the encoder and the LLM say of themselves: the settings that shape a long request."""
    import grpc

    with grpc.insecure_channel(running.encoder_addresses[0]) as channel:
        encoder = encoder_pb2_grpc.EncoderStub(channel).Info(encoder_pb2.InfoRequest())
    with grpc.insecure_channel(running.llm_addresses[0]) as channel:
        llm = llm_pb2_grpc.LLMStub(channel).Info(llm_pb2.LLMInfoRequest())
    settings = json.loads(encoder.settings_json or "{}")
    return {"encoder": {"max_frames": encoder.max_frames, "tokens_per_frame": encoder.tokens_per_frame,
                        "max_video_bytes": encoder.max_video_bytes, "chunk_frames": settings.get("chunk_frames"),
                        "max_frames_in_flight": settings.get("max_frames_in_flight"), "dtype": encoder.dtype},
            "llm": {"max_context_tokens": llm.max_context_tokens, "decode_slots": llm.decode_slots,
                    "dtype": llm.dtype}}


async def measure_stack(running, long_clip: ClipSource, short_clip: ClipSource, args, results: dict, save,
                        progress: Progress) -> None:
    url = running.url
    variants = itertools.count(1)
    results["services"] = service_info(running)
    tokens_per_frame = results["services"]["encoder"]["tokens_per_frame"] or 196
    async with httpx.AsyncClient(timeout=900) as client:
        progress("warming up (a small clip inline and by id)")
        await warm_up(client, url)
        long_data = await asyncio.to_thread(long_clip.data, progress)
        results["clips"][long_clip.name] = {"source": _source(long_clip), **describe(long_data),
                                            "generation_s": long_clip.generation_s}
        progress(f"the long request: {long_clip.name}, fps {args.long_fps}, retain {args.long_retain}, "
                 f"{1 + args.repeats} misses (fresh uploads of {len(long_data) / 1e6:.0f} MB), then "
                 f"{args.repeats} hit{'s' if args.repeats > 1 else ''}"
                 + ("" if short_clip.ready else f" (the {short_clip.name} clip is still being generated, niced)"))
        results["long"] = await long_request(client, url, long_clip.name, long_data, args, variants,
                                             tokens_per_frame, progress)
        results["long"]["short_clip_generating_meanwhile"] = not short_clip.ready
        memory = service_memory(running)
        results["long"]["encoder_peak_memory_bytes"] = next(v for k, v in memory.items() if k.startswith("encoder"))
        results["long"]["llm_peak_memory_bytes"] = next(v for k, v in memory.items() if k.startswith("llm"))
        save()
        short_data = await asyncio.to_thread(short_clip.data, progress)
        results["clips"][short_clip.name] = {"source": _source(short_clip), **describe(short_data),
                                             "generation_s": short_clip.generation_s}
        store = redis.Redis.from_url(running.redis_url)
        results["latency"] = []
        for frames in ints(args.frames):
            progress(f"latency cell: {short_clip.name}, {frames} frames, retain {args.retain}")
            store.flushall()  # Redis holds one cell's encodings at a time, as in videollm bench
            row = await latency_cell(client, url, short_clip.name, short_data, frames, args.retain, args, variants)
            row["visual_token_bound"] = token_bound(args.retain, frames, tokens_per_frame)
            results["latency"].append(row)
            progress(f"  TTFT miss {row['ttft_miss_ms']:.0f} / hit {row['ttft_hit_ms']:.0f} ms inline, miss "
                     f"{row['ttft_miss_id_ms']:.0f} / hit {row['ttft_hit_id_ms']:.0f} ms by id; "
                     f"{row['visual_tokens']} tokens")
            save()
        store.flushall()
        store.close()
        progress(f"interference: {args.short_frames} frames of {short_clip.name} alone, then inside the long request")
        results["interference"] = await interference(client, url, long_data, short_data, args, variants,
                                                     results["long"], progress)
        results["interference"]["visual_token_bound"] = token_bound(args.retain, args.short_frames, tokens_per_frame)
        save()


def _source(source: ClipSource) -> str:
    return "bench/clips.py" if source.spec in CLIPS else source.spec


def measure_baseline(model_dir: Path, long_name: str, long_data: bytes, args, context_tokens: int,
                     progress: Progress) -> dict:
    import torch

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    device = "cuda:0" if args.device.startswith("cuda") else "cpu"
    monolithic = Monolithic(model_dir, device, dtype)
    try:
        fit = monolithic.frames_that_fit(context_tokens, args.max_tokens)
        entry = {"clip": long_name, "context_tokens": context_tokens, "max_tokens": args.max_tokens,
                 "prompt_text_tokens": len(monolithic.prompt_ids()) - 1, "frames_that_fit": fit, "rows": []}
        progress(f"the baseline: at most {fit} frames fit in {context_tokens} tokens with the prompt and "
                 f"{args.max_tokens} generated")
        for frames, why in ((fit, "the most that fit"), (args.baseline_frames, "reference")):
            if frames <= 0:
                continue
            progress(f"  baseline, {frames} frames ({why}), {args.repeats} timed runs after one warm-up")
            measured = monolithic.measure(long_data, frames, args.max_tokens, args.repeats)
            entry["rows"].append({"frames": frames, "why": why, **measured})
            progress(f"  baseline, {frames} frames: TTFT {measured['ttft_ms']:.0f} ms")
        return entry
    finally:
        monolithic.close()


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"# Long video through the stack: {results['shape']} shape, random weights", "",
             f"{env['date']} · GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · "
             f"Python {env['python']}", f"Command: `{env['command']}`", ""]
    services = results.get("services")
    if services:
        enc, llm = services["encoder"], services["llm"]
        lines += [f"Encoder: chunk_frames {enc['chunk_frames']}, max_frames {enc['max_frames']}, "
                  f"max_frames_in_flight {enc['max_frames_in_flight']}, {enc['dtype']}; LLM: context "
                  f"{llm['max_context_tokens']} tokens, {llm['decode_slots']} decode slots. Every video is uploaded "
                  "once (POST /v1/videos) and asked about by its id; every miss is a new upload (the clip remuxed: "
                  "the same frames, other bytes).", ""]
    if results.get("clips"):
        lines += ["## Clips", "", "| clip | source | resolution | codec, profile | duration s | frames | keyframes | "
                  "MB | Mbit/s | generated in s |", "|---" * 10 + "|"]
        for name, c in results["clips"].items():
            lines.append(f"| {name} | {c['source']} | {c['width']}x{c['height']} | {c['codec']}, {c['profile']} | "
                         f"{c['duration_s']} | {c['frames']} | {c['keyframes']} | {c['bytes'] / 1e6:.1f} | "
                         f"{c['mbit_per_s']} | {fig(c, 'generation_s')} |")
        lines.append("")
    long = results.get("long")
    if long:
        repeats = len(long["ttft_miss_all_ms"]) - 1
        lines += [f"## The long request: {long['frames']} frames (fps {long['fps']}) of {long['clip']}, retain "
                  f"{long['retain']}", "",
                  f"A miss: the first (first use of these shapes) and the median of the {repeats} after it; a hit: "
                  f"the same request again (median of {len(long['ttft_hit_all_ms'])}). Bound: ceil(r*T*196) + T + 1 "
                  f"visual tokens; uncompressed {long['uncompressed_tokens']}.", "",
                  "| clip | fps | frames | frames after merge | visual tokens | bound | TTFT miss, first ms | "
                  "TTFT miss ms | TTFT hit ms | upload ms | encoder peak GPU GiB |", "|---" * 11 + "|",
                  f"| {long['clip']} | {long['fps']} | {long['frames']} | {long['frames_after_merge']} | "
                  f"{long['visual_tokens']} | {long['visual_token_bound']} | {long['ttft_miss_first_ms']:.1f} | "
                  f"{long['ttft_miss_ms']:.1f} | {long['ttft_hit_ms']:.1f} | {long['upload_ms']:.0f} | "
                  f"{long.get('encoder_peak_memory_bytes', 0) / 2**30:.2f} |", "",
                  "## Where the long miss's TTFT goes (ms)", "",
                  "Encoder: decode, preprocess, queue (waiting for room among the frames in flight, then for the "
                  "tower), vision (the tower with EarlyTom), projector, its total; encode call: the gateway's Encode "
                  "call (the encoder's total inside); LLM: hand-off, prefill, its TTFT; client beyond gateway: HTTP "
                  "and SSE on the client's side.", "",
                  "| miss | TTFT | " + " | ".join(PART_NAMES.values()) + " |", "|---" * (2 + len(PART_NAMES)) + "|"]
        for label, key in (("first", "miss_first_parts_ms"), (f"median of {repeats}", "miss_parts_ms")):
            parts = long[key]
            lines.append(f"| {label} | {parts['ttft']:.1f} | " + " | ".join(fig(parts, k) for k in PART_NAMES) + " |")
        lines.append("")
    latency = results.get("latency")
    if latency:
        lines += [f"## Latency on {latency[0]['clip']} (`videollm bench`'s latency cells)", "",
                  "Medians; a miss and a hit inline (the same data URL again), and by an uploaded id.", "",
                  "| clip | frames | retain | frames after merge | visual tokens | bound | TTFT miss ms | "
                  "TTFT hit ms | TTFT miss ms (id) | TTFT hit ms (id) | encode ms | decode ms | vision ms | "
                  "prefill ms |",
                  "|---" * 14 + "|"]
        for row in latency:
            lines.append(f"| {row['clip']} | {row['frames']} | {row['retain']} | {row['frames_after_merge']} | "
                         f"{row['visual_tokens']} | {row.get('visual_token_bound', '-')} | "
                         + " | ".join(fig(row, k) for k in ("ttft_miss_ms", "ttft_hit_ms", "ttft_miss_id_ms",
                                                            "ttft_hit_id_ms", "encode_ms", "encoder_decode_ms",
                                                            "encoder_vision_ms", "prefill_ms")) + " |")
        lines.append("")
    inter = results.get("interference")
    if inter:
        n = len(inter["short_alone"]["ttft_all_ms"])
        first = sum(inter["short_first_token_before_long"])
        lines += [f"## Interference: {inter['short_frames']} frames of {inter['short_clip']} while the long request "
                  "is in the encoder", "",
                  f"The short request (a fresh miss, retain {inter['retain']}) sent {inter['delay_s']:.2f} s after the "
                  f"long one ({inter['delay_source']}); medians of {n}. Encoder queue: what the request waited for "
                  f"room and for the tower. The short one had its first token before the long one in {first} of "
                  f"{n} runs" + (f"; the long one had its first token before the short one was sent in "
                                 f"{sum(inter['long_first_token_before_short_sent'])}"
                                 if any(inter["long_first_token_before_short_sent"]) else "") + ".", "",
                  "| request | TTFT ms | TTFTs ms | encoder queue ms | encoder decode ms | encoder vision ms | "
                  "encoder total ms |", "|---" * 7 + "|"]
        for label, key in ((f"{inter['short_frames']} frames, alone", "short_alone"),
                           (f"{inter['short_frames']} frames, during the long request", "short_during_long"),
                           ("the long request, with the short one", "long_with_short")):
            row = inter[key]
            lines.append(f"| {label} | {row['ttft_ms']:.1f} | {', '.join(f'{v:.0f}' for v in row['ttft_all_ms'])} | "
                         + " | ".join(fig(row, k) for k in ("encoder_queue_ms", "encoder_decode_ms",
                                                            "encoder_vision_ms", "encoder_total_ms")) + " |")
        lines += [f"| the long request, alone (above) | {inter['long_alone_ttft_ms']:.1f} | | | | | |", ""]
    base = results.get("baseline")
    if base:
        lines += [f"## Baseline: transformers' monolithic `generate` on {base['clip']}, full tokens", "",
                  f"Its context of {base['context_tokens']} tokens holds the prompt's {base['prompt_text_tokens']} "
                  f"text tokens, {base['max_tokens']} generated and at most {base['frames_that_fit']} frames "
                  f"({base['frames_that_fit']} x 196 + 1 visual tokens), sampled uniformly over the whole clip; "
                  "in-process, medians of the timed runs after a warm-up.", "",
                  "| frames | why | visual tokens | TTFT ms | decode + preprocess ms | vision ms | prefill ms | "
                  "peak GPU GiB |", "|---" * 8 + "|"]
        for row in base["rows"]:
            lines.append(f"| {row['frames']} | {row['why']} | {row['visual_tokens']} | {row['ttft_ms']:.1f} | "
                         f"{row['decode_ms'] + row['preprocess_ms']:.1f} | {row['vision_ms']:.1f} | "
                         f"{row['prefill_ms']:.1f} | {row['peak_memory_bytes'] / 2**30:.2f} |")
        lines.append("")
    return "\n".join(lines)


PART_NAMES = {"encoder_decode": "decode", "encoder_preprocess": "preprocess", "encoder_queue": "queue",
              "encoder_vision": "vision", "encoder_projector": "projector", "encoder_total": "encoder total",
              "encode_call": "encode call", "handoff": "hand-off", "prefill": "prefill", "llm_ttft": "LLM TTFT",
              "gateway_in": "gateway in", "client_beyond_gateway": "client beyond gateway"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.argv = argv
    progress = Progress()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"shape": args.shape, "environment": environment(args, PROGRAM), "args": vars(args), "clips": {}}

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / "results.md").write_text(report(results))

    # the clips first: they generate in the background while the checkpoint is built and the stack starts
    long_clip = ClipSource(args.long_clip, args.clips_dir, args.out, progress)
    short_clip = ClipSource(args.short_clip, args.clips_dir, args.out, progress)
    store_dir = Path(tempfile.mkdtemp(prefix="videollm-long-video-store-"))  # the uploads: GBs, removed at the end
    try:
        progress(f"building the {args.shape} checkpoint in {args.checkpoint_dir} (kept for the next run)")
        model_dir = build_checkpoint(args.shape, args.checkpoint_dir, args.device)
        cuda = args.device.startswith("cuda")
        placement = Placement(["0"], ["0"]) if cuda else Placement([""], [""])
        progress(f"starting the stack: {placement.describe() if cuda else 'on the CPU'}")
        running = start_stack(model_dir, placement, args.device, args.redis_server, args.out,
                              max_upload_bytes=MAX_VIDEO_BYTES,
                              encoder_args=["--max-video-bytes", str(MAX_VIDEO_BYTES)],
                              env={"VIDEOLLM_GATEWAY_VIDEO_STORE_DIR": str(store_dir),
                                   "VIDEOLLM_ENCODER_VIDEO_STORE_DIR": str(store_dir)})
        progress("the stack is up")
        try:
            asyncio.run(measure_stack(running, long_clip, short_clip, args, results, save, progress))
        finally:
            running.stop()
            shutil.rmtree(store_dir, ignore_errors=True)
        progress("the stack is stopped")
        if not args.skip_baseline:
            context = args.baseline_context_tokens or results["services"]["llm"]["max_context_tokens"]
            long_data = long_clip.data(progress)
            results["baseline"] = measure_baseline(model_dir, long_clip.name, long_data, args, context, progress)
            save()
    finally:
        long_clip.stop()
        short_clip.stop()
        shutil.rmtree(store_dir, ignore_errors=True)
        save()
    table = report(results)
    print(table)
    progress(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

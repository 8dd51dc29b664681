"""videollm bench: the real stack against transformers' monolithic model, in one run, on one machine.

    python -m bench.run --shape 7b --device cuda --out docs/bench-7b      (or: videollm bench ...)

Builds a random-weight checkpoint at the chosen shape, generates the benchmark clip, starts Redis,
the encoder and LLM replicas (placed on GPUs by --placement) and the gateway as separate processes,
and measures through REST: TTFT on cache miss and hit, encoder, prefill and decode figures for each
frame count and retain ratio, and throughput with concurrent clients. Then it stops the stack and
measures the monolithic model on the same GPU: one request at a time in-process (TTFT, decode), and
(--baseline-throughput measured, the default) its throughput behind bench/baseline_server.py, an
HTTP front in its own process that serves one request at a time, driven by the same closed-loop
clients and request counts as videollm's throughput runs. --baseline-throughput modeled computes
the baseline's throughput from the one measured request instead (req/s = 1000 / service_ms; the
tables and results.json label it "modeled" with the formula); both does both. It prints a markdown
table, writes results.json, results.md and (when matplotlib is importable) ttft_vs_tokens.png into
--out.

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
from bench.client import chat_body, closed_loop, stream_once
from bench.stack import Placement, start_stack
from bench.video import benchmark_clip, variant
from protos.videollm.v1 import encoder_pb2, encoder_pb2_grpc, llm_pb2, llm_pb2_grpc


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="videollm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b", help="checkpoint shape (random weights)")
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint is built (default: OUT/../ckpt-SHAPE)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for results.json/.md/.png")
    parser.add_argument("--frames", default="32,64", help="frame counts of the latency matrix")
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


async def latency_matrix(url: str, redis_url: str, clip: bytes, args) -> list[dict]:
    store = redis.Redis.from_url(redis_url)
    rows = []
    async with httpx.AsyncClient(timeout=900) as client:
        await stream_once(client, url, chat_body(variant(clip, 10_000), 8, {"method": "none"}, 4))  # warm-up
        variants = iter(range(20_000, 30_000))
        for frames in ints(args.frames):
            for retain in floats(args.retain):
                warm = chat_body(variant(clip, next(variants)), frames, compression_for(retain), args.max_tokens)
                await stream_once(client, url, warm)  # warm-up of this shape
                misses, hits = [], []
                for _ in range(args.repeats):
                    # new bytes, same frames: a miss in Redis and in the LLM's prefix cache
                    body = chat_body(variant(clip, next(variants)), frames, compression_for(retain), args.max_tokens)
                    misses.append(await stream_once(client, url, body))
                    hits.append(await stream_once(client, url, body))
                assert all(s.cache == "miss" for s in misses) and all(s.cache == "hit" for s in hits)
                meta = misses[-1].videollm
                median = statistics.median
                rows.append({
                    "frames": frames,
                    "retain": retain,
                    "frames_after_merge": meta.get("frames_after_merge", frames),
                    "visual_tokens": meta.get("visual_tokens"),
                    "ttft_miss_ms": median(s.ttft_ms for s in misses),
                    "ttft_hit_ms": median(s.ttft_ms for s in hits),
                    "encode_ms": median(s.videollm["timings_ms"]["encode"] for s in misses),
                    "encoder_vision_ms": median(s.videollm["encoder_timings_ms"]["vision"] for s in misses),
                    "encoder_decode_ms": median(s.videollm["encoder_timings_ms"]["decode"] for s in misses),
                    "prefill_ms": median(s.videollm["timings_ms"]["prefill"] for s in misses),
                    "prefill_hit_ms": median(s.videollm["timings_ms"]["prefill"] for s in hits),
                    "handoff_miss_ms": median(s.videollm["timings_ms"]["handoff"] for s in misses),
                    "handoff_hit_ms": median(s.videollm["timings_ms"]["handoff"] for s in hits),
                    "gateway_ttft_hit_ms": median(s.videollm["timings_ms"]["ttft"] for s in hits),
                    "llm_ttft_hit_ms": median(s.videollm["timings_ms"]["llm_ttft"] for s in hits),
                    "decode_tokens_per_s": median(s.videollm["decode_tokens_per_s"] for s in misses + hits),
                    "completion_tokens": misses[-1].completion_tokens,
                    "flops": meta.get("flops"),
                    "miss_parts_ms": miss_parts(misses),
                })
                print(f"  {frames} frames, retain {retain}: {json.dumps(rows[-1], default=str)[:300]}", flush=True)
    store.close()
    return rows


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


async def throughput(url: str, redis_url: str, clip: bytes, args, counter: list[int], replicas: int) -> list[dict]:
    """Closed-loop runs per retain ratio and client count, after untimed warm-up requests that reach
    every replica (first-use costs: CUDA graph captures, kernel plans for new shapes)."""
    store = redis.Redis.from_url(redis_url)
    rows = []
    for retain in floats(args.throughput_retain):
        warm = []
        for _ in range(2 * replicas):
            counter[0] += 1
            warm.append(chat_body(variant(clip, counter[0]), args.throughput_frames, compression_for(retain),
                                  args.max_tokens))
        await closed_loop(url, warm, 2 * replicas)
        for clients in ints(args.clients):
            store.flushall()
            bodies = []
            for _ in range(clients * args.requests_per_client):
                counter[0] += 1
                bodies.append(chat_body(variant(clip, counter[0]), args.throughput_frames, compression_for(retain),
                                        args.max_tokens))
            result = await closed_loop(url, bodies, clients)
            result["retain"] = retain
            rows.append(result)
            print(f"  retain {retain}, {clients} clients: {json.dumps(result)[:300]}", flush=True)
    store.close()
    return rows


async def baseline_throughput(url: str, clip: bytes, args, counter: list[int]) -> list[dict]:
    """The baseline server under the same closed-loop clients as videollm's throughput runs: the same
    client code, clients and requests per client, each request a new video at --throughput-frames
    (full tokens: the baseline has no compression), after one untimed warm-up request (the server
    has one worker, and the first request pays its first-use costs)."""
    def bodies(count: int) -> list[dict]:
        made = []
        for _ in range(count):
            counter[0] += 1
            made.append(chat_body(variant(clip, counter[0]), args.throughput_frames, {"method": "none"},
                                  args.max_tokens))
        return made

    await closed_loop(url, bodies(1), 1)
    rows = []
    for clients in ints(args.clients):
        result = await closed_loop(url, bodies(clients * args.requests_per_client), clients)
        result.pop("encoder_batch_mean", None)  # no encoder
        result.update(kind="measured", frames=args.throughput_frames, max_tokens=args.max_tokens,
                      note="transformers' monolithic generate behind bench/baseline_server.py (one request at "
                           "a time, streamed over HTTP), driven by the same closed-loop clients")
        rows.append(result)
        print(f"  baseline, {clients} clients: {json.dumps(result)[:300]}", flush=True)
    return rows


def environment(args) -> dict:
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
        "command": "videollm bench " + " ".join(args.argv),
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


def report(results: dict) -> str:
    env = results["environment"]
    lines = [f"# videollm benchmark: {results['shape']} shape, random weights",
             "",
             f"{env['date']} · GPU: {env['gpu']} · torch {env['torch']} · transformers {env['transformers']} · "
             f"Python {env['python']}",
             f"Command: `{env['command']}`",
             f"Placement of the latency matrix: {results['placements'][0]['placement']}",
             ""]
    baseline = {b["frames"]: b for b in results.get("baseline", [])}
    lines += ["## Latency (one request at a time, through REST, streamed)", "",
              "| frames | retain | frames after merge | visual tokens | TTFT miss ms | TTFT hit ms | encode ms | "
              "prefill ms | hand-off ms miss/hit | hit TTFT in gateway/LLM ms | decode tok/s | "
              "baseline TTFT ms (measured) | miss speed-up | hit speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["placements"][0].get("latency", []):
        base = baseline.get(row["frames"])
        compared = (f"{base['ttft_ms']:.1f} | {base['ttft_ms'] / row['ttft_miss_ms']:.2f}x | "
                    f"{base['ttft_ms'] / row['ttft_hit_ms']:.2f}x" if base else "- | - | -")
        lines.append(
            f"| {row['frames']} | {row['retain']} | {row['frames_after_merge']} | {row['visual_tokens']} | "
            f"{row['ttft_miss_ms']:.1f} | {row['ttft_hit_ms']:.1f} | {row['encode_ms']:.1f} | {row['prefill_ms']:.1f} | "
            f"{row['handoff_miss_ms']:.1f}/{row['handoff_hit_ms']:.1f} | "
            f"{row['gateway_ttft_hit_ms']:.1f}/{row['llm_ttft_hit_ms']:.1f} | {row['decode_tokens_per_s']:.1f} | {compared} |")
    parts = [row for row in results["placements"][0].get("latency", []) if "miss_parts_ms" in row]
    if parts:
        names = list(parts[0]["miss_parts_ms"])
        lines += ["", "## Where a miss's TTFT goes (medians, ms)", "",
                  "client beyond gateway = upload, body parsing and SSE; encode call holds the encoder's total "
                  "(decode, vision, projector inside it); LLM call holds the LLM's TTFT (hand-off, prefill inside it).",
                  "", "| frames | retain | TTFT miss | " + " | ".join(n.replace("_", " ") for n in names) + " |",
                  "|---" * (3 + len(names)) + "|"]
        for row in parts:
            lines.append(f"| {row['frames']} | {row['retain']} | {row['ttft_miss_ms']:.1f} | "
                         + " | ".join(f"{row['miss_parts_ms'][n]:.1f}" for n in names) + " |")
    if baseline:
        lines += ["", "## Baseline: transformers' monolithic `generate`, full tokens (measured in-process, one request "
                  "at a time)", "",
                  "| frames | visual tokens | TTFT ms | decode+preprocess ms | vision ms | prefill ms | decode ms/token | "
                  "peak GPU GiB |", "|---|---|---|---|---|---|---|---|"]
        for b in results["baseline"]:
            lines.append(f"| {b['frames']} | {b['visual_tokens']} | {b['ttft_ms']:.1f} | "
                         f"{b['decode_ms'] + b['preprocess_ms']:.1f} | {b['vision_ms']:.1f} | {b['prefill_ms']:.1f} | "
                         f"{b['decode_ms_per_token']:.2f} | {b['peak_memory_bytes'] / 2**30:.1f} |")
    base_tp = results.get("baseline_throughput", [])
    kinds = [kind for kind in ("measured", "modeled") if any(baseline_kind(b) == kind for b in base_tp)]
    by_kind = {(baseline_kind(b), b["clients"]): b for b in base_tp}
    header = "| placement | retain | clients | requests | errors | req/s | TTFT p50 ms | TTFT p99 ms | encoder batch |"
    for kind in kinds:
        header += f" baseline req/s ({kind}) | baseline TTFT p50/p99 ms ({kind}) | req/s ratio (vs {kind} baseline) |"
    lines += ["", "## Throughput (closed-loop clients, each request a different video: all cache misses)", "",
              "`encoder batch`: requests whose frames went through the vision tower together, on average.", "",
              header, "|---" * (9 + 3 * len(kinds)) + "|"]
    for placement in results["placements"]:
        for row in placement["throughput"]:
            cells = (f"| {placement['placement']} | {row['retain']} | {row['clients']} | {row['requests']} | "
                     f"{row['errors']} | {row['rps']:.2f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                     f"{row['encoder_batch_mean']:.2f} |")
            for kind in kinds:
                b = by_kind.get((kind, row["clients"]))
                if b is None:
                    cells += " - | - | - |"
                    continue
                ratio = f"{row['rps'] / b['rps']:.2f}x" if b["rps"] > 0 else "-"
                cells += f" {b['rps']:.2f} | {b['ttft_p50_ms']:.0f}/{b['ttft_p99_ms']:.0f} | {ratio} |"
            lines.append(cells)
    if base_tp:
        lines += ["", "## Baseline throughput: transformers' monolithic `generate`, one request at a time", ""]
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
        for name, value in placement["memory"].items():
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
    for frames in sorted({r["frames"] for r in results["placements"][0]["latency"]}):
        rows = [r for r in results["placements"][0]["latency"] if r["frames"] == frames]
        ax.plot([r["visual_tokens"] for r in rows], [r["ttft_miss_ms"] for r in rows], "o-",
                label=f"videollm, {frames} frames, miss")
        ax.plot([r["visual_tokens"] for r in rows], [r["ttft_hit_ms"] for r in rows], "s--",
                label=f"videollm, {frames} frames, hit")
    for b in results.get("baseline", []):
        ax.plot([b["visual_tokens"]], [b["ttft_ms"]], "k*", markersize=12)
        ax.annotate(f"transformers, {b['frames']} frames", (b["visual_tokens"], b["ttft_ms"]),
                    textcoords="offset points", xytext=(-60, 8))
    _finish(fig, ax, path, "visual tokens sent to the LLM", "time to first token, ms",
            f"TTFT vs retained tokens ({results['shape']}, {results['environment']['gpu']})", legend_size=8)
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
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint_dir or args.out.parent / f"ckpt-{args.shape}"
    print(f"building the {args.shape} checkpoint in {checkpoint}", flush=True)
    model_dir = build_checkpoint(args.shape, checkpoint, args.device)
    clip = benchmark_clip()
    results = {"shape": args.shape, "environment": environment(args), "placements": [], "args": vars(args)}
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
                entry["latency"] = asyncio.run(latency_matrix(running.url, running.redis_url, clip, args))
            replicas = len(placement.encoders) + len(placement.llms)
            entry["throughput"] = asyncio.run(
                throughput(running.url, running.redis_url, clip, args, counter, replicas))
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
        for frames in ints(args.frames):
            measured = monolithic.measure(clip, frames, args.max_tokens, args.repeats)
            measured["frames"] = frames
            results["baseline"].append(measured)
            print(f"  baseline {frames} frames: {json.dumps(measured)[:300]}", flush=True)
        results["baseline_throughput"] = []
        if args.baseline_throughput in ("modeled", "both"):  # from one measured request, labelled "modeled"
            base = next(b for b in results["baseline"] if b["frames"] == args.throughput_frames) \
                if any(b["frames"] == args.throughput_frames for b in results["baseline"]) else results["baseline"][0]
            results["baseline_throughput"] = [dict(queueing(base["service_ms"], base["ttft_ms"], c),
                                                   frames=base["frames"], max_tokens=args.max_tokens)
                                              for c in ints(args.clients)]
        monolithic.close()
        del monolithic
        if args.baseline_throughput in ("measured", "both"):
            print("measuring the monolithic model's throughput behind a one-at-a-time HTTP server", flush=True)
            url, server = start_server(model_dir, device, "bfloat16" if dtype == torch.bfloat16 else "float32",
                                       args.out / "baseline_server.log")
            try:
                results["baseline_throughput"][:0] = asyncio.run(baseline_throughput(url, clip, args, counter))
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

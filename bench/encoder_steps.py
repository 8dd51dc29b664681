"""Time the encoder service's parts alone, on the benchmark clip
(python -m bench.encoder_steps --shape 7b --device cuda).

No gRPC, no gateway: decoding, preprocessing, the SigLIP tower with EarlyTom, projector and
selection, and the copy of the tokens to the host, each the median over repeats, beside the
tower's FLOP floor. --profile prints the device kernels that take the most time in one encode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from bench.checkpoint import add_checkpoint_arguments, build_checkpoint
from bench.timing import median_ms
from bench.video import benchmark_clip

PARTS = ("decode_ms", "preprocess_ms", "vision_ms", "stage1_ms", "importance_ms", "projector_ms", "stage2_ms",
         "total_ms")


@torch.inference_mode()
def _check_graphs(vision) -> None:
    """The layer graphs against the layers called one by one, on frame counts that need padding:
    padding rows poisoned between two replays must change nothing, and graph and plain calls may
    differ only by rounding (cuBLAS may pick other kernels under capture)."""
    graphs, depth = vision.graphs, vision.layers_to_run
    for frames in (5, 22, 43):
        size = vision.config.vision_config.image_size
        hidden = vision.tower.embeddings(torch.randn(frames, 3, size, size, device=vision.device, dtype=vision.dtype))
        replayed = graphs.run(0, depth, [hidden]).clone()
        graphs.inputs.fill_(1e4)
        poisoned = graphs.run(0, depth, [hidden]).clone()
        plain = vision.call_layers(0, depth, hidden)
        print(f"graphs, {frames} frames: after poisoned padding max abs difference "
              f"{(replayed - poisoned).abs().max().item():.3g}; against plain calls "
              f"{(replayed.float() - plain.float()).abs().max().item():.3g} (values up to {plain.abs().max().item():.3g})")
        compiled = vision.importance(vision.tower.encoder.layers[depth - 3], hidden)
        eager = vision.importance(vision.tower.encoder.layers[depth - 3], hidden, eager=True)
        print(f"importance, {frames} frames: compiled against eager max abs difference "
              f"{(compiled - eager).abs().max().item():.3g} (values up to {eager.abs().max().item():.3g}); "
              f"same top 10% per frame: {_same_top(compiled, eager):.3f}")


def _decode_rows(clip: bytes, frames: int, repeats: int) -> list[dict]:
    """Video decoding of the clip: each keyframe segment alone, then all of them as served."""
    from encoder_service import video_decode

    limits = video_decode.VideoLimits(len(clip), 1e9, 1 << 40)
    rows = []
    for segment in video_decode.keyframe_runs(clip, frames):
        ms = median_ms(segment.decode, repeats)
        rows.append({"decoded": f"segment from frame {segment.start} alone ({len(segment.wanted)} frames sampled)",
                     "wall_ms": ms})
    cpu = []

    def served():
        mark = time.process_time()
        video_decode.decode_video(clip, frames, limits)
        cpu.append((time.process_time() - mark) * 1e3)

    rows.append({"decoded": f"all {frames} frames, as served", "wall_ms": median_ms(served, repeats),
                 "cpu_ms": statistics.median(cpu)})
    return rows


def _batch_rows(engine, clip: bytes, repeats: int) -> list[dict]:
    """The vision part of k requests' encodes run together against one after another."""
    from encoder_service.video_decode import decode_video
    from videollm.settings import CompressionSettings

    vision, settings = engine.vision, CompressionSettings(retain_ratio=0.1)
    pixels = engine.processor(videos=[decode_video(clip, 32, engine.limits).frames], return_tensors="pt",
                              device=vision.device)["pixel_values_videos"][0]  # [32, 3, H, W]
    rows = []
    for requests in (1, 2, 4):
        batch = [(pixels, settings)] * requests
        if requests * 32 > engine.settings.batch_max_frames:
            break
        together = median_ms(lambda: vision.encode_batch(batch), repeats, vision.device)
        one_by_one = median_ms(lambda: [vision.encode(p, s) for p, s in batch], repeats, vision.device)
        rows.append({"requests": requests, "together_ms": together, "one_by_one_ms": one_by_one})
    return rows


def _same_top(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the top 10% tokens per frame that a [T, S] and b [T, S] agree on."""
    k = max(1, a.shape[1] // 10)
    top_a, top_b = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices  # [T, k]
    return (top_a[:, :, None] == top_b[:, None, :]).any(-1).float().mean().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.encoder_steps", description=__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--frames", default="32,64")
    parser.add_argument("--retain", default="1.0,0.1")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="print the top device kernels of one encode")
    parser.add_argument("--trace", type=Path, help="with --profile: write the encode's timeline here "
                        "(Chrome trace JSON, for chrome://tracing or ui.perfetto.dev)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from encoder_service.engine import EncoderEngine
    from encoder_service.video_decode import decode_video
    from videollm.flops import encoder_flops
    from videollm.settings import CompressionSettings, EncoderSettings

    model_dir = build_checkpoint(args.shape, args.checkpoint_dir, args.device)
    start = time.perf_counter()
    engine = EncoderEngine(EncoderSettings(model=model_dir, device=args.device, max_frames=128))
    load_s = time.perf_counter() - start
    clip = benchmark_clip()
    rows = []
    for frames in (int(x) for x in args.frames.split(",")):
        for retain in (float(x) for x in args.retain.split(",")):
            settings = CompressionSettings(retain_ratio=retain) if retain < 1.0 else CompressionSettings(method="none")
            results = [engine.encode(clip, frames, settings) for _ in range(args.repeats + 1)][1:]
            row = {"frames": frames, "retain": retain, "merged": results[0].trace.frames_after_merge,
                   "tokens": results[0].tokens.shape[0]}
            for part in PARTS:
                row[part] = statistics.median(getattr(r.timings, part) for r in results)
            rows.append(row)
        decoded = decode_video(clip, frames, engine.limits).frames  # [T, H, W, 3]
        pixels = engine.processor(videos=[decoded], return_tensors="pt")[
            "pixel_values_videos"][0].to(engine.vision.device, engine.vision.dtype)  # [T, 3, H, W]
        flops = encoder_flops(engine.vision.config.vision_config, 0, [frames] * engine.vision.layers_to_run, 0)
        vision = engine.vision
        variants = {"as served": lambda hidden: vision.run_layers(0, vision.layers_to_run, [hidden]),
                    "compiled, no graphs": lambda hidden: vision.call_layers(0, vision.layers_to_run, hidden),
                    "eager": lambda hidden: vision.call_layers(0, vision.layers_to_run, hidden, eager=True)}
        outputs = {}
        for name, layers in variants.items():
            def tower_alone(name=name, layers=layers):  # the tower's layers alone, no compression
                outputs[name] = layers(vision.tower.embeddings(pixels)).clone()  # [T, S, D]

            with torch.inference_mode():
                tower = median_ms(tower_alone, args.repeats, vision.device)
            differs = (outputs[name].float() - outputs["as served"].float()).abs().max().item()
            rows.append({"frames": frames, "retain": name, "tower_ms": tower, "tower_tflops": flops / tower / 1e9,
                         "max_abs_difference_to_served": differs})

    batch_rows = _batch_rows(engine, clip, args.repeats) if engine.vision.device.type == "cuda" else []
    decode_rows = _decode_rows(clip, 32, args.repeats)
    if engine.vision.graphs is not None:
        _check_graphs(engine.vision)
    device = engine.vision.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape} encoder on {device} ({name}), torch {torch.__version__}, "
          f"attention {engine.vision.attention_implementation}, engine ready in {load_s:.1f} s")
    print("\n| frames | retain | merged | tokens | " + " | ".join(PARTS) + " |")
    print("|---" * (4 + len(PARTS)) + "|")
    for row in rows:
        if "tower_ms" in row:
            continue
        print(f"| {row['frames']} | {row['retain']} | {row['merged']} | {row['tokens']} | "
              + " | ".join(f"{row[p]:.1f}" for p in PARTS) + " |")
    print("\n| frames | tower layers alone | ms | TFLOP/s | max abs difference to served |\n|---|---|---|---|---|")
    for row in rows:
        if "tower_ms" in row:
            print(f"| {row['frames']} | {row['retain']} | {row['tower_ms']:.1f} | {row['tower_tflops']:.0f} | "
                  f"{row['max_abs_difference_to_served']:.3g} |")
    print(f"\nVideo decoding of the clip, 32 frames ({os.cpu_count()} CPU cores; median ms):\n")
    print("| decoded | wall ms | CPU ms |\n|---|---|---|")
    for row in decode_rows:
        print(f"| {row['decoded']} | {row['wall_ms']:.1f} | {row.get('cpu_ms', float('nan')):.0f} |")
    if batch_rows:
        print("\nFrames of concurrent requests through the tower together (32 frames each, retain 0.1, "
              "pixels ready on the device; `encode_batch` against one `encode` after another):\n")
        print("| requests | together ms | one by one ms | together ms per request | speed-up |\n|---|---|---|---|---|")
        for row in batch_rows:
            print(f"| {row['requests']} | {row['together_ms']:.1f} | {row['one_by_one_ms']:.1f} | "
                  f"{row['together_ms'] / row['requests']:.1f} | {row['one_by_one_ms'] / row['together_ms']:.2f}x |")
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        settings = CompressionSettings(retain_ratio=0.1)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.encode(clip, 32, settings)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "batch_rows": batch_rows, "decode_rows": decode_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What HDR costs to decode to pixels: 32 frames of `1080p-10s-hlg` against the same stream tagged
SDR (`1080p-10s-hevc-sdr`), SDR as usual, HLG left 16-bit for the GPU's tone mapping (the encoder on
a GPU), and HLG tone-mapped on the CPU in the runs (the encoder on the CPU).

    python -m bench.hdr_cost [--repeats 5]

Prints a markdown table: the median wall and CPU milliseconds of decode_video over interleaved runs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench.clips import clip
from bench.timing import median_ms, wall_and_cpu_ms
from encoder_service import hdr
from encoder_service.video_decode import VideoLimits, decode_video

LIMITS = VideoLimits(1 << 40, 1e9, 1 << 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=32)
    args = parser.parse_args()
    sdr, hlg = clip("1080p-10s-hevc-sdr"), clip("1080p-10s-hlg")
    paths = {
        "SDR (BT.709 tags)": lambda: decode_video(sdr, args.frames, LIMITS),
        "HLG left 16-bit for the GPU": lambda: decode_video(hlg, args.frames, LIMITS, tone_map=False),
        "HLG tone-mapped on the CPU": lambda: decode_video(hlg, args.frames, LIMITS),
    }
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, run in paths.items():
            times[name].append(wall_and_cpu_ms(run))
    print("| path | decode_video ms | its CPU ms |\n|---|---|---|")
    for name, measured in times.items():
        print(f"| {name} | {np.median([w for w, _ in measured]):.0f} | {np.median([c for _, c in measured]):.0f} |")
    if torch.cuda.is_available():  # the GPU's share of the first HLG path
        frames = torch.randint(0, 65536, (args.frames, 1080, 1920, 3), dtype=torch.int32).to(torch.uint16).cuda()
        for transfer, name in ((hdr.PQ, "PQ"), (hdr.HLG, "HLG")):
            ms = median_ms(lambda: hdr.to_sdr(frames, transfer), args.repeats, frames.device)
            print(f"\nhdr.to_sdr on {torch.cuda.get_device_name()}, {args.frames} frames of 1080p, {name}: {ms:.1f} ms")


if __name__ == "__main__":
    main()

"""Video decoding alone, on the benchmark's clips: where the time goes and how far from ideal it is.

    python -m bench.decode --clips 360p,1080p-30s,720p-2min --frames 32,64 --repeats 5

Per clip and frame count: the one open and demux pass, each keyframe run decoded alone (1 decoder
thread and as served), decode_video as served (wall and CPU time of the process), and the
ideal on this machine's cores: the larger of the slowest run alone and all runs' CPU time over
the cores. `--check` also compares the frames with a sequential decode of every frame.
"""

from __future__ import annotations

import argparse
import io
import os

import av
import numpy as np

from bench.clips import CLIPS, clip, describe
from bench.timing import median_ms, wall_and_cpu_ms
from encoder_service import video_decode
from encoder_service.demux import ColorTags, index_of
from encoder_service.video_decode import VideoLimits, decode_video, keyframe_runs

LIMITS = VideoLimits(max_bytes=1 << 40, max_duration_s=1e9, max_frame_pixels=1 << 40)


def sequential_frames(data: bytes, decoded) -> list[np.ndarray]:
    """The reference: the container's one decoder, every frame in presentation order, the sampled
    ones kept, with decode_video's pixel conversion (tone mapping of HDR) and orientation."""
    wanted, kept = set(decoded.frame_indices), {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.best("video")
        tags = ColorTags.of(stream.codec_context)
        for at, frame in enumerate(container.decode(stream)):
            if at in wanted:
                kept[at] = decoded.orientation.upright(video_decode._pixels(frame, tags, tone_map=True))
    return [kept[i] for i in decoded.frame_indices]


def measure(name: str, data: bytes, frames: int, repeats: int, check: bool) -> dict:
    demux_ms = median_ms(lambda: index_of(data), repeats)
    runs = keyframe_runs(data, frames)
    alone = [wall_and_cpu_ms(run.decode)[1] for run in runs]  # CPU ms of each run, one decoder thread
    served = [wall_and_cpu_ms(lambda: decode_video(data, frames, LIMITS)) for _ in range(repeats)]
    wall_ms = float(np.median([w for w, _ in served]))
    cpu_ms = float(np.median([c for _, c in served]))
    cores = os.cpu_count() or 1
    row = {"clip": name, "frames": frames, "runs": len(runs), "demux_ms": demux_ms,
           "slowest_run_ms": max(alone), "runs_cpu_ms": sum(alone),
           "ideal_ms": max(max(alone), sum(alone) / cores), "served_ms": wall_ms, "served_cpu_ms": cpu_ms}
    if check:
        decoded = decode_video(data, frames, LIMITS)
        reference = sequential_frames(data, decoded)
        row["exact"] = all(np.array_equal(a, b) for a, b in zip(decoded.frames, reference))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", default="360p,1080p-30s,720p-2min", help=f"of {', '.join(CLIPS)}")
    parser.add_argument("--frames", default="32,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="compare the frames with a sequential decode")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, PyAV {av.__version__}, FFmpeg {av.library_versions['libavcodec']}\n")
    rows = []
    for name in args.clips.split(","):
        data = clip(name)
        print(f"- {name}: {describe(data)}")
        rows += [measure(name, data, int(frames), args.repeats, args.check) for frames in args.frames.split(",")]
    print("\n| clip | frames | runs | open + demux ms | slowest run alone ms | runs' CPU ms | ideal ms "
          "| decode_video ms | its CPU ms |" + (" exact |" if args.check else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.check else ""))
    for r in rows:
        print(f"| {r['clip']} | {r['frames']} | {r['runs']} | {r['demux_ms']:.0f} | {r['slowest_run_ms']:.0f} "
              f"| {r['runs_cpu_ms']:.0f} | {r['ideal_ms']:.0f} | {r['served_ms']:.0f} | {r['served_cpu_ms']:.0f} |"
              + (f" {r['exact']} |" if args.check else ""))


if __name__ == "__main__":
    main()

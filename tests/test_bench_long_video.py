"""The long-video benchmark (bench/long_video.py) runs end to end on the tiny model on the CPU, with
small stand-in clips, so it cannot rot; and the 10-minute clip's generator (segments encoded in
parallel, then joined) makes one deterministic stream. No timing is asserted: only that every
figure is there and plausible (frame counts, cache results, tokens within their bound).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np

from bench.clips import (CLIPS, PhoneClip, _encode_segment, _encode_segmented, describe, encode_phone_clip,
                         segment_bounds)
from bench.long_video import report

ROOT = Path(__file__).resolve().parent.parent

# 384 px wide, not the 352 of test_bench_clips: with 176-byte chroma rows x264's output depended on
# what the process had encoded before (measured: the same segment gave three different files), so
# comparing encodes made in different processes needs rows of a multiple of 32 bytes
SMALL = dict(width=384, height=216, fps=10, gop_s=1.0, bitrate_mbps=1.0)


def _rows(table: str, heading: str) -> list[str]:
    """The table rows (after the header and its rule) of the section whose heading starts with `heading`."""
    section = table.split(f"\n## {heading}")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def _bound(retain: float, frames: int) -> int:
    return math.ceil(round(retain * frames * 196, 6)) + frames + 1


def test_the_long_video_benchmark_runs_on_the_cpu_and_fills_every_table(tmp_path):
    long_clip, short_clip = tmp_path / "long.mp4", tmp_path / "short.mp4"
    long_clip.write_bytes(encode_phone_clip(PhoneClip(seconds=12.0, **SMALL)))  # fps 1: 12 frames
    short_clip.write_bytes(encode_phone_clip(PhoneClip(seconds=4.0, **SMALL)))  # 40 frames
    out = tmp_path / "out"
    context = 1200  # the baseline's context: a few frames of full tokens, so that it runs in seconds on the CPU
    command = [sys.executable, "-m", "bench.long_video", "--shape", "tiny", "--device", "cpu", "--out", str(out),
               "--clips-dir", str(tmp_path / "cache"), "--long-clip", str(long_clip), "--short-clip", str(short_clip),
               "--frames", "4,8", "--short-frames", "4", "--baseline-frames", "2",
               "--baseline-context-tokens", str(context), "--max-tokens", "3", "--repeats", "1"]
    # one OpenMP thread per process: the stack's services and the bench share the test machine's cores
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "] the stack is up" in done.stdout  # progress lines with their times
    results = json.loads((out / "results.json").read_text())
    assert set(results["clips"]) == {"long", "short"}
    assert (results["clips"]["long"]["frames"], results["clips"]["short"]["frames"]) == (120, 40)

    long = results["long"]
    assert (long["clip"], long["fps"], long["retain"], long["frames"]) == ("long", 1.0, 0.05, 12)
    assert long["visual_token_bound"] == _bound(0.05, 12)
    assert 0 < long["visual_tokens"] <= long["visual_token_bound"] < long["uncompressed_tokens"] == 12 * 196 + 1
    assert (long["first_timestamp_s"], long["last_timestamp_s"]) == (0.0, 11.0)  # one frame a second
    assert long["cache"] == {"miss": ["miss", "miss"], "hit": ["hit"]}  # the first miss, one timed, one hit
    assert len(long["ttft_miss_all_ms"]) == 2
    assert all(long[key] > 0 for key in ("ttft_miss_first_ms", "ttft_miss_ms", "ttft_hit_ms", "upload_ms"))
    for parts in (long["miss_first_parts_ms"], long["miss_parts_ms"]):
        assert all(value is not None and value >= 0 for value in parts.values()), parts
        assert parts["encode_call"] >= parts["encoder_total"] >= parts["encoder_decode"]
        assert parts["llm_call"] >= parts["llm_ttft"] >= parts["prefill"] > 0
    assert long["encoder_peak_memory_bytes"] == 0  # CUDA only

    assert [(row["clip"], row["frames"], row["retain"]) for row in results["latency"]] == \
        [("short", 4, 0.1), ("short", 8, 0.1)]
    for row in results["latency"]:
        assert 0 < row["visual_tokens"] <= row["visual_token_bound"] == _bound(0.1, row["frames"])
        assert row["cache"] == {"miss": ["miss"], "hit": ["hit"], "miss_id": ["miss"], "hit_id": ["hit"]}, row
        assert all(row[key] > 0 for key in ("ttft_miss_ms", "ttft_hit_ms", "ttft_miss_id_ms", "ttft_hit_id_ms"))

    inter = results["interference"]
    assert inter["delay_s"] > 0 and inter["delay_source"].startswith("the long miss's")
    assert [inter[key]["frames"] for key in ("short_alone", "short_during_long", "long_with_short")] == [4, 4, 12]
    for key in ("short_alone", "short_during_long", "long_with_short"):
        row = inter[key]
        assert row["ttft_ms"] > 0 and len(row["ttft_all_ms"]) == 1 and row["encoder_queue_ms"] >= 0, row
    assert inter["short_during_long"]["visual_tokens"] <= inter["visual_token_bound"] == _bound(0.1, 4)
    assert len(inter["short_first_token_before_long"]) == len(inter["long_first_token_before_short_sent"]) == 1

    base = results["baseline"]
    fit, text = base["frames_that_fit"], base["prompt_text_tokens"]
    assert fit >= 1 and fit * 196 + 1 + text + 3 <= context < (fit + 1) * 196 + 1 + text + 3
    assert [(row["frames"], row["visual_tokens"]) for row in base["rows"]] == [(fit, fit * 196 + 1), (2, 393)]
    assert all(row["ttft_ms"] > 0 for row in base["rows"])

    table = (out / "results.md").read_text()
    assert [line.split(" | ")[0] for line in _rows(table, "Clips")] == ["| long", "| short"]
    assert [line.split(" | ")[:3] for line in _rows(table, "The long request")] == [["| long", "1.0", "12"]]
    assert [line.split(" | ")[0] for line in _rows(table, "Where the long miss's TTFT goes")] == \
        ["| first", "| median of 1"]
    assert [line.split(" | ")[:3] for line in _rows(table, "Latency on short")] == \
        [["| short", "4", "0.1"], ["| short", "8", "0.1"]]
    assert len(_rows(table, "Interference")) == 4
    assert [line.split(" | ")[:2] for line in _rows(table, "Baseline")] == [[f"| {fit}", "the most that fit"],
                                                                              ["| 2", "reference"]]
    for heading in ("The long request", "Where the long miss's TTFT goes", "Latency on short", "Baseline"):
        assert all(" - |" not in line for line in _rows(table, heading)), heading
    assert table in done.stdout  # printed too


def test_a_run_cut_short_still_renders_what_it_measured():
    results = {"shape": "7b", "environment": {"date": "d", "gpu": "g", "torch": "t", "transformers": "t",
                                              "python": "p", "command": "c"}, "clips": {}}
    assert report(results).startswith("# Long video through the stack: 7b shape")


def test_the_10_minute_clip_is_the_2_minute_clips_footage_for_10_minutes_in_segments():
    assert CLIPS["720p-10min"] == PhoneClip(1280, 720, 600.0, gop_s=1.0, bitrate_mbps=8.0, segment_s=20.0)
    assert len(segment_bounds(CLIPS["720p-10min"])) == 30
    # segment_s stays out of repr(), which names the cached files: the other clips' files keep their names
    assert "segment_s" not in repr(CLIPS["720p-2min"])


def test_a_clip_in_segments_is_one_deterministic_stream_whatever_the_processes():
    spec = PhoneClip(seconds=3.0, segment_s=1.0, **SMALL)
    data = _encode_segmented(spec, 0, workers=3)
    assert _encode_segmented(spec, 0, workers=1) == data
    about = describe(data)
    assert (about["codec"], about["profile"], about["frames"], about["keyframes"], about["duration_s"]) == \
        ("h264", "High", 30, 3, 3.0)
    with av.open(io.BytesIO(data)) as container:
        decoded = [(frame.time, frame.to_ndarray(format="yuv420p")) for frame in container.decode(video=0)]
    assert np.allclose([t for t, _ in decoded], np.arange(30) / 10)  # one timeline, no gap or overlap at the joins
    alone = []  # each segment decoded on its own: the joined stream shows exactly its frames
    for first, stop in segment_bounds(spec):
        with av.open(io.BytesIO(_encode_segment(spec, 0, first, stop))) as container:
            alone += [frame.to_ndarray(format="yuv420p") for frame in container.decode(video=0)]
    assert len(alone) == len(decoded) and all(np.array_equal(a, b) for a, (_, b) in zip(alone, decoded))

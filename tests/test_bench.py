"""The GPU benchmark script runs end to end on the tiny model on the CPU, so it cannot rot.

It checks that the run completes on two clips (a named one and a file), with the cache hit asked
both ways (the same data URL again, an uploaded id), and that every table is complete; no timing
is asserted. The baseline's throughput is measured there too (the monolithic model behind
bench/baseline_server.py, driven by the same closed-loop clients), every published baseline
throughput figure says whether it was measured or modeled, and every published results file still
renders.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.baseline import MODELED_FORMULA, queueing
from bench.client import BodyFile, chat_body, chat_body_parts, chat_bytes
from bench.clips import PhoneClip, encode_phone_clip
from bench.run import report

ROOT = Path(__file__).resolve().parent.parent


def _rows(table: str, heading: str) -> list[str]:
    """The table rows (after the header and its rule) of the section whose heading starts with `heading`."""
    section = table.split(f"\n## {heading}")[1].split("\n## ")[0]
    return [line for line in section.splitlines() if line.startswith("| ")][1:]


def test_the_benchmark_runs_on_the_cpu_per_clip_and_fills_every_table(tmp_path):
    # a second clip as a file: a small phone-like clip (bench/clips.py's generator needs a width over 320)
    phone = tmp_path / "phone.mp4"
    phone.write_bytes(encode_phone_clip(PhoneClip(352, 240, 2.0)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "videollm.cli", "bench", "--shape", "tiny", "--device", "cpu", "--out", str(out),
               "--clips", f"360p,{phone}", "--throughput-clip", str(phone), "--clip-frames", "phone=6",
               "--frames", "4", "--retain", "1.0,0.1", "--clients", "1,2", "--requests-per-client", "1",
               "--throughput-frames", "4", "--max-tokens", "3", "--repeats", "1"]
    # one OpenMP thread per process: the stack, the baseline server and the bench share the test machine's
    # cores, and processes whose thread pools spin against each other run many times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["clips"]["360p"]["source"] == "bench/clips.py"
    assert (results["clips"]["phone"]["source"], results["clips"]["phone"]["width"]) == (str(phone), 352)
    latency = results["placements"][0]["latency"]
    assert [(row["clip"], row["frames"], row["retain"]) for row in latency] == \
        [("360p", 4, 1.0), ("360p", 4, 0.1), ("phone", 6, 1.0), ("phone", 6, 0.1)]  # phone: its own frame count
    for row in latency:
        full = row["frames"] * 196 + 1
        assert row["visual_tokens"] == full if row["retain"] == 1.0 else row["visual_tokens"] < full
        # inline: a miss, then a hit with the same data URL; uploaded: a miss by its id, then a hit
        assert row["cache"] == {"miss": ["miss"], "hit": ["hit"], "miss_id": ["miss"], "hit_id": ["hit"]}, row
        assert all(row[key] is not None and row[key] == row[key] and row[key] > 0 for key in
                   ("ttft_miss_ms", "ttft_hit_ms", "upload_ms", "ttft_miss_id_ms", "ttft_hit_id_ms", "encode_ms",
                    "prefill_ms", "decode_tokens_per_s", "gateway_ttft_hit_id_ms", "llm_ttft_hit_id_ms"))
        for parts in (row["miss_parts_ms"], row["miss_id_parts_ms"]):  # the hops nest: each call holds the service's
            assert all(value is not None and value >= 0 for value in parts.values()), parts
            assert parts["encode_call"] >= parts["encoder_total"] >= parts["encoder_decode"]
            assert parts["llm_call"] >= parts["llm_ttft"] >= parts["prefill"]
        assert row["ttft_miss_ms"] >= sum(row["miss_parts_ms"][k] for k in ("gateway_in", "encode_call", "llm_call"))
        assert row["ttft_miss_id_ms"] >= sum(row["miss_id_parts_ms"][k]
                                             for k in ("gateway_in", "encode_call", "llm_call"))
    throughput = results["placements"][0]["throughput"]
    assert [(row["clip"], row["clients"], row["requests"], row["errors"]) for row in throughput] == \
        [("phone", 1, 1, 0), ("phone", 2, 2, 0)]
    assert [(b["clip"], b["frames"]) for b in results["baseline"]] == [("360p", 4), ("phone", 6)]
    # the baseline's throughput is measured by default: real requests through the one-at-a-time server,
    # as many as videollm's runs (clients x requests per client), from the same closed-loop clients, on the same clip
    base = results["baseline_throughput"]
    assert [(b["kind"], b["clip"], b["clients"], b["requests"], b["errors"], b["frames"]) for b in base] == \
        [("measured", "phone", 1, 1, 0, 4), ("measured", "phone", 2, 2, 0, 4)]
    for b in base:
        assert b["rps"] == b["requests"] / b["seconds"] > 0
        assert 0 < b["ttft_p50_ms"] <= b["ttft_p99_ms"] and b["completion_tokens_mean"] > 0
        assert "formula" not in b
    names = {path.name for path in out.iterdir()}
    assert "baseline_server.log" in names and "bodies" not in names  # the prepared bodies are removed
    table = (out / "results.md").read_text()
    assert [line.split(" | ")[:2] for line in _rows(table, "Clips")] == [["| 360p", "bench/clips.py"],
                                                                          ["| phone", str(phone)]]
    latency_rows = _rows(table, "Latency")
    assert [line.split(" | ")[:3] for line in latency_rows] == \
        [["| 360p", "4", "1.0"], ["| 360p", "4", "0.1"], ["| phone", "6", "1.0"], ["| phone", "6", "0.1"]]
    assert all(" - |" not in line and line.endswith("x |") for line in latency_rows)  # every baseline ratio is there
    hit_rows = _rows(table, "Cache hits")
    assert len(hit_rows) == 4 and all(" - |" not in line and "-/-" not in line for line in hit_rows)
    assert [line.split(" | ")[:4] for line in _rows(table, "Where a miss's TTFT goes")] == \
        [["| 360p", "4", "1.0", "data URL"], ["| 360p", "4", "1.0", "uploaded id"],
         ["| 360p", "4", "0.1", "data URL"], ["| 360p", "4", "0.1", "uploaded id"],
         ["| phone", "6", "1.0", "data URL"], ["| phone", "6", "1.0", "uploaded id"],
         ["| phone", "6", "0.1", "data URL"], ["| phone", "6", "0.1", "uploaded id"]]
    assert [line.split(" | ")[:2] for line in _rows(table, "Baseline: ")] == [["| 360p", "4"], ["| phone", "6"]]
    throughput_rows = _rows(table, "Throughput on the phone clip")
    assert [line.split(" | ")[:5] for line in throughput_rows] == [["| 0/0", "0.1", "1", "1", "0"],
                                                                   ["| 0/0", "0.1", "2", "2", "0"]]
    assert all(line.endswith("x |") for line in throughput_rows)
    assert "| baseline req/s (measured) | baseline TTFT p50/p99 ms (measured) | req/s ratio (vs measured baseline) |" \
        in table
    assert "modeled" not in table
    assert [line.split(" | ")[:5] for line in _rows(table, "Baseline throughput on the phone clip")] == \
        [["| measured", "4", "1", "1", "0"], ["| measured", "4", "2", "2", "0"]]


def test_a_clip_that_is_neither_named_nor_a_file_is_refused_before_anything_starts(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--device", "cpu", "--out", str(tmp_path / "out"),
                           "--clips", "360p,4k-phone"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0 and "'4k-phone' is neither a clip of bench/clips.py" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_chat_body_is_sent_as_the_json_of_chat_body_whole_or_from_a_file(tmp_path):
    video = bytes(range(256)) * 1000
    expected = chat_body(video, 8, {"method": "none"}, 4)
    assert json.loads(chat_bytes(video, 8, {"method": "none"}, 4)) == expected
    body = BodyFile.write(tmp_path / "body.json", chat_body_parts(video, 8, {"method": "none"}, 4))

    async def read() -> bytes:
        return b"".join([chunk async for chunk in body.chunks(chunk_bytes=4096)])

    sent = asyncio.run(read())
    assert body.size == len(sent) and json.loads(sent) == expected


def _results(baseline_throughput: list[dict]) -> dict:
    row = {"retain": 0.1, "clients": 4, "requests": 8, "errors": 0, "rps": 4.0, "ttft_p50_ms": 500.0,
           "ttft_p99_ms": 900.0, "encoder_batch_mean": 1.0}
    return {"shape": "7b", "environment": {"date": "d", "gpu": "g", "torch": "t", "transformers": "t", "python": "p",
                                           "command": "c"},
            "placements": [{"placement": "0/0", "latency": [], "throughput": [row], "memory": {}}],
            "baseline_throughput": baseline_throughput}


def test_the_tables_say_which_baseline_throughput_is_modeled_and_which_measured():
    modeled = dict(queueing(1000.0, 400.0, 4), frames=32, max_tokens=32)
    assert modeled["kind"] == "modeled" and modeled["formula"] == MODELED_FORMULA and modeled["rps"] == 1.0
    assert (modeled["ttft_p50_ms"], modeled["ttft_p99_ms"]) == (2400.0, 3400.0)  # k x service + TTFT, k = 0..3
    measured = {"kind": "measured", "frames": 32, "clients": 4, "requests": 8, "errors": 0, "rps": 2.0,
                "ttft_p50_ms": 1500.0, "ttft_p99_ms": 2500.0}
    table = report(_results([measured, modeled]))
    assert ("| baseline req/s (measured) | baseline TTFT p50/p99 ms (measured) | req/s ratio (vs measured baseline) | "
            "baseline req/s (modeled) | baseline TTFT p50/p99 ms (modeled) | req/s ratio (vs modeled baseline) |"
            ) in table
    assert "| 0/0 | 0.1 | 4 | 8 | 0 | 4.00 | 500 | 900 | 1.00 | 2.00 | 1500/2500 | 2.00x | 1.00 | 2400/3400 | 4.00x |" \
        in table
    assert MODELED_FORMULA in table and "service_ms = 1000.0 ms and TTFT = 400.0 ms (32 frames, 32 tokens)" in table
    assert "| measured | 32 | 4 | 8 | 0 | 2.00 |" in table and "| modeled | 32 | 4 | - (modeled) | - | 1.00 |" in table
    # results written before the "kind" field held only modeled figures, and are labelled so
    old = {key: modeled[key] for key in ("clients", "rps", "ttft_p50_ms", "ttft_p99_ms", "note")}
    table = report(_results([old]))
    assert "baseline req/s (modeled)" in table and "(measured)" not in table.split("## Throughput")[1]
    assert MODELED_FORMULA in table


def test_every_published_baseline_throughput_figure_says_how_it_was_obtained():
    bench_docs = ROOT / "docs" / "bench"
    for path in sorted(bench_docs.glob("*.json")):
        for entry in json.loads(path.read_text()).get("baseline_throughput", []):
            assert entry.get("kind") in ("measured", "modeled"), path.name
            if entry["kind"] == "modeled":
                assert entry["formula"] == MODELED_FORMULA, path.name
                assert entry["rps"] == 1000.0 / entry["service_ms"], path.name
    for path in sorted(bench_docs.glob("*.md")):
        text = path.read_text()
        for header in re.findall(r"baseline req/s[^|]*\|", text):
            assert "(modeled)" in header or "(measured)" in header, (path.name, header)
        for header in re.findall(r"req/s ratio[^|]*\|", text):
            assert "modeled" in header or "measured" in header, (path.name, header)
        if "(modeled)" in text:
            assert "1000 / service_ms" in text, path.name
    readme = (ROOT / "README.md").read_text()
    numbers = readme.split("## Measured numbers")[1].split("\n## ")[0]
    assert "1000 / service_ms" in numbers
    for line in numbers.splitlines():
        if line.startswith("| throughput") or line.startswith("| transformers `generate`, one GPU"):
            assert "modeled" in line, line


def test_results_of_the_single_clip_bench_still_render_as_the_360p_clip():
    single_clip = 0
    for path in sorted((ROOT / "docs" / "bench").glob("*.json")):
        results = json.loads(path.read_text())
        if any("clip" in row for row in results["placements"][0].get("latency", [])):
            report(results)  # a per-clip run renders too; its tables are the per-clip tests' business
            continue
        single_clip += 1
        table = report(results)  # rows without "clip" (or without the newer figures) still render
        latency = results["placements"][0].get("latency", [])
        rows = _rows(table, "Latency") if latency else []
        assert len(rows) == len(latency), path.name
        baseline_frames = {b["frames"] for b in results.get("baseline", [])}
        for line, row in zip(rows, latency):
            cells = line.split(" | ")
            assert cells[:3] == ["| 360p", str(row["frames"]), str(row["retain"])], (path.name, line)
            assert cells[7] == "-", (path.name, line)  # no hit by an uploaded id was measured then
            assert (cells[12] != "-") == (row["frames"] in baseline_frames), (path.name, line)  # matched by clip, frames
        assert "## Throughput on the 360p clip" in table, path.name
    assert single_clip >= 5  # the files written before clips existed


def test_the_latency_table_compares_each_clip_with_the_baseline_of_that_clip():
    def row(clip: str, ttft: float) -> dict:
        return {"clip": clip, "frames": 32, "retain": 0.1, "frames_after_merge": 22, "visual_tokens": 639,
                "ttft_miss_ms": ttft, "ttft_hit_ms": ttft / 10, "ttft_hit_id_ms": ttft / 20}

    results = _results([])
    results["placements"][0]["latency"] = [row("360p", 200.0), row("1080p-30s", 800.0), row("720p-2min", 900.0)]
    base = {"frames": 32, "visual_tokens": 6273, "decode_ms": 1.0, "preprocess_ms": 1.0, "vision_ms": 1.0,
            "prefill_ms": 1.0, "decode_ms_per_token": 1.0, "peak_memory_bytes": 0}
    results["baseline"] = [dict(base, ttft_ms=400.0), dict(base, clip="1080p-30s", ttft_ms=1600.0)]  # no clip: 360p
    rows = _rows(report(results), "Latency")
    assert [line.split(" | ")[12:] for line in rows] == [["400.0", "2.00x", "20.00x", "40.00x |"],
                                                         ["1600.0", "2.00x", "20.00x", "40.00x |"],
                                                         ["-", "-", "-", "- |"]]

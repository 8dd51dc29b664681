"""The GPU benchmark script runs end to end on the tiny model on the CPU, so it cannot rot.

It checks that the run completes and that every table is complete; no timing is asserted. The
baseline's throughput is measured there too (the monolithic model behind bench/baseline_server.py,
driven by the same closed-loop clients), and every published baseline throughput figure says
whether it was measured or modeled.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench.baseline import MODELED_FORMULA, queueing
from bench.run import report

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_on_the_cpu_and_fills_every_table(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "videollm.cli", "bench", "--shape", "tiny", "--device", "cpu", "--out", str(out),
               "--frames", "4", "--retain", "1.0,0.1", "--clients", "1,2", "--requests-per-client", "1",
               "--throughput-frames", "4", "--max-tokens", "3", "--repeats", "1"]
    # one OpenMP thread per process: the stack, the baseline server and the bench share the test machine's
    # cores, and processes whose thread pools spin against each other run many times slower
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    latency = results["placements"][0]["latency"]
    assert [(row["frames"], row["retain"]) for row in latency] == [(4, 1.0), (4, 0.1)]
    assert latency[0]["visual_tokens"] == 4 * 196 + 1 > latency[1]["visual_tokens"]
    for row in latency:
        assert all(row[key] is not None and row[key] == row[key] for key in
                   ("ttft_miss_ms", "ttft_hit_ms", "encode_ms", "prefill_ms", "decode_tokens_per_s"))
        parts = row["miss_parts_ms"]  # the hops nest: each call holds the service's own time
        assert all(value is not None and value >= 0 for value in parts.values()), parts
        assert parts["encode_call"] >= parts["encoder_total"] >= parts["encoder_decode"]
        assert parts["llm_call"] >= parts["llm_ttft"] >= parts["prefill"]
        assert row["ttft_miss_ms"] >= parts["gateway_in"] + parts["encode_call"] + parts["llm_call"]
    throughput = results["placements"][0]["throughput"]
    assert [(row["clients"], row["requests"], row["errors"]) for row in throughput] == [(1, 1, 0), (2, 2, 0)]
    assert [b["frames"] for b in results["baseline"]] == [4]
    # the baseline's throughput is measured by default: real requests through the one-at-a-time server,
    # as many as videollm's runs (clients x requests per client), from the same closed-loop clients
    base = results["baseline_throughput"]
    assert [(b["kind"], b["clients"], b["requests"], b["errors"], b["frames"]) for b in base] == \
        [("measured", 1, 1, 0, 4), ("measured", 2, 2, 0, 4)]
    for b in base:
        assert b["rps"] == b["requests"] / b["seconds"] > 0
        assert 0 < b["ttft_p50_ms"] <= b["ttft_p99_ms"] and b["completion_tokens_mean"] > 0
        assert "formula" not in b
    assert "baseline_server.log" in {path.name for path in out.iterdir()}
    table = (out / "results.md").read_text()
    assert table.count("\n| 4 | ") == 5  # two latency rows, two rows of where the TTFT goes, one baseline row
    assert "| 0/0 | 0.1 | 2 | 2 | 0 |" in table
    assert " - |" not in table.split("## Throughput")[0]  # every latency row has its baseline ratio
    assert "| baseline req/s (measured) | baseline TTFT p50/p99 ms (measured) | req/s ratio (vs measured baseline) |" \
        in table
    assert "modeled" not in table
    assert "| measured | 4 | 1 | 1 | 0 |" in table and "| measured | 4 | 2 | 2 | 0 |" in table
    throughput_rows = [line for line in table.split("## Throughput")[1].split("## Baseline throughput")[0].splitlines()
                       if line.startswith("| 0/0 |")]
    assert len(throughput_rows) == 2 and all(line.endswith("x |") for line in throughput_rows)


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

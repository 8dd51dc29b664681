"""The GPU benchmark script runs end to end on the tiny model on the CPU, so it cannot rot.

It checks that the run completes and that every table is complete; no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_the_benchmark_runs_on_the_cpu_and_fills_every_table(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "videollm.cli", "bench", "--shape", "tiny", "--device", "cpu", "--out", str(out),
               "--frames", "4", "--retain", "1.0,0.1", "--clients", "1,2", "--requests-per-client", "1",
               "--throughput-frames", "4", "--max-tokens", "3", "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
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
    assert len(results["baseline_throughput"]) == 2
    table = (out / "results.md").read_text()
    assert table.count("\n| 4 | ") == 5  # two latency rows, two rows of where the TTFT goes, one baseline row
    assert "| 0/0 | 0.1 | 2 | 2 | 0 |" in table
    assert " - |" not in table.split("## Throughput")[0]  # every latency row has its baseline ratio

"""scripts/loadtest.py, run with tiny counts against the session's gateway: the table is complete
and nothing fails (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "loadtest.py"
COLUMNS = ["clients", "requests", "ok", "errors", "skipped", "429s retried", "hit/miss/none", "req/s",
           "TTFT p50 ms", "TTFT p99 ms", "total p50 ms", "total p99 ms", "wall s"]


def table_rows(stdout: str) -> list[dict]:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == COLUMNS, header
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}, lines[1]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def test_the_load_test_reports_every_level_without_errors(gateway, tmp_path):
    out = tmp_path / "loadtest.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--url", gateway.url, "--concurrency", "1,2", "--requests", "4",
         "--hit-videos", "2", "--time-limit", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    rows = table_rows(run.stdout)
    assert [row["clients"] for row in rows] == ["1", "2"]
    for row in rows:
        assert all(value and value != "-" for value in row.values()), row  # every cell filled
        assert (row["requests"], row["ok"], row["errors"], row["skipped"]) == ("4", "4", "0", "0"), row
        # the default mix hit=2,miss=1,text=1 over 4 requests: 2 cache hits, 1 miss, 1 text-only chat
        assert row["hit/miss/none"] == "2/1/1", row
        for name in ("req/s", "TTFT p50 ms", "TTFT p99 ms", "total p50 ms", "total p99 ms"):
            assert float(row[name]) > 0, (name, row)
        assert float(row["TTFT p50 ms"]) <= float(row["total p50 ms"])

    report = json.loads(out.read_text())
    assert report["url"] == gateway.url
    levels = report["levels"]
    assert [level["clients"] for level in levels] == [1, 2]
    for level in levels:
        assert level["errors"] == 0 and level["skipped"] == 0, level
        assert level["completed"] == level["requests"] == 4
        assert level["kinds"] == {"hit": 2, "miss": 1, "text": 1}
        assert level["cache"] == {"hit": 2, "miss": 1, "none": 1}
        assert level["completion_tokens"] > 0
        for key in ("rps", "ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms"):
            assert isinstance(level[key], float) and level[key] > 0, (key, level)

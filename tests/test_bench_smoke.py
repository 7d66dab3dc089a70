"""The side-by-side benchmark harness runs and reports (a CI-sized smoke; speed is never asserted here).

`benchmarks/bench_serve.py` starts a bare Bolt app and `chatops serve` as real processes against the fake
Slack and the scripted model; this runs its steady-load phase with a handful of events.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_runs_both_apps_and_reports_every_figure_as_a_ratio(tmp_path):
    table = tmp_path / "table.md"
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--phases", "steady", "--events", "6"]
    done = subprocess.run([*argv, "--output", str(table)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = table.read_text(encoding="utf-8").splitlines()
    for senders in (4, 20):
        assert any(row.startswith(f"| ack p99, {senders} senders") and "×" in row for row in rows), rows
        assert any(row.startswith(f"| turns/s vs bare replies/s, {senders} senders") for row in rows), rows


def test_bench_core_reports_the_bots_own_time_with_the_model_calls_measured_in_the_turn(tmp_path):
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench_core.py"), "--conversations", "2", "--model-delay", "0.01"]
    done = subprocess.run([*argv, "--turns", "5"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bot's own time per turn" in done.stdout and "SQL statements" in done.stdout, done.stdout
    # The model calls' time is read from the bot's own metric: zero would mean the metric was not found.
    in_model = float(done.stdout.split("of which its model calls ")[1].split(" ms")[0])
    assert in_model > 0, done.stdout

"""The Locust load test, for real but short: the runner against the session tritonserver.

The runner runs Locust in a subprocess, as ``make load-test`` does: Locust monkey-patches the standard
library with gevent on import, which must not happen inside the pytest process.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vocos_triton.launcher.server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNNER = PROJECT_ROOT / "load_tests" / "run_load_test.py"
PATHS = ("vocos_mel", "resynthesize_mel", "decode_codes", "resynthesize_encodec")


def _load_runner():
    spec = importlib.util.spec_from_file_location("run_load_test", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_locust_run_has_no_failures_and_writes_reports(triton: TritonServer, tmp_path: Path) -> None:
    command = [
        sys.executable, str(RUNNER), "--url", triton.grpc_url, "--server-pid", str(triton.process.pid),
        "--users", "4", "--spawn-rate", "4", "--duration", "15s", "--results-dir", str(tmp_path),
        "--memory-interval", "1", "--", "--pool-size", "8",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=150, cwd=PROJECT_ROOT)
    output = completed.stdout[-6000:] + completed.stderr[-4000:]
    assert completed.returncode == 0, output

    (results,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "report.html",
                 "locust_summary.json", "locust_summary.csv", "memory.csv", "memory.json", "summary.json"):
        assert (results / name).stat().st_size > 0, name

    # 4 users over 4 equally weighted paths: one user each, so every path is exercised.
    rows = {row["path"]: row for row in json.loads((results / "summary.json").read_text())["rows"]}
    for path in PATHS:
        assert rows[path]["requests"] > 0, (path, output)
        assert rows[path]["failures"] == 0, (path, output)
        assert rows[path]["audio_s_per_s"] > 0, path
        assert 0 < rows[path]["p50_ms"] <= rows[path]["p95_ms"] <= rows[path]["p99_ms"], rows[path]
    assert rows["Aggregated"]["failures"] == 0
    assert rows["Aggregated"]["requests"] == sum(rows[p]["requests"] for p in PATHS)

    # Locust's own CSV and HTML report name every path and count no failure.
    with open(results / "locust_stats.csv", newline="") as handle:
        locust_rows = {row["Name"]: row for row in csv.DictReader(handle)}
    html = (results / "report.html").read_text()
    for path in PATHS:
        assert int(locust_rows[path]["Request Count"]) > 0 and int(locust_rows[path]["Failure Count"]) == 0
        assert path in html

    memory = json.loads((results / "memory.json").read_text())
    assert memory["start_bytes"] > 0 and memory["end_bytes"] > 0 and memory["growth_percent"] is not None
    assert any(name.startswith("vocos_mel") for name in memory["per_process_end"]), memory["per_process_end"]
    assert "growth" in completed.stdout and "audio-s/s" in completed.stdout


def test_runner_duration_and_memory_report() -> None:
    runner = _load_runner()
    assert runner.parse_duration("60s") == 60 and runner.parse_duration("1m30s") == 90
    assert runner.parse_duration("45") == 45
    with pytest.raises(argparse.ArgumentTypeError):
        runner.parse_duration("soon")
    mib = 2**20
    samples = [runner.MemorySample(t, (1000 + 10 * t) * mib, 6) for t in (0, 2, 4, 10, 12, 20)]
    report = runner.memory_report(None, samples, warmup_s=10, final=None)
    # start is the first sample after the warm-up, end the last one
    assert report.start_bytes == 1100 * mib and report.end_bytes == 1200 * mib
    assert report.growth_percent == pytest.approx(100 / 11, abs=0.01)
    # with a window, start and end are medians: one sample's swing (a batch in flight) does not decide
    swinging = [runner.MemorySample(t, (1000 + (300 if t in (12, 40) else 0)) * mib, 6) for t in range(0, 42, 2)]
    report = runner.memory_report(None, swinging, warmup_s=10, final=None, window_s=8)
    assert report.start_bytes == report.end_bytes == 1000 * mib and report.growth_percent == 0


class RecordingClient:
    """Stands in for VocosClient in the bench's case table: records how each runner would call it."""

    def __init__(self) -> None:
        self.calls = []

    def synthesize(self, **kwargs):
        self.calls.append(("synthesize", 1))

    def synthesize_batch(self, items, max_concurrency):
        self.calls.append(("synthesize_batch", len(items), max_concurrency))


def test_bench_cases_send_each_batch_at_its_own_concurrency(reference_mel, reference_encodec):
    """``--batches 8 1``: the batch-8 cases must run at concurrency 8 (a late-bound loop variable made them 1)."""
    spec = importlib.util.spec_from_file_location("bench", PROJECT_ROOT / "load_tests" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    client = RecordingClient()
    cases, inputs = bench.build_cases(reference_mel, reference_encodec, client, [1], [8, 1])
    assert [(case.variant, case.batch) for case in cases] == [("mel", 8), ("encodec", 8), ("mel", 1), ("encodec", 1)]
    for case in cases:
        case.runners["triton"]()
    assert client.calls == [("synthesize_batch", 8, 8), ("synthesize_batch", 8, 8), ("synthesize", 1),
                            ("synthesize", 1)]
    assert inputs["mel-1s-b8.mel"].shape[0] == 8 and inputs["encodec-1s-b1.codes"].shape[0] == 1

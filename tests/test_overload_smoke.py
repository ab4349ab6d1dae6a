"""``make overload`` for real but tiny: the script against the session tritonserver, every phase once.

It checks that the scenario runs and reports consistent counts, not its numbers (benchmark output on
a shared machine; the lead runs the full scenario when the machine is quiet).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vocos_triton.launcher.server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "load_tests" / "overload.py"


@pytest.mark.slow
def test_tiny_overload_scenario_runs_and_reports(triton: TritonServer, tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "--url", triton.grpc_url, "--server-pid", str(triton.process.pid),
               "--concurrency", "2", "--capacity-seconds", "2", "--seconds", "3", "--load", "2",
               "--burst", "6", "--bursts", "2", "--burst-clip-seconds", "4", "--burst-deadline", "2",
               "--settle-seconds", "5", "--out", str(tmp_path),
               "--no-pin"]  # pinning would keep the session's server on one CPU for the tests after this one
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    for phrase in ("CPU:", "pinning: not pinned", "idle PSS", "capacity (1x", "open loop 2x", "goodput",
                   "burst 1/2: 6 x 4 s", "burst 2/2: 6 x 4 s", "plain tritonclient", "server PSS"):
        assert phrase in completed.stdout, completed.stdout
    report = json.loads((tmp_path / "overload.json").read_text())
    assert report["capacity_rps"] > 0
    loop = report["open_loop"]
    kinds = sum(loop[f"n_{k}"] for k in ("ok", "late", "busy", "deadline", "error"))
    assert loop["sent"] == kinds > 0 and loop["n_error"] == 0
    assert len(report["bursts"]) == 2 and report["burst"] == report["bursts"][0]
    for burst in report["bursts"]:
        assert burst["n_ok"] + burst["n_busy"] + burst["n_deadline"] + burst["n_error"] == 6, burst
        assert burst["n_error"] == 0 and burst["first_request_after_s"] > 0
    burst = report["burst"]
    assert burst["pss_peak_mb"] >= burst["pss_before_mb"] > 0 and report["idle_pss_mb"] > 0

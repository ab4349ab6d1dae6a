"""``make cluster-test`` for real (slow): three tritonserver replicas on loopback, Locust for 60 s
through nginx and then balanced by the client, one replica SIGKILLed 20 s in each time; zero failed
requests, the load spread over the survivors (each replica's own request count), and a gRPC stream
that stays on one replica. See load_tests/cluster_test.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNNER = PROJECT_ROOT / "load_tests" / "cluster_test.py"


@pytest.mark.slow
def test_replicas_survive_a_kill_behind_nginx_and_with_client_side_balancing(repository: Path, tmp_path: Path):
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed (make system-deps installs the Debian package)")
    command = [sys.executable, str(RUNNER), "--repository", str(repository), "--results-dir", str(tmp_path),
               "--duration", "60", "--kill-at", "20", "--users", "4"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=480, cwd=PROJECT_ROOT)
    report = completed.stdout[-4000:] + completed.stderr[-3000:]
    [result] = tmp_path.glob("cluster-*/cluster.json")
    phases = {phase["name"]: phase for phase in json.loads(result.read_text())}
    assert sorted(phases) == ["client-side", "nginx"], report
    for phase in phases.values():
        assert phase["requests"] > 0 and phase["failures"] == 0, report
        killed = [r for r in phase["replicas"] if r["killed"]]
        survivors = [r for r in phase["replicas"] if not r["killed"]]
        assert len(killed) == 1 and len(survivors) == 2
        assert all(r["before_kill"] > 0 for r in phase["replicas"]), report  # all three served before
        assert all(r["after_kill"] > 0 for r in survivors), report          # both survivors after
    stream = phases["client-side"]["stream"]
    assert sorted(stream.values()) == [0.0, 12.0], report  # one stream: one replica
    assert completed.returncode == 0, report

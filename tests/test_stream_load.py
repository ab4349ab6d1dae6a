"""The streaming parts of the load tests, for real but short, against the session tritonserver: the Locust
streaming users through the runner (``make load-test LOAD_PATHS=...``) and the streaming bench table."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vocos_triton.contract import STREAM_MODELS
from vocos_triton.launcher.server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RUNNER = PROJECT_ROOT / "load_tests" / "run_load_test.py"
MEL_STREAM, CODES_STREAM = STREAM_MODELS["mel"], STREAM_MODELS["codes"]
STREAM_PATHS = (MEL_STREAM, f"{MEL_STREAM}_paced", CODES_STREAM, f"{MEL_STREAM}_abandoned")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_streaming_locust_users_record_their_own_statistics(triton: TritonServer, tmp_path: Path) -> None:
    command = [
        sys.executable, str(RUNNER), "--url", triton.grpc_url, "--server-pid", str(triton.process.pid),
        "--users", "4", "--spawn-rate", "4", "--duration", "15s", "--results-dir", str(tmp_path),
        "--memory-interval", "1", "--paths", ",".join(STREAM_PATHS), "--", "--pool-size", "4", "--max-seconds", "4",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=PROJECT_ROOT)
    output = completed.stdout[-6000:] + completed.stderr[-4000:]
    assert completed.returncode == 0, output
    (results,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((results / "summary.json").read_text())
    rows = {row["path"]: row for row in summary["rows"]}
    for path in STREAM_PATHS:
        assert rows[path]["requests"] > 0 and rows[path]["failures"] == 0, (path, output)
    assert rows[MEL_STREAM]["audio_s_per_s"] > 0
    # the aggregate counts streams, not the streaming statistics recorded beside them
    assert rows["Aggregated"]["requests"] == sum(rows[p]["requests"] for p in STREAM_PATHS)
    streaming = {row["path"]: row for row in summary["streaming"]}
    for path in STREAM_PATHS:
        ttfa = streaming[path]["ttfa"]
        # (Locust's percentiles are rounded to two significant digits, so they may pass the exact max)
        assert ttfa["count"] == rows[path]["requests"] and 0 < ttfa["p50_ms"] <= ttfa["p95_ms"] and ttfa["max_ms"] > 0
    assert streaming[MEL_STREAM]["max_gap"]["count"] > 0 and streaming[MEL_STREAM]["chunk_audio"] is None
    paced = streaming[f"{MEL_STREAM}_paced"]["chunk_audio"]
    assert paced["count"] >= 10 * rows[f"{MEL_STREAM}_paced"]["requests"]  # >= 1 s clips: >= 10 chunks each
    assert streaming[f"{MEL_STREAM}_abandoned"]["max_gap"] is None
    assert "ttfa" in completed.stdout and "chunk_audio" in completed.stdout
    with open(results / "locust_stats.csv") as handle:
        stats = handle.read()
    for kind in ("stream", "ttfa", "max_gap", "chunk_audio"):
        assert f"{kind},{MEL_STREAM}" in stats, kind


def test_runner_presets_mix_streaming_and_offline_paths() -> None:
    runner = _load("run_load_test", RUNNER)
    mixed = runner.expand_paths("mixed").split(",")
    names = {item.split(":")[0] for item in mixed}
    assert {MEL_STREAM, f"{MEL_STREAM}_paced", CODES_STREAM, f"{MEL_STREAM}_abandoned"} <= names
    assert set(runner.ALL_PATHS.split(",")) <= names
    assert runner.expand_paths("vocos_mel:2") == "vocos_mel:2"


def test_streaming_bench_runs_end_to_end(triton: TritonServer, capsys) -> None:
    """A short clip, concurrency 1 and 2, one round: every number is there (no timing is asserted)."""
    stream_bench = _load("stream_bench", PROJECT_ROOT / "load_tests" / "stream_bench.py")
    result = stream_bench.run(triton.grpc_url, seconds=1.0, concurrencies=(1, 2), repeats=1, warmup=0,
                              log=lambda _: None)
    assert [(r["variant"], r["concurrency"]) for r in result["rows"]] == [
        ("mel", 1), ("mel", 2), ("codes", 1), ("codes", 2)]
    for row in result["rows"]:
        assert row["streams"] == row["concurrency"]
        assert 0 < row["ttfa_ms"]["p50"] <= row["ttfa_ms"]["p99"] and row["rtf"] > 0
    assert result["offline_mel"]["c1_latency_ms_p50"] > 0 and result["offline_mel"]["c8_rtf"] > 0
    assert result["paced"]["chunks"] > 0 and result["paced"]["p95_ms"] > 0
    assert result["ratios"]["ttfa_speedup"] > 0 and result["ratios"]["ttfa_p95_share"] is None  # no c=8 here
    stream_bench.print_report(result)
    out = capsys.readouterr().out
    assert "TTFA p50" in out and "offline vocos_mel" in out and "chunk -> its audio p95" in out

"""Launcher options that need no server: an installed tritonserver (the NGC image's /opt/tritonserver)
instead of the wheel's, and the --metrics-config settings. The command line is checked as built."""
from __future__ import annotations

from pathlib import Path

import pytest

from vocos_triton.launcher.runtime import Runtime
from vocos_triton.launcher.server import (
    DEFAULT_METRICS_CONFIG,
    TRITONSERVER_ENV,
    LaunchError,
    ServerOptions,
    TritonDistribution,
    TritonServer,
    build_parser,
)


def fake_install(root: Path) -> Path:
    """The layout of /opt/tritonserver in nvcr.io/nvidia/tritonserver:24.10-py3 (empty files)."""
    for relative in ("bin/tritonserver", "lib/libtritonserver.so", "backends/python/libtriton_python.so",
                     "backends/python/triton_python_backend_utils.py", "backends/python/triton_python_backend_stub"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"")
    return root


def test_installed_tritonserver_command_line(tmp_path, monkeypatch):
    root = fake_install(tmp_path / "opt" / "tritonserver")
    monkeypatch.setenv(TRITONSERVER_ENV, str(root))
    options = ServerOptions(model_repository=tmp_path / "models", host="0.0.0.0", build_dir=tmp_path / "build")
    assert options.tritonserver == root  # from the environment variable the Dockerfile sets
    distribution = options.distribution()
    backend_dir = distribution.assemble_backends(options.build_dir)
    server = TritonServer(options)
    command = server.command(distribution, backend_dir)
    assert command[0] == str(root / "bin" / "tritonserver")
    assert f"--backend-directory={tmp_path / 'build' / 'backends'}" in command
    assert sorted(p.name for p in (backend_dir / "python").iterdir()) == [
        "libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert all((backend_dir / "python" / p.name).resolve() == p for p in (root / "backends" / "python").iterdir())
    assert [a for a in command if a.startswith("--metrics-config=")] == [
        f"--metrics-config={s}" for s in DEFAULT_METRICS_CONFIG]
    # gRPC is public through the guard; tritonserver's own gRPC listens on loopback behind it
    assert "--grpc-address=127.0.0.1" in command and "--http-address=0.0.0.0" in command
    assert "--model-control-mode=explicit" in command
    runtime = Runtime(python=tmp_path / "venv" / "bin" / "python", python_version="3.10", torch_version="2.11.0",
                      cuda=None, prefix=tmp_path / "venv")
    env = server.environment(distribution, runtime)
    assert env["LD_LIBRARY_PATH"].split(":")[0] == str(root / "lib")
    assert env["PATH"].split(":")[0] == str(tmp_path / "venv" / "bin")


def test_installed_tritonserver_missing_stub_is_named(tmp_path):
    root = fake_install(tmp_path / "tritonserver")
    (root / "backends" / "python" / "triton_python_backend_stub").unlink()
    with pytest.raises(LaunchError, match="triton_python_backend_stub: missing from the tritonserver installation"):
        TritonDistribution.installed(root)


def test_wheel_server_is_the_default(monkeypatch):
    monkeypatch.delenv(TRITONSERVER_ENV, raising=False)
    options = ServerOptions()
    assert options.tritonserver is None
    assert "pytriton" in str(options.distribution().binary)


def test_command_line_flags(tmp_path, monkeypatch):
    monkeypatch.delenv(TRITONSERVER_ENV, raising=False)
    parser = build_parser()
    args = parser.parse_args(["--tritonserver", str(tmp_path), "--metrics-config", "summary_latencies=true",
                              "--metrics-config", " summary_quantiles = 0.5:0.05,0.99:0.001 "])
    assert args.tritonserver == tmp_path
    assert args.metrics_config == ["summary_latencies=true", "summary_quantiles=0.5:0.05,0.99:0.001"]
    assert parser.parse_args([]).metrics_config is None  # main() then serves with the defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--metrics-config", "histogram_latencies"])

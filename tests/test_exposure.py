"""Who may do what on a server exposed the way docs/exposure.md describes: admin key, API key, TLS.

One extra tritonserver for the whole module, started with everything on (admin key, API key, TLS
with a certificate ``openssl`` makes here); the session server keeps its defaults (admin key on,
inference open, plaintext), which the other test files rely on. Mutual TLS (``TLS_CA``) only adds
tritonserver flags, checked in ``test_key_files_and_flags``, not against a server.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from vocos_client import PermissionDeniedError, ServerUnavailableError, VocosClient
from vocos_client import cli as client_cli
from vocos_triton.contract import Access, Model, Tensor
from vocos_triton.launcher import access
from vocos_triton.launcher.server import ServerOptions, TritonServer, _banner, free_port

import reference_outputs as ref
from triton_helpers import make_inputs

API_KEY = "test-api-key-0123456789abcdef"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A self-signed certificate for 127.0.0.1 (the server's, and the CA its clients trust)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    return {"cert": cert, "key": key}


@pytest.fixture(scope="module")
def secured(repository: Path, certificate: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    build = tmp_path_factory.mktemp("secured-build")
    api_key_file = build / "api.key"
    api_key_file.write_text(API_KEY + "\n")
    api_key_file.chmod(0o600)
    options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=build, exit_timeout_s=10,
                            api_key_file=api_key_file,
                            tls=access.Tls(certificate["cert"], certificate["key"]))
    with TritonServer(options, log_file=build / "tritonserver.log") as server:
        yield server


def tls_raw(server: TritonServer, certificate: dict) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(certificate["cert"]))


def tls_client(server: TritonServer, certificate: dict, **kwargs) -> VocosClient:
    return VocosClient(server.grpc_url, ssl=True, root_certificates=certificate["cert"], **kwargs)


def evil_model(marker: Path) -> dict:
    """A Python model whose initialize() writes ``marker``: what an attacker would upload."""
    config = {"name": "evil", "backend": "python", "max_batch_size": 0,
              "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
              "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]}
    source = ("class TritonPythonModel:\n"
              "    def initialize(self, args):\n"
              f"        open({str(marker)!r}, 'w').write('ran')\n"
              "    def execute(self, requests):\n"
              "        return []\n")
    return {"config": json.dumps(config), "files": {"file:1/model.py": source.encode()}}


def test_admin_key_file_is_created_private_and_never_printed(secured):
    path = secured.options.admin_key_path
    assert path is not None and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert len(key) >= 32
    banner = _banner(secured)
    assert str(path) in banner and key not in banner and API_KEY not in banner
    assert key not in secured.log_file.read_text() and API_KEY not in secured.log_file.read_text()
    line = access.redact(["--x=a:b=" + key, "--y=" + API_KEY], [key, API_KEY])
    assert key not in line and API_KEY not in line and "***" in line


def test_repository_api_refused_without_the_admin_key_and_nothing_runs(secured, certificate, tmp_path):
    marker = tmp_path / "evil-ran"
    client = tls_raw(secured, certificate)
    api = secured.api_headers()  # even the API key is not the admin key
    for call in (lambda: client.load_model("evil", headers=api, **evil_model(marker)),
                 lambda: client.load_model(Model.MEL_FEATURES, headers=api),
                 lambda: client.unload_model(Model.VOCOS_MEL, headers=api),
                 lambda: client.load_model("evil", **evil_model(marker)),
                 lambda: client.unload_model(Model.VOCOS_MEL),
                 lambda: client.get_model_repository_index(),
                 lambda: client.update_log_settings({"log_verbose_level": 1}),
                 lambda: client.get_system_shared_memory_status()):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    # the same over HTTP (plaintext, loopback), with a wrong key
    request = urllib.request.Request(f"{secured.http_url}/v2/repository/models/{Model.VOCOS_MEL}/unload", data=b"{}",
                                     method="POST", headers={Access.ADMIN_KEY: "wrong-key-0123456789"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 403
    assert client.is_model_ready(Model.VOCOS_MEL) and not client.is_model_ready("evil")
    assert not marker.exists(), "the uploaded model ran"
    client.close()


def test_health_metadata_config_statistics_and_metrics_stay_open(secured, certificate):
    client = tls_raw(secured, certificate)  # no header at all
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(Model.VOCOS_MEL)
    assert client.get_model_metadata(Model.VOCOS_MEL).name == Model.VOCOS_MEL
    assert client.get_model_config(Model.VOCOS_MEL).config.name == Model.VOCOS_MEL
    assert client.get_inference_statistics(Model.VOCOS_MEL).model_stats
    client.close()
    with urllib.request.urlopen(f"{secured.http_url}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(f"{secured.http_url}/v2/models/{Model.VOCOS_MEL}", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(secured.metrics_url, timeout=5) as response:
        assert "nv_inference_request_success" in response.read().decode()


def test_inference_needs_the_api_key(secured, certificate, reference_mel, speech_1s):
    mel = ref.mel_features(reference_mel, speech_1s)
    expected = ref.mel_decode(reference_mel, mel)
    client = tls_raw(secured, certificate)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.infer(Model.VOCOS_MEL, make_inputs({Tensor.MEL: mel}), headers=secured.admin_headers())
    result = client.infer(Model.VOCOS_MEL, make_inputs({Tensor.MEL: mel}), headers=secured.api_headers())
    assert ref.max_error(result.as_numpy(Tensor.WAVEFORM)[0], expected) <= 1e-4
    client.close()
    with tls_client(secured, certificate, timeout=10) as vc:  # no key: refused at once, never retried
        with pytest.raises(PermissionDeniedError, match="api_key") as refused:
            vc.synthesize(mel=mel)
        assert refused.value.status == "StatusCode.UNAVAILABLE"
    with tls_client(secured, certificate, timeout=10, api_key="wrong-key-0123456789") as vc:
        with pytest.raises(PermissionDeniedError):
            vc.synthesize(mel=mel)
    with tls_client(secured, certificate, api_key=API_KEY, timeout=60) as vc:
        assert vc.ready()
        assert ref.max_error(vc.synthesize(mel=mel), expected) <= 1e-4


def test_cli_sends_the_api_key_from_a_file_or_the_environment(secured, certificate, reference_mel, speech_1s,
                                                              tmp_path, monkeypatch):
    import soundfile as sf

    mel = ref.mel_features(reference_mel, speech_1s)
    expected = ref.mel_decode(reference_mel, mel)
    np.save(tmp_path / "in.npy", mel)
    (tmp_path / "key").write_text(API_KEY + "\n")
    base = ["--url", secured.grpc_url, "--ssl", "--root-certificates", str(certificate["cert"]), "-q",
            "--timeout", "60"]
    monkeypatch.delenv(Access.API_KEY_ENV, raising=False)
    assert client_cli.main([*base, "ready"]) == 0  # health is open
    assert client_cli.main([*base, "mel", str(tmp_path / "in.npy"), "-o", str(tmp_path / "none.wav")]) != 0
    assert not (tmp_path / "none.wav").exists()
    assert client_cli.main([*base, "--api-key-file", str(tmp_path / "key"), "mel", str(tmp_path / "in.npy"), "-o",
                            str(tmp_path / "file.wav")]) == 0
    monkeypatch.setenv(Access.API_KEY_ENV, API_KEY)
    assert client_cli.main([*base, "mel", str(tmp_path / "in.npy"), "-o", str(tmp_path / "env.wav")]) == 0
    for name in ("file.wav", "env.wav"):
        assert ref.max_error(sf.read(str(tmp_path / name), dtype="float32")[0], expected) <= 1e-4


def test_plaintext_client_is_refused_by_a_tls_server(secured):
    with VocosClient(secured.grpc_url, api_key=API_KEY, timeout=3, backoff=0.1) as plain:
        with pytest.raises(ServerUnavailableError):
            plain.synthesize(mel=np.zeros((100, 10), np.float32))
        assert plain.ready(timeout=3) is False


def test_exposure_warnings_name_the_risks():
    assert access.exposure_warnings("127.0.0.1", tls=False, admin_key=False, api_key=False) == []
    assert access.exposure_warnings("localhost", tls=False, admin_key=False, api_key=False) == []
    open_server = " ".join(access.exposure_warnings("0.0.0.0", tls=False, admin_key=False, api_key=False))
    assert "WITHOUT AN ADMIN KEY" in open_server and "remote code execution" in open_server
    assert "WITHOUT TLS" in open_server
    closed = " ".join(access.exposure_warnings("10.0.0.5", tls=True, admin_key=True, api_key=True))
    assert "WITHOUT" not in closed


def test_key_files_and_flags(tmp_path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(access.AccessError, match="16 to 512"):
        access.read_key(short)
    created = access.read_or_create_key(tmp_path / "new.key")
    assert access.read_or_create_key(tmp_path / "new.key") == created  # read back, not replaced
    assert stat.S_IMODE(os.stat(tmp_path / "new.key").st_mode) == 0o600
    assert access.restriction_args(None, None) == []
    args = access.restriction_args("a" * 20, "b" * 20)
    assert f"--grpc-restricted-protocol={','.join(Access.ADMIN_PROTOCOLS)}:{Access.ADMIN_KEY}={'a' * 20}" in args
    assert f"--http-restricted-api=inference:{Access.API_KEY}={'b' * 20}" in args
    mutual = access.Tls(Path("c.pem"), Path("k.pem"), ca=Path("ca.pem")).args()
    assert "--grpc-use-ssl-mutual=true" in mutual and "--grpc-root-cert=ca.pem" in mutual


def test_repository_api_works_with_the_admin_key(secured, certificate, tmp_path):
    """Last in this file: a model loaded and unloaded by hand leaves the server "not ready" (strict readiness)."""
    marker = tmp_path / "evil-ran"
    client = tls_raw(secured, certificate)
    admin = secured.admin_headers()
    client.unload_model(Model.MEL_FEATURES, headers=admin)
    assert not client.is_model_ready(Model.MEL_FEATURES)
    time.sleep(2 * secured.watchdog.interval_s + 0.5)  # the watchdog must not undo an operator's unload
    assert not client.is_model_ready(Model.MEL_FEATURES) and not secured.watchdog.restarts
    client.load_model(Model.MEL_FEATURES, headers=admin)
    assert client.is_model_ready(Model.MEL_FEATURES)
    # the same upload that was refused above: with the key it runs (so the refusal above meant something)
    client.load_model("evil", headers=admin, **evil_model(marker))
    assert marker.read_text() == "ran"
    client.unload_model("evil", headers=admin)
    request = urllib.request.Request(f"{secured.http_url}/v2/repository/index", data=b"{}", method="POST",
                                     headers={Access.ADMIN_KEY: secured.options.admin_key_path.read_text().strip()})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert Model.VOCOS_MEL in response.read().decode()
    client.close()

"""Session fixtures: random checkpoints in the upstream formats, the reference models built from
them, a model repository exported from them (the default models and the test variants of other geometries),
and one real tritonserver on free loopback ports."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pytest
import torch

from vocos_triton.build import checkpoints as ck
from vocos_triton.build.export import build_repository
from vocos_triton.build.random_checkpoints import write_all, write_random_vocos_encodec, write_test_variants
from vocos_triton.launcher.server import ServerOptions, TritonServer, free_port
from vocos_triton.speech import speech_clip


def pytest_collection_modifyitems(items: list) -> None:
    """Tests marked ``ends_session_server`` (they kill or stop the session's tritonserver) run after every other
    test, in their own order, whatever files were collected after theirs."""
    items.sort(key=lambda item: item.get_closest_marker("ends_session_server") is not None)


# Tests and the server share 2 cores; keep the test process from starving the stubs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def checkpoint_paths(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("random-checkpoints"), seed=0)


@pytest.fixture(scope="session")
def mel_checkpoint(checkpoint_paths: Dict[str, Path]) -> ck.VocosCheckpoint:
    return ck.load_vocos_checkpoint(str(checkpoint_paths["vocos_mel"]), expected_variant="mel")


@pytest.fixture(scope="session")
def encodec_vocos_checkpoint(checkpoint_paths: Dict[str, Path]) -> ck.VocosCheckpoint:
    return ck.load_vocos_checkpoint(str(checkpoint_paths["vocos_encodec"]), expected_variant="encodec")


@pytest.fixture(scope="session")
def encodec_checkpoint(checkpoint_paths: Dict[str, Path]) -> ck.EncodecCheckpoint:
    return ck.load_encodec_checkpoint(str(checkpoint_paths["encodec"]))


@pytest.fixture(scope="session")
def reference_mel(mel_checkpoint: ck.VocosCheckpoint) -> torch.nn.Module:
    """``vocos.Vocos`` (mel) exactly as upstream builds it, on the random weights."""
    return ck.build_reference_vocos(mel_checkpoint)


@pytest.fixture(scope="session")
def reference_encodec(encodec_vocos_checkpoint, encodec_checkpoint) -> torch.nn.Module:
    """``vocos.Vocos`` (EnCodec variant) with its EnCodec model, on the random weights."""
    return ck.build_reference_vocos(encodec_vocos_checkpoint, encodec_checkpoint)


@pytest.fixture(scope="session")
def variant_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, ck.VocosCheckpoint]:
    """The test variants (22.05 kHz / 80 bins, 44.1 kHz / 128 bins / same / 768 x 12, a transformers-layout one),
    by variant name."""
    paths = write_test_variants(tmp_path_factory.mktemp("variant-checkpoints"), seed=0)
    return {name: ck.load_vocos_checkpoint(str(path)) for name, path in paths.items()}


#: the EnCodec-conditioned test variant: a smaller backbone than the hub's (256 x 4), its own weights
ENCODEC_VARIANT = "codec-small"


@pytest.fixture(scope="session")
def encodec_variant_checkpoint(tmp_path_factory, checkpoint_paths) -> ck.VocosCheckpoint:
    folder = write_random_vocos_encodec(tmp_path_factory.mktemp("encodec-variant") / ENCODEC_VARIANT,
                                        checkpoint_paths["encodec"], seed=3, dim=256, intermediate_dim=768,
                                        num_layers=4)
    return ck.load_vocos_checkpoint(str(folder), expected_variant="encodec")


@pytest.fixture(scope="session")
def repository(tmp_path_factory, mel_checkpoint, encodec_vocos_checkpoint, encodec_checkpoint,
               variant_checkpoints, encodec_variant_checkpoint) -> Path:
    output = tmp_path_factory.mktemp("model_repository")
    variants = [*sorted(variant_checkpoints.items()), (ENCODEC_VARIANT, encodec_variant_checkpoint)]
    build_repository(output, mel_checkpoint, encodec_vocos_checkpoint, encodec_checkpoint, random_weights=True,
                     variants=variants)
    return output


@pytest.fixture(scope="session")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    build = tmp_path_factory.mktemp("triton-build")
    options = ServerOptions(model_repository=repository, grpc_port=free_port(), http_port=free_port(),
                            metrics_port=free_port(), build_dir=build, exit_timeout_s=10)
    server = TritonServer(options, log_file=build / "tritonserver.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def grpc_client(triton: TritonServer):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def speech_1s() -> np.ndarray:
    return speech_clip(24_000, seed=0)


@pytest.fixture(scope="session")
def speech_3s() -> np.ndarray:
    """3 s of speech at a length that is a multiple of neither hop (256, 320)."""
    return speech_clip(72_001 + 17, seed=1)

"""Deployment profiles rendered from one source: each model's ``config.pbtxt`` (the CPU profile).

The GPU profile is ``<model>/configs/gpu.pbtxt``, selected with tritonserver's
``--model-config-name=gpu``. It is the CPU config with its instance groups replaced by KIND_GPU
ones; nothing else may differ, so it is rendered, never edited: ``python -m vocos_triton.launcher.profiles``
rewrites the files and ``--check`` fails if a committed one is stale.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..paths import DEFAULT_REPOSITORY

HEADER = "# Generated from ../config.pbtxt by `python -m vocos_triton.launcher.profiles`; edit config.pbtxt instead.\n"


def load_config(path: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    text_format.Parse(path.read_text(), config)
    return config


def render_gpu(config: mc.ModelConfig, gpus_per_instance: int = 1) -> str:
    """The GPU profile of a Python-backend model config: one instance on each of the first GPUs."""
    if config.platform == "ensemble":
        raise ValueError(f"{config.name}: ensembles have no instances and need no GPU profile")
    if not config.instance_group:
        raise ValueError(f"{config.name}: expected at least one instance_group to render")
    gpu = mc.ModelConfig()
    gpu.CopyFrom(config)
    for group in gpu.instance_group:  # each group keeps its name and host_policy (the watchdog's repair)
        group.kind = mc.ModelInstanceGroup.Kind.KIND_GPU
        del group.gpus[:]
        group.gpus.extend(range(gpus_per_instance))
    return HEADER + text_format.MessageToString(gpu)


def python_models(repository: Path) -> List[Path]:
    return sorted(p.parent for p in repository.glob("*/config.pbtxt") if load_config(p).backend == "python")


def render_all(repository: Path) -> Dict[Path, str]:
    return {model / "configs" / "gpu.pbtxt": render_gpu(load_config(model / "config.pbtxt"))
            for model in python_models(repository)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path, nargs="?", default=DEFAULT_REPOSITORY)
    parser.add_argument("--check", action="store_true", help="fail if a committed GPU profile is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render_all(args.repository).items():
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for path in stale:
        print(f"stale: {path} (run python -m vocos_triton.launcher.profiles)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

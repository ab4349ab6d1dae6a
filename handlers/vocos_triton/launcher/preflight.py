"""Checks of a built model repository before tritonserver starts: a clear refusal instead of a stub's trace.

A repository that builds starts; one edited afterwards (a config's dims or geometry changed by hand, an
artifact copied in from another build, an ensemble step naming a model that is not there) would fail
inside tritonserver, as an interpreter trace in a stub's log, or worse, load and misread requests. The
launcher runs :func:`check_repository` first and refuses to start with one line per problem, naming the
file and the field. (The stubs check their artifact against their config again when they load.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ..contract import Geometry, GeometryParameter
from .profiles import load_config

PROVENANCE = "provenance.json"


def _parameters(config: mc.ModelConfig) -> Dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def check_model(folder: Path, config: mc.ModelConfig) -> List[str]:
    """Problems of one Python-backend model: its geometry parameters against its dims and against the
    geometry its artifact was exported with (``1/provenance.json``)."""
    where = folder / "config.pbtxt"
    parameters = _parameters(config)
    if GeometryParameter.KIND not in parameters:
        return []  # a model without geometry (a test's own model): nothing to compare
    try:
        geometry = Geometry.from_parameters(parameters, str(where))
    except ValueError as exc:
        return [str(exc)]
    problems = []
    dims = geometry.dims_problem({tensor.name: list(tensor.dims) for tensor in [*config.input, *config.output]})
    if dims:
        problems.append(f"{where}: {dims}")
    provenance_path = folder / "1" / PROVENANCE
    if provenance_path.is_file():
        exported = json.loads(provenance_path.read_text()).get("geometry") or {}
        for key in GeometryParameter.GEOMETRY:
            if key in exported and str(exported[key]) != parameters.get(key, ""):
                problems.append(f"{where}: parameter {key!r} is {parameters.get(key, '')!r}, but the artifact was "
                                f"exported for {exported[key]!r} ({provenance_path}); rebuild with make repository")
    return problems


def check_repository(repository: Path) -> List[str]:
    """Every problem found in ``repository``'s configs (empty when it may start)."""
    problems: List[str] = []
    configs: Dict[str, mc.ModelConfig] = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            config = load_config(path)
        except text_format.ParseError as exc:
            problems.append(f"{path}: does not parse ({exc})")
            continue
        if config.name and config.name != path.parent.name:
            problems.append(f"{path}: name is {config.name!r}, but the folder is {path.parent.name!r}")
        configs[path.parent.name] = config
    for name, config in configs.items():
        if config.backend == "python":
            problems += check_model(repository / name, config)
        for step in config.ensemble_scheduling.step:
            if step.model_name not in configs:
                problems.append(f"{repository / name / 'config.pbtxt'}: ensemble step {step.model_name!r} is not "
                                f"a model of {repository}")
    return problems

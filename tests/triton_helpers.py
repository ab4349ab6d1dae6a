"""Raw tritonclient calls for the server tests (the SDK has its own tests)."""
from __future__ import annotations

import ast
from typing import Dict, Optional, Tuple

import numpy as np
import tritonclient.grpc as grpcclient

from vocos_triton.launcher import metrics


def make_inputs(inputs: Dict[str, np.ndarray], batch: bool = True) -> list:
    """``InferInput`` objects; ``batch=True`` adds the leading batch dimension of 1."""
    made = []
    for name, value in inputs.items():
        value = np.ascontiguousarray(value[None] if batch else value)
        tensor = grpcclient.InferInput(name, list(value.shape), grpcclient.np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        made.append(tensor)
    return made


def infer(client: grpcclient.InferenceServerClient, model: str, output: str = "waveform", batch: bool = True,
          **inputs: np.ndarray) -> np.ndarray:
    """One request; returns ``output`` without the batch dimension (when ``batch``)."""
    result = client.infer(model, make_inputs(inputs, batch), client_timeout=120)
    array = result.as_numpy(output)
    return array[0] if batch else array


def bandwidth_tensor(kbps: float) -> np.ndarray:
    return np.array([kbps], dtype=np.float32)


def inference_counts(client: grpcclient.InferenceServerClient, model: str) -> Tuple[int, int]:
    """(inferences, executions) tritonserver has counted for ``model``."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def settled_counts(client: grpcclient.InferenceServerClient, model: str, since: Optional[Tuple[int, int]] = None,
                   inferences: int = 0, timeout_s: float = 10.0) -> Tuple[int, int]:
    """:func:`inference_counts` once ``inferences`` more than ``since`` have landed and the counts stay put."""
    start = since or (0, 0)
    return metrics.settled(lambda: inference_counts(client, model),
                           lambda counts: counts[0] - start[0] >= inferences, timeout_s=timeout_s)


def implementation_import(model_py: str) -> ast.ImportFrom:
    """The import that gives a ``model.py`` (its source) its ``TritonPythonModel``."""
    (found,) = [n for n in ast.walk(ast.parse(model_py)) if isinstance(n, ast.ImportFrom)
                and any(alias.asname == "TritonPythonModel" for alias in n.names)]
    return found

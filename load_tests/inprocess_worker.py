"""The bench's "in-process" column: our TorchScript modules called directly, in the serving runtime.

``bench.py`` runs the reference in its own interpreter (the reference needs torchaudio, hence the
pinned torch), but the stubs run the modules in the serving runtime (``vocos_triton.launcher.runtime``, a
CPU-only torch on the CPU profile). Comparing Triton against the modules under a different torch
would measure the torch builds as much as Triton, so this worker, started with the runtime's python,
times the same modules under the same torch as the stubs.

Protocol (stdin/stdout, one line each): ``run <case>`` -> seconds the forward took (measured here,
so the pipe is not counted); ``quit``. The inputs come from an ``.npz`` the bench wrote: for each
case ``<case>.mel`` (B, 100, T) or ``<case>.codes`` (B, K, T).

    python inprocess_worker.py REPOSITORY INPUTS.npz THREADS
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from vocos_triton.contract import CODEBOOKS, ENCODEC_24KHZ, MEL_24KHZ, Model
from vocos_triton.serving.allocator import hold_freed_memory
from vocos_triton.serving.codebooks import TABLE_FILE, CodebookTable
from vocos_triton.serving.kernels import choose_linear_kernel, switchable
from vocos_triton.serving.models import vocoder_probe
from vocos_triton.serving.torchscript import ARTIFACT


def choose_kernels(vocoders: Dict[str, torch.jit.ScriptModule]) -> str:
    """What the vocoder stubs do at load (vocos_triton.serving.kernels): time the Linear kernels, keep the faster."""
    probes = {Model.VOCOS_MEL: vocoder_probe(MEL_24KHZ, 0), Model.VOCOS_ENCODEC: vocoder_probe(ENCODEC_24KHZ, 2)}
    return "; ".join(f"{name}: {choose_linear_kernel(module, probes[name], model=name).describe()}"
                     for name, module in vocoders.items() if switchable(module))


def forwards(repository: Path, inputs: Dict[str, np.ndarray]) -> Tuple[Dict[str, Callable[[], object]], str]:
    """The timed call of each case, and the linear kernels the vocoders chose."""
    load = lambda name: torch.jit.load(str(repository / name / "1" / ARTIFACT)).eval()  # noqa: E731
    vocos_mel, vocos_encodec = load(Model.VOCOS_MEL), load(Model.VOCOS_ENCODEC)
    kernels = choose_kernels({Model.VOCOS_MEL: vocos_mel, Model.VOCOS_ENCODEC: vocos_encodec})
    table = CodebookTable.load(repository / Model.ENCODEC_EMBEDDING / "1" / TABLE_FILE)

    def embedding(codes: np.ndarray) -> torch.Tensor:  # what the encodec_embedding model runs, item by item
        return torch.from_numpy(np.stack([table.features(item) for item in codes]))

    calls: Dict[str, Callable[[], object]] = {}
    for key, array in inputs.items():
        case, kind = key.rsplit(".", 1)
        tensor = torch.from_numpy(array)
        batch, frames = tensor.shape[0], torch.full((tensor.shape[0],), tensor.shape[-1])
        if kind == "mel":
            zeros = torch.zeros(batch, dtype=torch.long)
            calls[case] = lambda m=tensor, f=frames, z=zeros: vocos_mel(m, f, z)
        else:
            ids = torch.full((batch,), CODEBOOKS.index(tensor.shape[1]))  # bandwidth id
            calls[case] = lambda c=array, f=frames, i=ids: vocos_encodec(embedding(c), f, i)
    return calls, kernels


def round_robin(cases: Sequence[Any], worker: Any, repeats: int, warmup: int = 2) -> None:
    """Time every case's systems in turn: ``warmup`` rounds unrecorded, then ``repeats`` recorded (interleaved,
    so that a noisy machine's noise falls on every system alike). ``case.runners`` maps a system to a callable
    timed here, or to a string: a case of this worker (``worker.run(case)``, timed in the worker); the seconds
    go to ``case.times[system]``."""
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for case in cases:
                for system, run in case.runners.items():
                    if isinstance(run, str):
                        elapsed = worker.run(run)
                    else:
                        started = time.perf_counter()
                        run()
                        elapsed = time.perf_counter() - started
                    if round_index >= warmup:
                        case.times.setdefault(system, []).append(elapsed)


Calls = Tuple[Dict[str, Callable[[], object]], str]


def serve(argv: Sequence[str], make_calls: Callable[[Path, Dict[str, np.ndarray]], Calls]) -> int:
    """The worker's side of the protocol: ``argv`` is REPOSITORY INPUTS.npz THREADS, ``make_calls`` turns the
    repository and the inputs into the timed call of each case and the linear kernels chosen."""
    repository, inputs_path, threads = Path(argv[0]), Path(argv[1]), int(argv[2])
    hold_freed_memory()  # the stubs' heap policy (vocos_triton.serving.allocator), so the heap is not what differs
    if threads:
        torch.set_num_threads(threads)
    with np.load(inputs_path) as data:
        calls, kernels = make_calls(repository, {key: data[key] for key in data.files})
    print(f"ready torch {torch.__version__} threads {torch.get_num_threads()} linear kernels {kernels}",
          flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            command = line.split()
            if not command or command[0] == "quit":
                break
            started = time.perf_counter()
            calls[command[1]]()
            print(f"{time.perf_counter() - started:.9f}", flush=True)
    return 0


def main() -> int:
    return serve(sys.argv[1:], forwards)


if __name__ == "__main__":
    sys.exit(main())

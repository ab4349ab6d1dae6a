"""Memory of a server and its stub processes, as PSS (proportional set size).

Every Python-backend model instance is its own stub process, and most of a stub's RSS is shared
library pages (torch); summing RSS would count those once per stub. PSS splits each shared page
between the processes that map it, so the sum over the process tree is the real footprint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

from ..serving.scripts import worker_name

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region"


def stat_fields(pid: int) -> List[str]:
    """/proc/<pid>/stat after the command: state, ppid, pgrp, ... ([] when the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed process stays one until it is reaped)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> List[int]:
    """Live processes of process group ``pgid`` (the server runs in its own session, its stubs with it)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def stub_regions(pids: List[int]) -> List[Path]:
    """The /dev/shm regions named on the command lines of the stubs among ``pids``."""
    regions = []
    for pid in pids:
        if stub_model(pid) is None:
            continue
        regions += [SHM_DIR / a for a in _argv(pid) if a.startswith(SHM_PREFIX)]
    return regions


def _children(pid: int) -> List[int]:
    children: List[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process exited meanwhile
        return children
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def process_tree(pid: int) -> List[int]:
    """``pid`` and all its descendants."""
    pids, stack = [], [pid]
    while stack:
        current = stack.pop()
        pids.append(current)
        stack.extend(_children(current))
    return pids


def pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _argv(pid: int) -> List[str]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return []


def stub_model(pid: int) -> Optional[str]:
    """The model a Python-backend stub process serves (from its ``<repo>/<model>/<version>/model.py``
    argument), or None when ``pid`` is not a stub."""
    identity = stub_identity(pid)
    return identity[0] if identity else None


#: where a stub's command line names its model instance (``<group name>_<index>``), after the model file,
#: the shared-memory region and sizes, the parent's pid, the backend folder and the IPC handle
_STUB_INSTANCE_ARG = 8


def stub_identity(pid: int) -> Optional[Tuple[str, str]]:
    """(model, instance, e.g. ``vocos_mel_0_0``) of a Python-backend stub process, from one read of its
    command line; None when ``pid`` is not a stub (the instance is "" where the command line lacks it)."""
    argv = _argv(pid)
    if len(argv) <= 1 or Path(argv[0]).name != "triton_python_backend_stub":
        return None
    instance = argv[_STUB_INSTANCE_ARG] if len(argv) > _STUB_INSTANCE_ARG else ""
    return Path(argv[1]).parent.parent.name, instance


def _name(pid: int) -> str:
    """A readable name: the model a stub serves, or the command."""
    model = stub_model(pid)
    if model is not None:
        return model
    argv = _argv(pid)
    return Path(argv[0]).name if argv and argv[0] else str(pid)


def torch_workers(stubs: Iterable[int]) -> Dict[int, int]:
    """The torch host's workers serving ``stubs`` (vocos_triton.serving.torch_host): worker pid -> stub pid."""
    names = {worker_name(stub): stub for stub in stubs}
    workers = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
            except OSError:
                continue
            if comm in names and is_alive(int(entry.name)):  # not a killed worker waiting to be reaped
                workers[int(entry.name)] = names[comm]
    return workers


#: the name :func:`process_tree_pss` gives the torch host (the process its workers are forked from)
TORCH_HOST = "torch host"


def process_tree_pss(pid: int) -> Dict[str, Union[float, Dict[str, float]]]:
    """PSS of ``pid`` and its descendants: ``{"total_mb": ..., "processes": {name: mb}}``, a stub named
    by its model (the instances of one model added up), anything else by its command. A stub's torch
    worker counts with its stub, and the torch host they were forked from as :data:`TORCH_HOST` (neither
    descends from tritonserver)."""
    processes: Dict[str, float] = {}

    def add(name: str, process: int) -> None:
        try:
            mb = pss_kb(process) / 1024
        except OSError:  # exited meanwhile
            return
        processes[name] = processes.get(name, 0.0) + mb

    tree = process_tree(pid)
    for child in tree:
        add(_name(child), child)
    workers = torch_workers(child for child in tree if stub_model(child) is not None)
    for worker, stub in workers.items():
        add(_name(stub), worker)
    hosts = {int(fields[1]) for fields in map(stat_fields, workers) if fields} - {0, 1}
    for host in hosts:
        add(TORCH_HOST, host)
    return {"total_mb": sum(processes.values()), "processes": processes}

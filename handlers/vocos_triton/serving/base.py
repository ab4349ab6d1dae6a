"""What every Python-backend model of ours shares: config, validation, ragged batches, errors.

Triton's dynamic batcher hands ``execute()`` a list of requests of different lengths. Each request
is validated on its own; a bad one gets its own ``INVALID_ARG`` response and the others go on. The
valid items are sorted by length and cut into padded batches of at most ``max_padded_frames``
(items x longest item), each run as one forward of the model's artifact. A failure inside a forward
fails only the requests in that batch (``INTERNAL``), never the model.

This module needs numpy only: a model that needs no torch (``encodec_embedding``) must not pay for
importing it; nor do the TorchScript models' stubs (:class:`vocos_triton.serving.models.ScriptModel`), whose
forwards run in a torch worker.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..contract import (
    CALL_PARAMETER,
    DEADLINE_PARAMETER,
    DEFAULT_MAX_SECONDS,
    Geometry,
    GeometryParameter,
    InvalidInput,
    Limits,
    Tensor,
)
from .allocator import IDLE_RELEASE_S, MemoryReleaser
from .holding import Holding
from .metrics import AudioSeconds
from .priority import lower_compute_priority
from .windows import Progress, Steps

log = logging.getLogger("vocos_triton.serving")

#: one item's output tensors, by name, without the batch dimension
Outputs = Dict[str, np.ndarray]
#: what :meth:`RaggedBatchModel.parse_row` returns: (cost in frames, the validated row, a model's own dataclass)
Row = Tuple[int, Any]


@dataclass
class Item:
    """One row of one request, validated: ``cost`` is its length in frames (its padding cost)."""

    request: int
    row: int
    cost: int
    data: Any  # the model's row dataclass
    deadline_ns: Optional[int] = None  # when its caller stops waiting (ns since the epoch), if it said


def padded_frames(batch: Sequence[Item], overhead_frames: int) -> int:
    """What a forward of ``batch`` costs in frames: every item padded to the longest, plus a fixed cost."""
    return overhead_frames + len(batch) * max(it.cost for it in batch)


class ForwardClock:
    """How long a forward of so many padded frames takes on this instance now, learnt from its forwards.

    An average that follows the latest forwards (each weighs ``weight_of_latest``): the cores are shared
    (two instances, the other models, the guard taking a burst in), and a forward of a burst runs two
    to three times slower than the same forward alone. What it learnt expires after ``memory_s`` without a
    forward: an instance that skipped everything (nothing left to time) then runs again and relearns.
    Before any forward it knows nothing and skips nothing (the warm-up is not timed: its tiny forwards
    cost mostly their fixed overhead)."""

    def __init__(self, weight_of_latest: float = 0.5, memory_s: float = 60.0) -> None:
        self.weight_of_latest, self.memory_s = weight_of_latest, memory_s
        self.seconds_per_frame: Optional[float] = None
        self.observed_at = 0.0

    def observe(self, frames: int, seconds: float, now: Optional[float] = None) -> None:
        if frames <= 0 or seconds <= 0:
            return
        latest = seconds / frames
        known = self.known(now)
        self.seconds_per_frame = latest if known is None else (
            self.weight_of_latest * latest + (1 - self.weight_of_latest) * known)
        self.observed_at = time.monotonic() if now is None else now

    def known(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds per padded frame, or None when nothing recent is known."""
        now = time.monotonic() if now is None else now
        return self.seconds_per_frame if now - self.observed_at <= self.memory_s else None

    def estimate(self, frames: int, now: Optional[float] = None) -> float:
        """Seconds a forward of ``frames`` padded frames should take (0 when nothing recent is known)."""
        per_frame = self.known(now)
        return 0.0 if per_frame is None else frames * per_frame


def too_late(batch: Sequence[Item], now_ns: int, clock: ForwardClock, overhead_frames: int) -> List[Item]:
    """The items of ``batch`` whose caller would stop waiting before the batch's forward ends: the ones with
    the earliest deadlines, dropped one by one (each one dropped may shorten the forward enough for the
    rest)."""
    live = list(batch)
    late: List[Item] = []
    by_deadline = sorted((it for it in live if it.deadline_ns is not None), key=lambda it: it.deadline_ns)
    for item in by_deadline:
        ends_ns = now_ns + int(clock.estimate(padded_frames(live, overhead_frames)) * 1e9)
        if item.deadline_ns >= ends_ns:
            break
        late.append(item)
        live.remove(item)
        if not live:
            break
    return late


def plan_batches(items: Sequence[Item], max_padded_frames: int, overhead_frames: int = 64) -> List[List[Item]]:
    """Split items into padded batches that cost the least compute.

    A batch costs about ``overhead_frames + len(batch) * longest`` frames of work: every item is
    padded to the longest, and each forward has a fixed cost. Sorted by length, the best split is a
    partition into runs, found exactly by dynamic programming (a dynamic batch has at most a few dozen
    items). Without it, a 15 s clip would make each 1 s clip of its batch cost 15 s. No batch exceeds
    ``max_padded_frames`` unless a single item does.
    """
    ordered = sorted(items, key=lambda it: it.cost)
    count = len(ordered)
    best = [0.0] + [float("inf")] * count  # best[j]: cheapest plan for the first j items
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = ordered[end - 1].cost
        for start in range(end - 1, -1, -1):
            size = end - start
            if size > 1 and size * longest > max_padded_frames:
                break
            cost = best[start] + overhead_frames + size * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    batches: List[List[Item]] = []
    end = count
    while end > 0:
        batches.append(ordered[cut[end] : end])
        end = cut[end]
    return batches[::-1]


def pad_stack(arrays: Sequence[np.ndarray], dtype: np.dtype = np.float32, value: float = 0) -> np.ndarray:
    """Stack same-rank arrays, padding every axis to the largest size with ``value`` (at the end)."""
    shape = tuple(max(a.shape[axis] for a in arrays) for axis in range(arrays[0].ndim))
    out = np.full((len(arrays), *shape), value, dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


def server_log(pb: Any, line: str, warning: bool = False) -> None:
    """``line`` in this process's log and, through the stub's logger, in tritonserver's log."""
    (log.warning if warning else log.info)(line)
    logger = getattr(pb, "Logger", None)  # absent outside a stub
    if logger is not None:
        (logger.log_warn if warning else logger.log_info)(line)


def request_int_parameter(request: Any, name: str) -> Optional[int]:
    """The request's positive integer parameter ``name``, or None."""
    try:
        value = json.loads(request.parameters() or "{}").get(name)
    except (AttributeError, ValueError):  # a stub without parameters(), or no JSON
        return None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def request_deadline_ns(request: Any) -> Optional[int]:
    """The request's :data:`~vocos_triton.contract.DEADLINE_PARAMETER` (ns since the epoch), or None."""
    return request_int_parameter(request, DEADLINE_PARAMETER)


class TritonModel:
    """What every Python-backend model of ours reads from its config, and the helpers it shares."""

    def read_config(self, args: Dict[str, str]) -> None:
        self.pb = importlib.import_module("triton_python_backend_utils")
        self.model_config = json.loads(args["model_config"])
        self.name = self.model_config["name"]
        self.parameters = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        self.input_names = [t["name"] for t in self.model_config["input"]]
        self.output_dtypes = {
            t["name"]: self.pb.triton_string_to_numpy(t["data_type"]) for t in self.model_config["output"]
        }
        self.limits = Limits(self.float_parameter("max_seconds", DEFAULT_MAX_SECONDS))
        self.version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.geometry = self.read_geometry() if GeometryParameter.KIND in self.parameters else None

    def read_geometry(self) -> Geometry:
        """The geometry config.pbtxt publishes (``parameters``), checked against the dims it declares: a
        model that would misread its tensors must not load (ValueError, in tritonserver's log)."""
        where = f"{self.name}/config.pbtxt"
        geometry = Geometry.from_parameters(self.parameters, where)
        problem = geometry.dims_problem({t["name"]: [int(d) for d in t.get("dims", [])]
                                         for t in [*self.model_config["input"], *self.model_config["output"]]})
        if problem:
            raise ValueError(f"{where}: {problem}")
        return geometry

    def require_geometry(self) -> Geometry:
        if self.geometry is None:
            raise ValueError(f"{self.name}/config.pbtxt: no geometry parameters ({GeometryParameter.KIND!r}, ...); "
                             "rebuild the repository with make repository")
        return self.geometry

    def check_artifact(self, artifact: Dict[str, int], what: str) -> None:
        """Refuse to load an artifact whose geometry (its ``geometry()``: input_channels, n_fft, hop_length,
        centered) differs from what config.pbtxt declares: its requests would be misread or its audio cut at
        the wrong length. The message names both files and every field that differs."""
        geometry = self.require_geometry()
        expected = {"input_channels": geometry.input_channels, "n_fft": geometry.n_fft,
                    "hop_length": geometry.hop_length, "centered": int(geometry.padding == "center")}
        wrong = [f"{key}: config {value}, artifact {int(artifact[key])}" for key, value in expected.items()
                 if key in artifact and int(artifact[key]) != value]
        if wrong:
            raise ValueError(f"{self.name}: config.pbtxt ({geometry.describe()}) disagrees with {what}: "
                             f"{'; '.join(wrong)}; rebuild the repository (make repository) instead of editing "
                             "either")

    def float_parameter(self, key: str, default: float) -> float:
        value = self.parameters.get(key, "")
        return float(value) if value.strip() else default

    def read_inputs(self, request: Any) -> Dict[str, np.ndarray]:
        arrays = {}
        for name in self.input_names:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InvalidInput(name, "missing input tensor")
            arrays[name] = tensor.as_numpy()
        return arrays

    def error_response(self, message: str, code: int) -> Any:
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))


class RaggedBatchModel(TritonModel):
    """Base class of our ``TritonPythonModel`` implementations that answer each request once.

    Subclasses implement :meth:`load_artifact`, :meth:`parse_row` and :meth:`infer`.
    """

    # -- Triton entry points -------------------------------------------------------------------
    def initialize(self, args: Dict[str, str]) -> None:
        lower_compute_priority()  # model.py did already; a model built without it computes low too (priority.py)
        self.read_config(args)
        self.max_padded_frames = int(self.float_parameter("max_padded_frames", 16384))
        self.batch_overhead_frames = int(self.float_parameter("batch_overhead_frames", 64))
        # Off unless a config turns it on: asking tritonserver 2.51 whether a request was cancelled
        # (request.is_cancelled(), TRITONBACKEND_ResponseFactoryIsCancelled) crashed it (signal 11) under
        # bursts into the ensembles; the deadline the gRPC guard attaches does the same job without asking.
        self.skip_cancelled = self.parameters.get("skip_cancelled", "false").strip().lower() == "true"
        # MB of freed heap the stub may keep for its next forwards before it gives memory back (-1: keep all)
        self.memory_releaser = MemoryReleaser(self.float_parameter("retain_memory_mb", -1))
        # audio seconds returned, for capacity dashboards (models whose output is a waveform)
        self.audio_seconds = (AudioSeconds(self.pb, self.name, args.get("model_instance_name", self.name),
                                           self.require_geometry().sample_rate)
                              if Tensor.WAVEFORM in self.output_dtypes else None)
        # how long a forward takes now: items whose deadline it would outlast are not computed
        self.forward_clock = ForwardClock()
        self.holding = Holding()
        loaded = self.load_artifact(args, self.version_dir)
        self.configure()
        self.warm_up()
        self.memory_releaser.settle()
        self.after_warm_up()
        # what the stub kept for its next forwards goes back after this long without work (-1: never)
        self.memory_releaser.release_when_idle(self.float_parameter("idle_release_s", IDLE_RELEASE_S))
        log.info("%s: loaded %s", self.name, loaded)

    def execute(self, requests: List[Any]) -> List[Any]:
        # the guard's calls this batch holds: if this stub dies, they are sent again at once
        self.holding.hold(filter(None, (request_int_parameter(r, CALL_PARAMETER) for r in requests)))
        responses: List[Optional[Any]] = [None] * len(requests)
        items, rows_per_request = self.collect(requests, responses)
        results = self.run_planned(items, responses, requests)
        self.memory_releaser.after()
        self.respond(rows_per_request, results, responses)
        self.holding.release()
        return responses

    def collect(self, requests: List[Any], responses: List[Optional[Any]]) -> Tuple[List[Item], Dict[int, int]]:
        """Validate every request; a bad one gets its error response now. Returns the valid rows as
        items and the row count of each valid request."""
        rows_per_request: Dict[int, int] = {}
        items: List[Item] = []
        for r, request in enumerate(requests):
            # a request whose client gave up while it queued must not spend the cores
            if self.drop_if_cancelled(request, r, responses):
                continue
            try:
                arrays = self.read_inputs(request)
                rows = [self.parse_row({n: a[i] for n, a in arrays.items()}) for i in range(self.batch_size(arrays))]
                self.check_request(rows)
            except InvalidInput as exc:
                responses[r] = self.error_response(str(exc), self.pb.TritonError.INVALID_ARG)
                continue
            except Exception as exc:  # a bug must fail this request only, never the batch or the model
                log.exception("%s: could not read a request", self.name)
                responses[r] = self.error_response(f"{self.name}: {type(exc).__name__}: {exc}",
                                                   self.pb.TritonError.INTERNAL)
                continue
            rows_per_request[r] = len(rows)
            deadline_ns = request_deadline_ns(request)
            items.extend(Item(r, i, cost, data, deadline_ns) for i, (cost, data) in enumerate(rows))
        return items, rows_per_request

    def run_planned(self, items: List[Item], responses: List[Optional[Any]],
                    requests: Optional[Sequence[Any]] = None) -> Dict[int, Dict[int, Outputs]]:
        """Run the items in planned padded batches; returns outputs by request and row. A failed
        forward fails the requests of its batch (``INTERNAL``) and no others.

        Before each forward, the requests in it are asked again whether their client has gone, and the
        items whose deadline would pass before the forward ends (by this instance's :class:`ForwardClock`)
        are answered now instead of computed: one execution may hold eight 60 s items (seconds of work
        each), and work whose answer nobody would receive must not keep the cores from the requests queued
        behind it (after a burst of 5 s deadlines, the next request would wait for forwards started at
        4 s)."""
        results: Dict[int, Dict[int, Outputs]] = {}
        for batch in plan_batches(items, self.max_padded_frames, self.batch_overhead_frames):
            if requests is not None:
                for r in sorted({it.request for it in batch}):
                    self.drop_if_cancelled(requests[r], r, responses)
            live = [it for it in batch if responses[it.request] is None]
            if self.drop_too_late(live, {i: it.cost for i, it in enumerate(live)}, responses):
                live = [it for it in live if responses[it.request] is None]
            if not live:
                continue
            try:
                outputs = self.run_in_steps(live, responses)
            except Exception as exc:  # one failed forward must not take the other batches down
                log.exception("%s: inference failed for a batch of %d", self.name, len(live))
                for it in live:
                    responses[it.request] = self.error_response(
                        f"{self.name}: inference failed: {type(exc).__name__}: {exc}", self.pb.TritonError.INTERNAL)
                continue
            for it, out in zip(live, outputs):
                if out is not None:
                    results.setdefault(it.request, {})[it.row] = out
        return results

    def run_in_steps(self, live: List[Item], responses: List[Optional[Any]]) -> List[Optional[Outputs]]:
        """Run one planned batch through :meth:`steps`: after each of its forwards, time it on the clock and
        drop the items whose deadline would pass before the rest of their work ends. Returns each item's
        outputs (None for an item dropped, whose request then has its response)."""
        steps = self.steps([it.data for it in live])
        started = time.monotonic()
        try:
            progress = next(steps)
            while True:
                now = time.monotonic()
                frames = padded_frames(live, self.batch_overhead_frames) if progress.frames is None \
                    else progress.frames + self.batch_overhead_frames
                self.forward_clock.observe(frames, now - started)
                dropped = self.drop_too_late(live, progress.remaining, responses)
                started = time.monotonic()
                progress = steps.send(dropped)
        except StopIteration as stop:
            return stop.value

    def steps(self, items: List[Any]) -> Steps:
        """One batch as :data:`~.windows.Steps`: by default one forward (:meth:`run_batch`); a model whose
        forwards of long items take seconds cuts them (the vocoders, :mod:`.windows`)."""
        outputs = self.run_batch(items)
        yield Progress()
        return outputs

    def drop_too_late(self, live: List[Item], remaining: Dict[int, int], responses: List[Optional[Any]]) -> Set[int]:
        """Answer now the requests whose items of ``live`` would end after their caller stopped waiting, given
        the frames each still has to compute (``remaining``, by index in ``live``; items absent are done).
        Returns the indices of the items in ``remaining`` whose request has its response now."""
        pending = [replace(live[i], cost=frames) for i, frames in remaining.items()]
        late = too_late(pending, time.time_ns(), self.forward_clock, self.batch_overhead_frames)
        if late:
            self.drop_late(late, responses)
        return {i for i in remaining if responses[live[i].request] is not None}

    def drop_late(self, late: List[Item], responses: List[Optional[Any]]) -> None:
        """Answer the requests of ``late`` items: their forward would end after their caller stopped waiting."""
        requests = sorted({it.request for it in late if responses[it.request] is None})
        for r in requests:
            # UNAVAILABLE, as for a deadline already passed (drop_if_cancelled)
            responses[r] = self.error_response(
                f"{self.name}: the request's deadline would pass before its forward ends",
                self.pb.TritonError.UNAVAILABLE)
        if requests:
            log.warning("%s: skipped %d request(s) whose deadline would pass before their forward ends "
                        "(about %.2f s per 1,000 padded frames now)", self.name, len(requests),
                        self.forward_clock.estimate(1000))

    def respond(self, rows_per_request: Dict[int, int], results: Dict[int, Dict[int, Outputs]],
                responses: List[Optional[Any]]) -> None:
        """One response per request that has no error yet: its rows' outputs stacked on the batch axis."""
        for r, count in rows_per_request.items():
            if responses[r] is None:
                rows = [results[r][i] for i in range(count)]
                tensors = [
                    self.pb.Tensor(name, np.stack([row[name] for row in rows]).astype(dtype, copy=False))
                    for name, dtype in self.output_dtypes.items()
                ]
                responses[r] = self.pb.InferenceResponse(output_tensors=tensors)
                if self.audio_seconds is not None:
                    self.audio_seconds.add(sum(int(row[Tensor.WAVEFORM].shape[-1]) for row in rows))

    def finalize(self) -> None:
        """Drop what :meth:`load_artifact` loaded (override)."""

    # -- helpers for subclasses ----------------------------------------------------------------
    @staticmethod
    def batch_size(arrays: Dict[str, np.ndarray]) -> int:
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise InvalidInput(next(iter(arrays)), f"inputs disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def drop_if_cancelled(self, request: Any, r: int, responses: List[Optional[Any]]) -> bool:
        """True when request ``r`` already has a response, or is given an error one now because nobody
        waits for it any more: its deadline (:data:`~vocos_triton.contract.DEADLINE_PARAMETER`, set by
        the gRPC guard from the client's deadline) has passed, or its client cancelled it (a client that
        reaches tritonserver directly; also inside ensembles)."""
        if responses[r] is not None:
            return True
        deadline_ns = request_deadline_ns(request)
        if deadline_ns is not None and time.time_ns() >= deadline_ns:
            # UNAVAILABLE, not CANCELLED: nothing was cancelled (a CANCELLED answer is what tritonserver 2.51's
            # cancellation paths expect), and a caller that still listens may retry
            responses[r] = self.error_response(f"{self.name}: the request's deadline passed before it could run",
                                               self.pb.TritonError.UNAVAILABLE)
            log.warning("%s: skipped a request whose deadline had passed", self.name)
            return True
        if self.skip_cancelled and request.is_cancelled():
            responses[r] = self.error_response(f"{self.name}: request cancelled", self.pb.TritonError.CANCELLED)
            log.warning("%s: skipped a request cancelled by its client", self.name)
            return True
        return False

    def run_batch(self, items: List[Any]) -> List[Outputs]:
        """Run :meth:`infer` on one padded batch (a subclass may wrap it, e.g. in inference mode)."""
        return self.infer(items)

    # -- subclass hooks ------------------------------------------------------------------------
    def load_artifact(self, args: Dict[str, str], version_dir: str) -> str:
        """Load what the model runs from ``version_dir``; return a description for the log."""
        raise NotImplementedError

    def configure(self) -> None:
        """Read model-specific parameters (after the common ones)."""

    def warm_up(self) -> None:
        """Run the module once or twice so the first request does not pay TorchScript's profiling."""

    def after_warm_up(self) -> None:
        """Called once the warm-up is done and the stub's heap settled (a torch worker settles its own)."""

    def parse_row(self, row: Dict[str, np.ndarray]) -> Row:
        """Validate one row (arrays without the batch dimension); return (cost in frames, the row)."""
        raise NotImplementedError

    def check_request(self, rows: List[Row]) -> None:
        """Reject a request whose rows cannot form one output tensor (override where that can happen)."""

    def infer(self, items: List[Any]) -> List[Outputs]:
        """Run one padded batch; return each item's outputs (without the batch dimension)."""
        raise NotImplementedError

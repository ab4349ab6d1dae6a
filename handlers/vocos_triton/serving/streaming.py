"""``vocos_mel_stream`` and ``decode_codes_stream``: decoupled models under Triton's sequence batcher.

Each request carries one chunk of a sequence (``CORRID``; ``START`` on the first, ``END`` on the last)
and is answered with zero or more ``waveform`` pieces and a final-flagged response. ``execute`` only
validates and queues: a worker thread runs the sequences that have frames waiting, at most
``max_piece_frames`` frames of each per step, all of them in one padded forward of the streaming vocoder
(:class:`vocos_triton.modules.streaming.StreamingVocos`), and sends each sequence the samples that step
made final. So a long chunk's first audio leaves after one piece, sequences take turns, and the chunks of
concurrent streams share forwards.

Per sequence the stub keeps the vocoder's state (a few hundred KB) and the frames not yet run. It is
freed when the sequence ends (after the flush), when its client cancels, and when the sequence has been
idle for the sequence batcher's ``max_sequence_idle_microseconds`` (Triton drops the sequence then too).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import contract as c
from ..contract import InvalidInput, Tensor
from ..modules.streaming import piece_bounds
from .allocator import MemoryReleaser
from .base import TritonModel
from .codebooks import TABLE_FILE, CodebookTable
from .kernels import KernelChoice
from .metrics import FIRST_AUDIO, AudioSeconds, LatencyHistogram
from .priority import lower_compute_priority
from .torchscript import choose_and_log_kernel, load_torchscript

log = logging.getLogger("vocos_triton.serving.streaming")

START, END, CORRID = "START", "END", "CORRID"


@dataclass
class Chunk:
    """One request's frames, the sender that answers it, and how far the worker has run them."""

    sender: Any
    frames: np.ndarray  # (C, T) float32 features of the vocoder
    end: bool
    done: int = 0

    @property
    def remaining(self) -> int:
        return self.frames.shape[1] - self.done


@dataclass
class Sequence:
    """A stream's state between requests."""

    corrid: int
    condition: int  # bandwidth id (0 for the mel vocoder)
    state: List[torch.Tensor]
    bandwidth: Optional[c.Bandwidth] = None
    accepted: int = 0  # frames accepted from requests (the limit counts these)
    fed: int = 0  # frames run through the vocoder, flush included
    chunks: Deque[Chunk] = field(default_factory=collections.deque)
    last_active: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    heard: bool = False  # its first audio has been sent


@dataclass
class Piece:
    """What one step runs of a sequence: the next ``count`` frames of each of its waiting chunks, in order
    (all of them but the last taken whole); ``last`` when that ends the sequence (the flush is appended)."""

    sequence: Sequence
    parts: List[Tuple[Chunk, int]]
    last: bool

    @property
    def frames(self) -> int:
        return sum(count for _, count in self.parts)


class StreamingModel(TritonModel):
    """Base of the two streaming models; subclasses say how a request's tensors become vocoder frames."""

    def initialize(self, args: Dict[str, str]) -> None:
        lower_compute_priority()  # model.py did already; a model built without it computes low too
        self.read_config(args)
        batching = self.model_config.get("sequence_batching", {})
        self.idle_timeout_s = int(batching.get("max_sequence_idle_microseconds", 0) or 1_000_000_000) / 1e6
        self.max_piece_frames = int(self.float_parameter("max_piece_frames", 64))
        # a sequence's first piece is smaller: its first audio leaves sooner, later pieces batch better
        self.first_piece_frames = int(self.float_parameter("first_piece_frames", self.max_piece_frames))
        self.max_step_sequences = int(self.float_parameter("max_step_sequences", 16))
        self.max_open_sequences = int(self.float_parameter("max_open_sequences", 32))
        self.module, self.device, loaded = load_torchscript(args, self.version_dir,
                                                            int(self.float_parameter("torch_threads", 0)))
        self.cuts = {k: int(v) for k, v in self.module.geometry().items()}
        self.check_artifact(self.cuts, "model.pt")
        published = int(self.float_parameter("lookahead_frames", -1))
        if published != self.cuts["lookahead_frames"]:
            raise ValueError(f"{self.name}: config lookahead_frames is {published}, the artifact's is "
                             f"{self.cuts['lookahead_frames']}; rebuild the repository (make repository)")
        self.kernel_choice: Optional[KernelChoice] = choose_and_log_kernel(
            self.module, self.device, self.kernel_probe(), self.name, self.pb)
        self.load_extra()
        # MB of freed activations the stub may keep for its next steps (see allocator.py; -1: keep all)
        self.memory_releaser = MemoryReleaser(self.float_parameter("retain_memory_mb", -1))
        instance = args.get("model_instance_name", self.name)
        self.audio_seconds = AudioSeconds(self.pb, self.name, instance, self.require_geometry().sample_rate)
        self.first_audio = LatencyHistogram(self.pb, FIRST_AUDIO, "Seconds from a stream's first request reaching "
                                            "the model to its first audio leaving it", self.name, instance)
        self.sequences: Dict[int, Sequence] = {}  # open sequences by CORRID
        # sequences whose END was accepted and whose frames are still being run: their CORRID may already
        # start a new sequence
        self.closing: List[Sequence] = []
        self.lock = threading.Condition()
        self.running = True
        self.warm_up()
        self.memory_releaser.settle()
        self.worker = threading.Thread(target=self.run_worker, name=f"{self.name}-worker", daemon=True)
        self.worker.start()
        if self.kernel_choice is not None:
            loaded += f", linear kernel {self.kernel_choice.describe()}"
        log.info("%s: loaded %s; lookahead %d frames, pieces of <= %d frames, <= %d open sequences, idle "
                 "timeout %.0f s", self.name, loaded, self.cuts["lookahead_frames"], self.max_piece_frames,
                 self.max_open_sequences, self.idle_timeout_s)

    # -- subclass hooks ------------------------------------------------------------------------
    def load_extra(self) -> None:
        """Load what the model needs besides ``model.pt``."""

    def min_frames(self) -> int:
        """The least frames a whole sequence may have (the offline model's minimum)."""
        return self.geometry.min_frames

    def max_frames(self) -> int:
        return self.limits.max_frames(self.geometry)

    def read_chunk(self, arrays: Dict[str, np.ndarray], sequence: Optional[Sequence]) -> tuple:
        """Validate one request's tensors; return (vocoder frames (C, T), condition, bandwidth or None)."""
        raise NotImplementedError

    # -- Triton entry points -------------------------------------------------------------------
    def execute(self, requests: List[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.accept(request, sender)
            except InvalidInput as exc:
                self.fail(sender, str(exc), self.pb.TritonError.INVALID_ARG)
            except ServerBusy as exc:
                self.fail(sender, str(exc), self.pb.TritonError.UNAVAILABLE)
            except Exception as exc:  # a bug must fail this request only
                log.exception("%s: could not read a request", self.name)
                self.fail(sender, f"{self.name}: {type(exc).__name__}: {exc}", self.pb.TritonError.INTERNAL)
        return None

    def finalize(self) -> None:
        with self.lock:
            self.running = False  # the worker answers what is waiting with an error, then stops
            self.lock.notify_all()
        self.worker.join(timeout=10)
        self.module = None

    # -- accepting requests --------------------------------------------------------------------
    def control(self, request: Any, name: str) -> int:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise InvalidInput(name, "missing sequence control input (send with sequence_id / sequence_start / "
                                     "sequence_end)")
        return int(tensor.as_numpy().reshape(-1)[0])

    def accept(self, request: Any, sender: Any) -> None:
        corrid, start, end = self.control(request, CORRID), self.control(request, START), self.control(request, END)
        arrays = self.read_inputs(request)
        for name, array in arrays.items():
            if array.shape[0] != 1:
                raise InvalidInput(name, f"expected a batch of 1 chunk per request, got {array.shape[0]}")
        with self.lock:
            sequence = self.sequences.get(corrid)
            if start:
                if sequence is not None:  # a restarted id: the old stream is abandoned
                    self.drop(sequence, "restarted by a new START")
                    sequence = None
                elif len(self.sequences) >= self.max_open_sequences:
                    raise ServerBusy(f"{self.name}: server busy: {len(self.sequences)} streams are open, the most "
                                     "this model serves at once; retry shortly")
            elif sequence is None:
                raise InvalidInput(CORRID, f"sequence {corrid} was never started (send START on its first chunk) "
                                           f"or was dropped after {self.idle_timeout_s:g} s idle")
            frames, condition, bandwidth = self.read_chunk({n: a[0] for n, a in arrays.items()}, sequence)
            accepted = (sequence.accepted if sequence else 0) + frames.shape[1]
            tensor = self.input_names[0]
            c.check_sequence_total(tensor, accepted, self.max_frames(), self.limits.max_seconds)
            if end:
                try:
                    c.check_sequence_end(tensor, accepted, self.min_frames())
                except InvalidInput:
                    if sequence is not None:
                        self.drop(sequence, "ended too short")
                    raise
            if sequence is None:
                sequence = Sequence(corrid, condition, self.module.initial_state(1), bandwidth)
                self.sequences[corrid] = sequence
            sequence.accepted = accepted
            if end:
                self.sequences.pop(corrid, None)
                self.closing.append(sequence)
            sequence.last_active = time.monotonic()
            sequence.chunks.append(Chunk(sender, frames, bool(end)))
            self.lock.notify()

    def fail(self, sender: Any, message: str, code: int) -> None:
        sender.send(self.error_response(message, code), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def drop(self, sequence: Sequence, why: str) -> None:
        """Forget a sequence (with the lock held); its waiting requests are answered with an error."""
        if self.sequences.get(sequence.corrid) is sequence:
            del self.sequences[sequence.corrid]
        if sequence in self.closing:
            self.closing.remove(sequence)
        for chunk in sequence.chunks:
            try:
                self.fail(chunk.sender, f"{self.name}: sequence {sequence.corrid} {why}", self.pb.TritonError.CANCELLED)
            except Exception:  # its client may be gone: nothing to tell
                pass
        sequence.chunks.clear()
        self.pb.Logger.log_info(f"{self.name}: dropped sequence {sequence.corrid} ({why}); "
                                f"{len(self.sequences)} open")

    # -- the worker ----------------------------------------------------------------------------
    def active(self) -> List[Sequence]:
        return [*self.closing, *self.sequences.values()]

    def run_worker(self) -> None:
        while True:
            try:
                with self.lock:
                    while self.running and not any(s.chunks for s in self.active()):
                        self.lock.wait(timeout=1.0)
                        self.drop_idle()
                    if not self.running:
                        for sequence in self.active():
                            self.drop(sequence, "ended: the model is being unloaded")
                        return
                    self.drop_idle()
                    step = self.plan_step()
                if step:
                    self.run_step(step)
                    self.memory_releaser.after()
            except Exception:  # the worker must outlive any one step, or every stream would hang
                log.exception("%s: streaming worker step failed", self.name)

    def drop_idle(self) -> None:
        now = time.monotonic()
        idle = [s for s in self.sequences.values() if not s.chunks and now - s.last_active > self.idle_timeout_s]
        for sequence in idle:
            self.drop(sequence, f"idle for more than {self.idle_timeout_s:g} s")
        if idle and not self.sequences and not self.closing:
            self.memory_releaser.release()  # nothing is streaming: the heap goes back to its size at start

    def plan_step(self) -> List[Piece]:
        """Up to ``max_step_sequences`` waiting sequences, longest-waiting first, each with its next piece.

        A piece takes the sequence's waiting chunks in order up to the piece limit: a stream whose small
        chunks queued up while the server was busy catches up in a few steps instead of one chunk per step
        (at one 10-frame chunk per step it would fall further behind a paced sender under load)."""
        waiting = sorted((s for s in self.active() if s.chunks), key=lambda s: s.last_active)
        step = []
        for sequence in waiting[: self.max_step_sequences]:
            if sequence.chunks[0].sender.is_cancelled():
                self.drop(sequence, "cancelled by its client")
                continue
            room = self.first_piece_frames if sequence.fed == 0 else self.max_piece_frames
            parts: List[Tuple[Chunk, int]] = []
            for chunk in sequence.chunks:
                count = min(chunk.remaining, room)
                parts.append((chunk, count))
                room -= count
                if room == 0 or chunk.end:
                    break
            chunk, count = parts[-1]
            step.append(Piece(sequence, parts, chunk.end and count == chunk.remaining))
        return step

    def run_step(self, step: List[Piece]) -> None:
        flush = self.cuts["flush_frames"]
        pieces, lengths, positions, ends = [], [], [], []
        for piece in step:
            frames = [chunk.frames[:, chunk.done : chunk.done + count] for chunk, count in piece.parts]
            if piece.last:
                frames.append(np.zeros((frames[0].shape[0], flush), np.float32))
            pieces.append(np.concatenate(frames, axis=1) if len(frames) > 1 else frames[0])
            lengths.append(pieces[-1].shape[1])
            positions.append(piece.sequence.fed)
            ends.append(piece.sequence.fed + piece.frames)
        width = max(lengths)
        frames = np.zeros((len(step), pieces[0].shape[0], width), np.float32)
        for i, piece in enumerate(pieces):
            frames[i, :, : piece.shape[1]] = piece
        sequences = [piece.sequence for piece in step]
        state = [torch.cat([s.state[k] for s in sequences]) for k in range(len(sequences[0].state))]
        try:
            with torch.inference_mode():
                audio, new_state = self.module(
                    torch.from_numpy(frames).to(self.device), self.long(lengths), self.long(positions),
                    self.long(ends), self.long([s.condition for s in sequences]), state)
                audio = audio.cpu().numpy()
        except Exception as exc:
            log.exception("%s: a streaming step of %d sequences failed", self.name, len(step))
            with self.lock:
                for sequence in sequences:
                    self.drop(sequence, f"failed: inference error {type(exc).__name__}: {exc}")
            return
        with self.lock:
            for i, piece in enumerate(step):
                sequence = piece.sequence
                sequence.state = [tensor[i : i + 1] for tensor in new_state]
                start, stop = piece_bounds(self.cuts, positions[i], lengths[i], ends[i], piece.last)
                samples = audio[i, start:stop]
                sequence.fed += lengths[i]
                sequence.last_active = time.monotonic()
                for chunk, count in piece.parts:
                    chunk.done += count
                    finished = chunk.remaining == 0
                    if finished and sequence.chunks and sequence.chunks[0] is chunk:  # (not dropped meanwhile)
                        sequence.chunks.popleft()
                    # the step's audio goes with the newest request it ran; earlier ones only end
                    newest = chunk is piece.parts[-1][0]
                    self.send(chunk.sender, samples if newest else samples[:0], finished)
                if piece.last and sequence in self.closing:
                    self.closing.remove(sequence)
                if samples.size:
                    self.audio_seconds.add(samples.size)
                    if not sequence.heard:
                        sequence.heard = True
                        self.first_audio.observe(time.monotonic() - sequence.started)

    def send(self, sender: Any, samples: np.ndarray, final: bool) -> None:
        flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            if samples.size:
                response = self.pb.InferenceResponse(
                    output_tensors=[self.pb.Tensor(Tensor.WAVEFORM, np.ascontiguousarray(samples[None]))])
                sender.send(response, flags=flags)
            elif final:
                sender.send(flags=flags)
        except Exception:  # the client went away: its sequence is dropped when it is next seen cancelled
            log.warning("%s: could not send a piece", self.name, exc_info=True)

    def long(self, values: List[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def kernel_probe(self) -> tuple:
        """A busy step to time the Linear kernels on: 4 sequences, a full piece each, mid-stream."""
        batch, width = 4, self.max_piece_frames
        frames = torch.randn(batch, self.cuts["input_channels"], width, generator=torch.Generator().manual_seed(0))
        positions = self.long([100] * batch)
        return (frames, self.long([width] * batch), positions, positions + width, self.long([0] * batch),
                self.module.initial_state(batch))

    def warm_up(self) -> None:
        """Two forwards (TorchScript profiles its first runs) on zeros, a few pieces' worth."""
        channels = self.cuts["input_channels"]
        for _ in range(2):
            with torch.inference_mode():
                frames = torch.zeros(1, channels, self.max_piece_frames, device=self.device)
                self.module(frames, self.long([self.max_piece_frames]), self.long([0]), self.long([8]),
                            self.long([0]), self.module.initial_state(1))


class ServerBusy(RuntimeError):
    """Every sequence slot is taken: the client should retry (``UNAVAILABLE``)."""


class VocosMelStreamModel(StreamingModel):
    """mel chunks (bins, T >= 1) -> waveform pieces; the whole equals ``vocos_mel`` on the whole mel."""

    def read_chunk(self, arrays: Dict[str, np.ndarray], sequence: Optional[Sequence]) -> tuple:
        mel = arrays[Tensor.MEL]
        self.geometry.validate_features(mel, c.STREAM_CHUNK_MIN_FRAMES, self.max_frames(), Tensor.MEL)
        return np.ascontiguousarray(mel, dtype=np.float32), 0, None


class DecodeCodesStreamModel(StreamingModel):
    """EnCodec code chunks (K, T >= 1) at one bandwidth -> waveform pieces; the whole equals ``decode_codes``."""

    def load_extra(self) -> None:
        self.table = CodebookTable.load(f"{self.version_dir}/{TABLE_FILE}")

    def read_chunk(self, arrays: Dict[str, np.ndarray], sequence: Optional[Sequence]) -> tuple:
        bandwidth = c.Bandwidth.parse(arrays[Tensor.BANDWIDTH])
        if sequence is not None and sequence.bandwidth != bandwidth:
            raise InvalidInput(Tensor.BANDWIDTH, f"expected the sequence's bandwidth, {sequence.bandwidth.kbps:g} "
                                                 f"kbps, for every chunk, got {bandwidth.kbps:g}")
        codes = arrays[Tensor.CODES]
        self.geometry.validate_codes(codes, bandwidth, c.STREAM_CHUNK_MIN_FRAMES, self.max_frames())
        return self.table.features(codes), bandwidth.index, bandwidth

"""Streaming synthesis: exact pieces for any chunking, the published lookahead, the sequence life cycle.

Module tests run :class:`StreamingVocos` in this process; server tests drive ``vocos_mel_stream`` and
``decode_codes_stream`` over one gRPC stream with raw tritonclient (the SDK's ``stream()`` has its own tests).
"""
from __future__ import annotations

import contextlib
import json
import queue
import re
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from vocos_triton.contract import MEL_24KHZ, Limits, Model, Tensor
from vocos_triton.launcher.memory import pss_kb
from vocos_triton.launcher.watchdog import python_stubs
from vocos_triton.modules.streaming import StreamingVocos, decode_in_chunks, piece_bounds
from vocos_triton.modules.vocoder import BatchedVocos
from vocos_triton.speech import speech_clip

import reference_outputs as ref
from triton_helpers import bandwidth_tensor, infer, make_inputs

LOOKAHEAD = 29
REQUEST_ID = re.compile(r"\[request id: (\d+)\]")
STREAM_TIMEOUT_S = 120.0


def random_chunks(total: int, rng: np.random.Generator, largest: int) -> List[int]:
    chunks, covered = [], 0
    while covered < total:
        chunks.append(int(min(rng.integers(1, largest + 1), total - covered)))
        covered += chunks[-1]
    return chunks


def chunkings(total: int, seed: int = 0) -> Dict[str, List[int]]:
    rng = np.random.default_rng(seed)
    return {
        "one chunk": [total],
        "1-frame chunks": [1] * total,
        "random up to 40": random_chunks(total, rng, 40),
        "random up to 300 (beyond max_piece_frames)": random_chunks(total, rng, 300),
    }


@pytest.fixture(scope="module")
def mel_vocoders(reference_mel):
    offline = BatchedVocos(reference_mel).eval()
    return offline, StreamingVocos(offline).eval()


@pytest.fixture(scope="module")
def encodec_vocoders(reference_encodec):
    offline = BatchedVocos(reference_encodec).eval()
    return offline, StreamingVocos(offline).eval()


@pytest.fixture(scope="module")
def speech_mel(reference_mel) -> np.ndarray:
    """(100, T) log-mel of 2.5 s of speech."""
    return ref.mel_features(reference_mel, speech_clip(60_000 + 77, seed=3))


@pytest.fixture(scope="module")
def speech_codes(reference_encodec) -> np.ndarray:
    """(8, T) codes of 2.5 s of speech at 6 kbps."""
    return ref.encodec_codes(reference_encodec, speech_clip(60_000 + 77, seed=4), 6.0)


def offline_decode(offline: BatchedVocos, features: np.ndarray, condition: int) -> torch.Tensor:
    frames = features.shape[1]
    with torch.inference_mode():
        out = offline(torch.from_numpy(features)[None], torch.tensor([frames]), torch.tensor([condition]))
    return out[0, : int(offline.output_samples(torch.tensor([frames]))[0])]


# -- the module ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mel", "encodec"])
def test_chunked_decoding_equals_offline_and_reference_for_any_chunking(
        variant, mel_vocoders, encodec_vocoders, speech_mel, speech_codes, reference_mel, reference_encodec):
    if variant == "mel":
        (offline, streaming), features, condition = mel_vocoders, speech_mel, 0
        reference = ref.mel_decode(reference_mel, features)
    else:
        (offline, streaming), condition = encodec_vocoders, 2
        features = ref.codes_to_features(reference_encodec, speech_codes)
        reference = ref.encodec_decode(reference_encodec, features, 6.0)
    whole = offline_decode(offline, features, condition)
    for name, chunks in chunkings(features.shape[1]).items():
        with torch.inference_mode():
            pieces = decode_in_chunks(streaming, torch.from_numpy(features), chunks, condition)
        audio = torch.cat(pieces).numpy()
        assert audio.shape == whole.shape, name
        assert float(np.abs(audio - whole.numpy()).max()) <= 1e-5, name
        assert ref.max_error(audio, reference) <= 1e-4, name


def test_sequences_sharing_a_forward_equal_each_alone(mel_vocoders, speech_mel):
    """Three sequences at different positions, chunk lengths and end states in one padded forward."""
    _, streaming = mel_vocoders
    features = torch.from_numpy(speech_mel)
    plans = [[5, 31, 60], [40, 1, 17], [2, 70, 9]]  # per sequence: chunk sizes; all end on their last step
    with torch.inference_mode():
        alone = [torch.cat(decode_in_chunks(streaming, features[:, : sum(p)], p)) for p in plans]
    geometry = {k: int(v) for k, v in streaming.geometry().items()}
    states = [streaming.initial_state(1) for _ in plans]
    positions, real = [0] * len(plans), [0] * len(plans)
    together: List[List[torch.Tensor]] = [[] for _ in plans]
    with torch.inference_mode():
        for step in range(3):
            last = step == 2
            pieces = []
            for i, plan in enumerate(plans):
                piece = features[:, real[i] : real[i] + plan[step]]
                if last:
                    piece = torch.cat([piece, piece.new_zeros(piece.shape[0], geometry["flush_frames"])], dim=1)
                pieces.append(piece)
            lengths = [p.shape[1] for p in pieces]
            batch = torch.zeros(len(plans), features.shape[0], max(lengths))
            for i, piece in enumerate(pieces):
                batch[i, :, : lengths[i]] = piece
            ends = [real[i] + plans[i][step] for i in range(len(plans))]
            state = [torch.cat([s[k] for s in states]) for k in range(len(states[0]))]
            audio, new_state = streaming(batch, torch.tensor(lengths), torch.tensor(positions), torch.tensor(ends),
                                         torch.zeros(len(plans), dtype=torch.long), state)
            for i in range(len(plans)):
                states[i] = [t[i : i + 1] for t in new_state]
                start, stop = piece_bounds(geometry, positions[i], lengths[i], ends[i], last)
                together[i].append(audio[i, start:stop])
                positions[i] += lengths[i]
                real[i] = ends[i]
    for i in range(len(plans)):
        assert float((torch.cat(together[i]) - alone[i]).abs().max()) <= 1e-5


@contextlib.contextmanager
def full_layer_scale(reference):
    """The reference with every ConvNeXt layer scale (gamma) at 1 for the duration: vocos initialises them
    at 1 / 8, which shrinks a frame's influence 27 frames away by about 8**-8, below float32 resolution of
    the audio with random weights. The receptive field, and so the lookahead, is the architecture's."""
    blocks = reference.backbone.convnext
    saved = [block.gamma.detach().clone() for block in blocks]
    with torch.no_grad():
        for block in blocks:
            block.gamma.fill_(1.0)
    try:
        yield reference
    finally:
        with torch.no_grad():
            for block, gamma in zip(blocks, saved):
                block.gamma.copy_(gamma)


@pytest.mark.parametrize("variant", ["mel", "encodec"])
def test_published_lookahead_is_exact(variant, reference_mel, reference_encodec, speech_mel, speech_codes):
    """Change every frame from F on and decode with the reference: hop block j is bit-identical for every
    j <= F - 1 - lookahead, and block F - lookahead is not, so one frame less lookahead would change the
    audio. (Same lengths on both sides, so "identical" is exact: 0.0, not a tolerance.) The stream, having
    received F frames, has sent exactly the samples that cannot change."""
    rng = np.random.default_rng(5)
    reference = reference_mel if variant == "mel" else reference_encodec
    with full_layer_scale(reference):
        if variant == "mel":
            features, hop, condition = speech_mel, MEL_24KHZ.hop_length, 0

            def decode(x):
                return ref.mel_decode(reference, x)
        else:
            features = ref.codes_to_features(reference, speech_codes)
            hop, condition = 320, 2

            def decode(x):
                return ref.encodec_decode(reference, x, 6.0)
        streaming = StreamingVocos(BatchedVocos(reference)).eval()
        assert int(streaming.lookahead_frames()) == LOOKAHEAD
        geometry = {k: int(v) for k, v in streaming.geometry().items()}
        full = decode(features)
        for received in (40, 77, 150):
            changed = features.copy()
            changed[:, received:] = rng.standard_normal(changed[:, received:].shape).astype(np.float32) * 3 - 2
            other = decode(changed)
            final = (received - LOOKAHEAD) * hop  # blocks 0 .. received - 1 - LOOKAHEAD
            assert float(np.abs(other[:final] - full[:final]).max()) == 0.0, received
            assert float(np.abs(other[final : final + hop] - full[final : final + hop]).max()) > 0.0, received
            with torch.inference_mode():
                audio, _ = streaming(torch.from_numpy(features[None, :, :received]), torch.tensor([received]),
                                     torch.tensor([0]), torch.tensor([received]), torch.tensor([condition]),
                                     streaming.initial_state(1))
            start, stop = piece_bounds(geometry, 0, received, received, last=False)
            sent = stop - start
            assert final <= sent < final + hop
            assert float(np.abs(other[:sent] - full[:sent]).max()) == 0.0
            assert float(np.abs(audio[0, start:stop].numpy() - full[:sent]).max()) <= 1e-5


def test_exported_streaming_artifacts_record_their_checks(repository):
    for model in (Model.VOCOS_MEL_STREAM, Model.DECODE_CODES_STREAM):
        provenance = json.loads((repository / model / "1" / "provenance.json").read_text())
        assert provenance["parity"]["lookahead_frames"] == LOOKAHEAD
        assert provenance["parity"]["max_abs_error_vs_reference"] <= 1e-4
        assert provenance["parity"]["max_abs_error_script_vs_eager"] <= 1e-5
    assert (repository / Model.DECODE_CODES_STREAM / "1" / "codebooks.npy").is_file()


# -- the server ----------------------------------------------------------------------------------------


class Stream:
    """One gRPC stream to the server; requests of several sequences may be interleaved on it.

    A stream's errors arrive as messages without a gRPC status (the stream protocol carries only the
    text), so the tests read the messages; the SDK classifies them the same way.
    """

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue[Tuple[object, object]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, model: str, sequence_id: int, start: bool, end: bool, **inputs: np.ndarray) -> None:
        self.client.async_stream_infer(model, make_inputs(inputs), request_id=f"{sequence_id}", sequence_id=sequence_id,
                                       sequence_start=start, sequence_end=end, enable_empty_final_response=True)

    def collect(self, finals: int) -> Tuple[Dict[int, List[np.ndarray]], Dict[int, List[str]]]:
        """Wait for ``finals`` final responses; pieces and errors by sequence (request) id, in order."""
        pieces: Dict[int, List[np.ndarray]] = {}
        errors: Dict[int, List[str]] = {}
        while finals:
            result, error = self.results.get(timeout=STREAM_TIMEOUT_S)
            if error is not None:
                match = REQUEST_ID.search(error.message())
                errors.setdefault(int(match.group(1)) if match else -1, []).append(
                    f"{error.status()} {error.message()}")
                finals -= 1
                continue
            response = result.get_response()
            sequence = int(response.id)
            waveform = result.as_numpy(Tensor.WAVEFORM)
            if waveform is not None:
                pieces.setdefault(sequence, []).append(waveform[0])
            if response.parameters["triton_final_response"].bool_param:
                finals -= 1
        return pieces, errors

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


@pytest.fixture()
def stream(triton):
    opened = Stream(triton.grpc_url)
    yield opened
    opened.close()


def send_sequence(stream: Stream, model: str, sequence_id: int, chunks: Sequence[np.ndarray],
                  **constant: np.ndarray) -> None:
    for i, chunk in enumerate(chunks):
        tensor = Tensor.MEL if model == Model.VOCOS_MEL_STREAM else Tensor.CODES
        stream.send(model, sequence_id, i == 0, i == len(chunks) - 1, **{tensor: chunk}, **constant)


def split(array: np.ndarray, sizes: Sequence[int]) -> List[np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    return [np.ascontiguousarray(array[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seconds", [1, 10, 60])
def test_served_mel_stream_equals_vocos_mel_and_the_reference(triton, grpc_client, stream, reference_mel, seconds):
    mel = ref.mel_features(reference_mel, speech_clip(seconds * 24_000 + 123, seed=seconds))
    offline = infer(grpc_client, Model.VOCOS_MEL, mel=mel)
    reference = ref.mel_decode(reference_mel, mel)
    cases = chunkings(mel.shape[1], seed=seconds)
    if seconds == 60:  # 5,600 one-frame requests would only test patience
        del cases["1-frame chunks"]
    for sequence_id, sizes in enumerate(cases.values(), start=1):
        send_sequence(stream, Model.VOCOS_MEL_STREAM, sequence_id, split(mel, sizes))
    pieces, errors = stream.collect(sum(len(s) for s in cases.values()))
    assert not errors
    for sequence_id, name in enumerate(cases, start=1):
        audio = np.concatenate(pieces[sequence_id])
        assert audio.shape == (MEL_24KHZ.waveform_samples(mel.shape[1]),), name
        assert ref.max_error(audio, offline) <= 1e-5, name
        assert ref.max_error(audio, reference) <= 1e-4, name


def test_eight_interleaved_streams_of_both_models_are_exact(triton, grpc_client, stream, reference_mel,
                                                            reference_encodec):
    """Chunks of 8 sequences (4 mel, 4 codes at every bandwidth) interleaved on one stream, so the
    worker runs pieces of several sequences in each forward."""
    rng = np.random.default_rng(8)
    jobs = {}
    for i in range(8):
        audio = speech_clip(int(rng.integers(24_000, 3 * 24_000)), seed=20 + i)
        if i % 2 == 0:
            mel = ref.mel_features(reference_mel, audio)
            jobs[100 + i] = (Model.VOCOS_MEL_STREAM, split(mel, random_chunks(mel.shape[1], rng, 30)), {},
                             infer(grpc_client, Model.VOCOS_MEL, mel=mel))
        else:
            bandwidth = [1.5, 3.0, 6.0, 12.0][i // 2]
            codes = ref.encodec_codes(reference_encodec, audio, bandwidth)
            constant = {Tensor.BANDWIDTH: bandwidth_tensor(bandwidth)}
            jobs[100 + i] = (Model.DECODE_CODES_STREAM, split(codes, random_chunks(codes.shape[1], rng, 30)), constant,
                             infer(grpc_client, Model.DECODE_CODES, codes=codes, **constant))
    longest = max(len(chunks) for _, chunks, _, _ in jobs.values())
    for step in range(longest):
        for sequence_id, (model, chunks, constant, _) in jobs.items():
            if step < len(chunks):
                tensor = Tensor.MEL if model == Model.VOCOS_MEL_STREAM else Tensor.CODES
                stream.send(model, sequence_id, step == 0, step == len(chunks) - 1, **{tensor: chunks[step]},
                            **constant)
    pieces, errors = stream.collect(sum(len(chunks) for _, chunks, _, _ in jobs.values()))
    assert not errors
    for sequence_id, (_, _, _, offline) in jobs.items():
        assert ref.max_error(np.concatenate(pieces[sequence_id]), offline) <= 1e-5


def _error_of(stream: Stream, finals: int = 1) -> Tuple[Dict[int, List[np.ndarray]], List[str]]:
    pieces, errors = stream.collect(finals)
    return pieces, [e for messages in errors.values() for e in messages]


BAD_CHUNKS = {
    # Triton's own shape check answers this one, before the stub
    "wrong bins": (Model.VOCOS_MEL_STREAM, {Tensor.MEL: np.zeros((80, 5), np.float32)}, "input 'mel'"),
    "NaN": (Model.VOCOS_MEL_STREAM, {Tensor.MEL: np.full((100, 5), np.nan, np.float32)}, "mel: expected finite"),
    "Inf": (Model.VOCOS_MEL_STREAM, {Tensor.MEL: np.full((100, 5), np.inf, np.float32)}, "mel: expected finite"),
    "codes out of range": (Model.DECODE_CODES_STREAM, {Tensor.CODES: np.full((8, 5), 1024, np.int64),
                                                      Tensor.BANDWIDTH: bandwidth_tensor(6.0)},
                           "codes: expected values in [0, 1024)"),
    "K not matching the bandwidth": (Model.DECODE_CODES_STREAM, {Tensor.CODES: np.zeros((4, 5), np.int64),
                                                                Tensor.BANDWIDTH: bandwidth_tensor(6.0)},
                                     "codes: 4 codebooks do not match bandwidth 6 kbps"),
    "bandwidth change": (Model.DECODE_CODES_STREAM, {Tensor.CODES: np.zeros((4, 5), np.int64),
                                                    Tensor.BANDWIDTH: bandwidth_tensor(3.0)},
                         "bandwidth: expected the sequence's bandwidth, 6 kbps"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
def test_a_bad_chunk_is_refused_and_the_sequence_goes_on(triton, grpc_client, stream, speech_mel, speech_codes,
                                                         case):
    model, bad, message = BAD_CHUNKS[case]
    if model == Model.VOCOS_MEL_STREAM:
        good, constant, tensor = speech_mel[:, :120], {}, Tensor.MEL
        offline = infer(grpc_client, Model.VOCOS_MEL, mel=good)
    else:
        good, constant, tensor = speech_codes[:, :120], {Tensor.BANDWIDTH: bandwidth_tensor(6.0)}, Tensor.CODES
        offline = infer(grpc_client, Model.DECODE_CODES, codes=good, **constant)
    first, second = split(good, [50, 70])
    stream.send(model, 7, True, False, **{tensor: first}, **constant)
    stream.send(model, 7, False, False, **bad)
    pieces, errors = _error_of(stream, 2)
    assert len(errors) == 1 and message in errors[0], errors
    stream.send(model, 7, False, True, **{tensor: second}, **constant)
    more, errors = _error_of(stream, 1)
    assert not errors
    audio = np.concatenate(pieces.get(7, []) + more[7])
    assert ref.max_error(audio, offline) <= 1e-5


def test_a_chunk_for_a_sequence_that_never_started_is_refused(stream, speech_mel):
    stream.send(Model.VOCOS_MEL_STREAM, 991, False, False, **{Tensor.MEL: speech_mel[:, :10]})
    _, errors = _error_of(stream)
    assert len(errors) == 1 and "991" in errors[0] and "START" in errors[0], errors


def test_a_sequence_is_refused_at_the_chunk_that_crosses_the_limit(stream):
    limit = Limits().max_frames(MEL_24KHZ)
    silence = np.full((100, limit), -11.5, np.float32)
    stream.send(Model.VOCOS_MEL_STREAM, 61, True, False, **{Tensor.MEL: silence[:, : limit - 10]})
    stream.send(Model.VOCOS_MEL_STREAM, 61, False, False, **{Tensor.MEL: silence[:, :11]})
    pieces, errors = _error_of(stream, 2)
    assert len(errors) == 1 and "at most 5626 frames" in errors[0] and "5627" in errors[0], errors
    stream.send(Model.VOCOS_MEL_STREAM, 61, False, True, **{Tensor.MEL: silence[:, :10]})
    more, errors = _error_of(stream, 1)
    assert not errors
    assert sum(p.shape[0] for p in pieces.get(61, []) + more[61]) == MEL_24KHZ.waveform_samples(limit)


def test_a_too_short_sequence_is_refused_at_its_end(stream, speech_mel):
    stream.send(Model.VOCOS_MEL_STREAM, 62, True, True, **{Tensor.MEL: speech_mel[:, :1]})
    _, errors = _error_of(stream)
    assert len(errors) == 1 and "at least 2 frames" in errors[0], errors


def test_first_audio_of_a_long_chunk_leaves_before_the_chunk_is_done(stream, speech_mel):
    """A 2.5 s chunk is answered in pieces (first_piece_frames, then max_piece_frames): several responses."""
    stream.send(Model.VOCOS_MEL_STREAM, 63, True, True, **{Tensor.MEL: speech_mel})
    pieces, errors = _error_of(stream)
    assert not errors and len(pieces[63]) >= 3
    assert sum(p.shape[0] for p in pieces[63]) == MEL_24KHZ.waveform_samples(speech_mel.shape[1])


def test_a_backlog_of_small_chunks_is_run_in_whole_pieces(grpc_client, stream, speech_mel):
    """200 one-frame chunks sent at once queue up faster than the worker runs them: a step takes the
    waiting chunks together (up to a piece), so the stream catches up in a few steps; every request is
    still answered, in order, and the audio is exact."""
    mel = np.ascontiguousarray(speech_mel[:, :200])
    offline = infer(grpc_client, Model.VOCOS_MEL, mel=mel)
    send_sequence(stream, Model.VOCOS_MEL_STREAM, 64, split(mel, [1] * 200))
    pieces, errors = stream.collect(200)
    assert not errors
    assert len(pieces[64]) < 100  # one chunk per step would make about 170 pieces
    assert ref.max_error(np.concatenate(pieces[64]), offline) <= 1e-5


def stub_pss_mb(triton, model: str) -> float:
    (pid,) = [pid for pid, name in python_stubs(triton.process.pid).items() if name == model]
    return pss_kb(pid) / 1024


def test_abandoned_streams_are_freed_after_the_idle_timeout_and_extra_streams_are_refused(triton, speech_mel):
    """Open every slot and vanish: one more stream is refused (UNAVAILABLE, retryable); after the idle
    timeout the slots are free again and the stub's memory is back where it was."""
    config = grpcclient.InferenceServerClient(triton.grpc_url).get_model_config(Model.VOCOS_MEL_STREAM,
                                                                                as_json=True)["config"]
    slots = int(config["parameters"]["max_open_sequences"]["string_value"])
    idle_s = int(config["sequence_batching"]["max_sequence_idle_microseconds"]) / 1e6
    before = stub_pss_mb(triton, Model.VOCOS_MEL_STREAM)  # the stub has streamed (earlier tests) and settled
    abandoned = Stream(triton.grpc_url)
    for sequence_id in range(1000, 1000 + slots):
        abandoned.send(Model.VOCOS_MEL_STREAM, sequence_id, True, False, **{Tensor.MEL: speech_mel[:, :40]})
    abandoned.collect(slots)
    abandoned.send(Model.VOCOS_MEL_STREAM, 2000, True, False, **{Tensor.MEL: speech_mel[:, :40]})
    _, errors = abandoned.collect(1)
    refused = [e for messages in errors.values() for e in messages]
    assert len(refused) == 1 and "server busy" in refused[0], refused
    abandoned.client.stop_stream(cancel_requests=True)  # the client vanishes without END
    abandoned.client.close()
    time.sleep(idle_s + 2.5)
    after = stub_pss_mb(triton, Model.VOCOS_MEL_STREAM)
    fresh = Stream(triton.grpc_url)
    try:
        for sequence_id in range(3000, 3000 + slots):
            fresh.send(Model.VOCOS_MEL_STREAM, sequence_id, True, True, **{Tensor.MEL: speech_mel[:, :40]})
        _, errors = fresh.collect(slots)
        assert not errors, json.dumps({k: v[:1] for k, v in errors.items()})
    finally:
        fresh.close()
    assert after <= before + 16, (before, after)

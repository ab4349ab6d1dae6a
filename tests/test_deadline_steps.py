"""Long batches in windows (serving/windows.py) and the skipping of work that would outlast its deadline
(serving/base.py: ForwardClock, too_late, run_in_steps): exact audio, and the decisions, on real modules.

The served path (a burst whose work is skipped, the next request answered at once) is measured by
``make overload`` and exercised by tests/test_never_fall_over.py.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Set

import numpy as np
import pytest
import torch

from vocos_triton.build import checkpoints as ck
from vocos_triton.contract import MEL_24KHZ, Geometry
from vocos_triton.modules.vocoder import BatchedVocos
from vocos_triton.serving.base import ForwardClock, Item, RaggedBatchModel, padded_frames, too_late
from vocos_triton.serving.windows import Progress, decode_in_windows
from vocos_triton.speech import speech_clip

import reference_outputs as ref


def decode_whole(module: BatchedVocos, features: List[np.ndarray], condition: int) -> np.ndarray:
    lengths = torch.tensor([f.shape[1] for f in features])
    padded = torch.zeros(len(features), features[0].shape[0], int(lengths.max()))
    for i, f in enumerate(features):
        padded[i, :, : f.shape[1]] = torch.from_numpy(f)
    with torch.inference_mode():
        return module(padded, lengths, torch.full((len(features),), condition)).numpy()


def run_windows(module: BatchedVocos, features: List[np.ndarray], geometry: Geometry, window: int, condition: int,
                drop: Optional[Dict[int, Set[int]]] = None) -> tuple:
    """decode_in_windows over ``module``; ``drop[step]``: the items the driver drops after that step."""
    lengths = [f.shape[1] for f in features]
    context = int(module.geometry()["context_frames"])

    def decode(members: List[int], first: int, end: int) -> np.ndarray:
        return decode_whole(module, [features[i][:, first : min(end, lengths[i])] for i in members], condition)

    steps = decode_in_windows(lengths, decode, window, context, geometry.hop_length, geometry.waveform_samples)
    progress: List[Progress] = []
    try:
        progress.append(next(steps))
        while True:
            progress.append(steps.send((drop or {}).get(len(progress) - 1, set())))
    except StopIteration as stop:
        return stop.value, progress


@pytest.fixture(scope="module")
def vocoders(reference_mel, variant_checkpoints) -> Dict[str, tuple]:
    """(BatchedVocos, geometry) for the charactr mel geometry (center) and music-44k (same, 768 x 12)."""
    music = variant_checkpoints["music-44k"]
    return {"mel-24k-center": (BatchedVocos(reference_mel).eval(), MEL_24KHZ),
            "music-44k-same": (BatchedVocos(ck.build_reference_vocos(music)).eval(), music.geometry)}


def test_the_context_is_what_the_backbone_and_the_istft_reach(vocoders):
    mel, _ = vocoders["mel-24k-center"]
    music, _ = vocoders["music-44k-same"]
    assert int(mel.geometry()["context_frames"]) == 3 + 3 * 8 + 4
    assert int(music.geometry()["context_frames"]) == 3 + 3 * 12 + 4


@pytest.mark.parametrize("name", ["mel-24k-center", "music-44k-same"])
def test_windows_equal_one_forward_and_the_reference(name, vocoders):
    module, geometry = vocoders[name]
    rng = np.random.default_rng(5)
    # a long item cut in several windows, one ending just past a window, one shorter than a window, one
    # exactly on a boundary
    lengths = [1900, 1025, 40, 1536]
    features = [rng.standard_normal((geometry.input_channels, n)).astype(np.float32) for n in lengths]
    whole = decode_whole(module, features, 0)
    for window in (512, 700):
        audio, progress = run_windows(module, features, geometry, window, 0)
        assert len(progress) == -(-max(lengths) // window)
        assert progress[-1].remaining == {}
        for i, n in enumerate(lengths):
            expected = whole[i, : geometry.waveform_samples(n)]
            assert audio[i].shape == expected.shape, (name, window, i)
            assert float(np.abs(audio[i] - expected).max()) <= 1e-5, (name, window, i)


def test_windowed_speech_equals_the_reference(vocoders, reference_mel):
    module, geometry = vocoders["mel-24k-center"]
    mel = ref.mel_features(reference_mel, speech_clip(12 * 24_000 + 77, seed=8))
    audio, progress = run_windows(module, [mel], geometry, 512, 0)
    assert len(progress) > 2
    assert ref.max_error(audio[0], ref.mel_decode(reference_mel, mel)) <= 1e-4


def test_a_dropped_item_stops_being_computed_and_the_others_finish(vocoders):
    module, geometry = vocoders["mel-24k-center"]
    rng = np.random.default_rng(6)
    lengths = [2000, 1800]
    features = [rng.standard_normal((100, n)).astype(np.float32) for n in lengths]
    audio, progress = run_windows(module, features, geometry, 512, 0, drop={0: {1}})
    assert audio[1] is None
    assert 1 not in progress[1].remaining and progress[1].frames < 2 * (512 + 2 * 31)  # one member left
    expected = decode_whole(module, features[:1], 0)[0, : geometry.waveform_samples(lengths[0])]
    assert float(np.abs(audio[0] - expected).max()) <= 1e-5


# -- the clock and the decision ---------------------------------------------------------------------


def test_the_clock_follows_the_latest_forwards_and_forgets():
    clock = ForwardClock(weight_of_latest=0.5, memory_s=60.0)
    assert clock.estimate(1000, now=0.0) == 0.0  # knows nothing: skips nothing
    clock.observe(1000, 0.3, now=1.0)
    assert clock.estimate(2000, now=2.0) == pytest.approx(0.6)
    clock.observe(1000, 0.9, now=3.0)  # a burst slows the cores down: the estimate follows
    assert clock.estimate(1000, now=4.0) == pytest.approx(0.6)
    assert clock.estimate(1000, now=3.0 + 61.0) == 0.0  # old news: run again and relearn


def items_with(deadlines_s: List[Optional[float]], cost: int, now_ns: int) -> List[Item]:
    return [Item(i, 0, cost, None, None if d is None else now_ns + int(d * 1e9)) for i, d in enumerate(deadlines_s)]


def test_only_the_items_that_would_finish_late_are_dropped_earliest_deadline_first():
    clock = ForwardClock()
    clock.observe(1000, 1.0, now=None)  # 1 ms a padded frame
    now_ns = 1_000_000_000_000
    # two items of 1000 frames: a forward of both costs 2064 frames (2.06 s), of one 1064 (1.06 s)
    batch = items_with([1.5, 3.0], 1000, now_ns)
    late = too_late(batch, now_ns, clock, overhead_frames=64)
    assert [it.request for it in late] == [0]  # without it, the other finishes in 1.06 s < 3 s
    assert too_late(items_with([3.0, None], 1000, now_ns), now_ns, clock, 64) == []
    assert [it.request for it in too_late(items_with([0.5, 0.9], 1000, now_ns), now_ns, clock, 64)] == [0, 1]
    assert padded_frames(batch, 64) == 2064


class Recorder(RaggedBatchModel):
    """The base class's step driver on its own: a model whose "forward" is a list of steps."""

    class pb:  # noqa: N801 - what the driver needs of triton_python_backend_utils
        class TritonError:
            UNAVAILABLE = 14

            def __init__(self, message: str, code: int) -> None:
                self.message, self.code = message, code

        class InferenceResponse:
            def __init__(self, error=None) -> None:
                self.error = error

    def __init__(self, step_seconds: List[float], remaining: List[Dict[int, int]]) -> None:
        self.name, self.batch_overhead_frames = "recorder", 64
        self.forward_clock = ForwardClock()
        self.step_seconds, self.remaining, self.sent = step_seconds, remaining, []

    def steps(self, items):
        for seconds, remaining in zip(self.step_seconds, self.remaining):
            time.sleep(seconds)
            self.sent.append((yield Progress(1000, remaining)))
        return [{"out": np.zeros(1)} for _ in items]


def test_the_driver_times_each_step_and_drops_what_would_end_after_its_deadline():
    model = Recorder([0.05, 0.05], [{0: 5000, 1: 100}, {}])
    now_ns = time.time_ns()
    live = [Item(0, 0, 6000, None, now_ns + int(0.2e9)), Item(1, 0, 1100, None, now_ns + int(10e9))]
    responses: list = [None, None]
    outputs = model.run_in_steps(live, responses)
    # after the first step (1064 frames in ~50 ms), item 0 still has 5000 frames (~0.25 s): past its 0.2 s
    assert model.sent[0] == {0}
    assert responses[0] is not None and responses[0].error.code == Recorder.pb.TritonError.UNAVAILABLE
    assert "deadline would pass" in responses[0].error.message
    assert responses[1] is None and len(outputs) == 2
    assert model.forward_clock.known() == pytest.approx(0.05 / 1064, rel=0.5)

"""The batched serving modules against the reference packages, on real speech.

Every module is checked per item against ``vocos`` 0.1.0 / ``encodec`` 0.1.1 on the same random
weights (<= 1e-4), and a ragged batch against each item run alone (<= 1e-5).
"""
from __future__ import annotations

from typing import List

import numpy as np
import pytest
import torch

from vocos_triton.build.export import pad_batch
from vocos_triton.contract import BANDWIDTHS, CODEBOOKS, ENCODEC_24KHZ, MEL_24KHZ
from vocos_triton.modules.encoder import EncodecEncoder
from vocos_triton.modules.features import MelFeatures
from vocos_triton.modules.vocoder import BatchedVocos
from vocos_triton.serving.codebooks import CodebookTable
from vocos_triton.speech import speech_clip

import reference_outputs as ref

REFERENCE_TOLERANCE = 1e-4
BATCH_TOLERANCE = 1e-5
# Not multiples of either hop (256, 320); 513 is the shortest audio a centred 1024-point STFT allows.
RAGGED_LENGTHS = [24_000 + 7, 513, 50_001, 11_111]


@pytest.fixture(scope="module")
def modules(reference_mel, reference_encodec):
    extractor = reference_encodec.feature_extractor
    return {
        "mel_features": MelFeatures(reference_mel.feature_extractor).eval(),
        "vocos_mel": BatchedVocos(reference_mel).eval(),
        "encodec_encoder": EncodecEncoder(extractor.encodec).eval(),
        "encodec_embedding": CodebookTable(extractor.codebook_weights.detach().numpy()),
        "vocos_encodec": BatchedVocos(reference_encodec).eval(),
    }


@pytest.fixture(scope="module")
def clips() -> List[np.ndarray]:
    return [speech_clip(n, seed=i) for i, n in enumerate(RAGGED_LENGTHS)]


def _t(arrays: List[np.ndarray]) -> torch.Tensor:
    return pad_batch([torch.from_numpy(a) for a in arrays])


def _lengths(values: List[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def run_mel_features(module, clips):
    with torch.inference_mode():
        out = module(_t(clips), _lengths([c.shape[0] for c in clips])).numpy()
    return [out[i, :, : MEL_24KHZ.frames(c.shape[0])] for i, c in enumerate(clips)]


def run_vocos(module, features, conditions):
    frames = [f.shape[1] for f in features]
    with torch.inference_mode():
        out = module(_t(features), _lengths(frames), _lengths(conditions))
        samples = module.output_samples(_lengths(frames)).tolist()
    return [out[i, :n].numpy() for i, n in enumerate(samples)]


def run_encoder(module, clips, codebooks):
    with torch.inference_mode():
        out = module(_t(clips), _lengths([c.shape[0] for c in clips]), _lengths(codebooks)).numpy()
    return [out[i, :k, : ENCODEC_24KHZ.frames(c.shape[0])] for i, (c, k) in enumerate(zip(clips, codebooks))]


def run_embedding(table, codes):
    return [table.features(c) for c in codes]


class TestMelPath:
    def test_mel_features_equal_reference_in_a_ragged_batch(self, modules, reference_mel, clips):
        got = run_mel_features(modules["mel_features"], clips)
        for clip, mel in zip(clips, got):
            assert mel.shape == (100, 1 + clip.shape[0] // 256)
            assert ref.max_error(mel, ref.mel_features(reference_mel, clip)) <= REFERENCE_TOLERANCE

    def test_vocos_mel_equals_reference_decode_in_a_ragged_batch(self, modules, reference_mel, clips):
        mels = [ref.mel_features(reference_mel, c) for c in clips]
        got = run_vocos(modules["vocos_mel"], mels, [0] * len(mels))
        for mel, wave in zip(mels, got):
            expected = ref.mel_decode(reference_mel, mel)
            assert wave.shape == ((mel.shape[1] - 1) * 256,)
            assert ref.max_error(wave, expected) <= REFERENCE_TOLERANCE

    def test_ragged_batch_equals_each_item_alone(self, modules, reference_mel, clips):
        mels = [ref.mel_features(reference_mel, c) for c in clips]
        batched = run_vocos(modules["vocos_mel"], mels, [0] * len(mels))
        for mel, wave in zip(mels, batched):
            alone = run_vocos(modules["vocos_mel"], [mel], [0])[0]
            assert ref.max_error(wave, alone) <= BATCH_TOLERANCE
        features = run_mel_features(modules["mel_features"], clips)
        for clip, mel in zip(clips, features):
            assert ref.max_error(mel, run_mel_features(modules["mel_features"], [clip])[0]) <= BATCH_TOLERANCE

    def test_minimum_mel_length_two_frames(self, modules, reference_mel, speech_1s):
        mel = ref.mel_features(reference_mel, speech_1s)[:, :2].copy()
        wave = run_vocos(modules["vocos_mel"], [mel], [0])[0]
        assert wave.shape == (256,)
        assert ref.max_error(wave, ref.mel_decode(reference_mel, mel)) <= REFERENCE_TOLERANCE

    @pytest.mark.slow
    def test_sixty_seconds(self, modules, reference_mel):
        clip = speech_clip(60 * 24_000, seed=3)
        mel = run_mel_features(modules["mel_features"], [clip])[0]
        assert ref.max_error(mel, ref.mel_features(reference_mel, clip)) <= REFERENCE_TOLERANCE
        wave = run_vocos(modules["vocos_mel"], [mel], [0])[0]
        assert ref.max_error(wave, ref.mel_resynthesize(reference_mel, clip)) <= REFERENCE_TOLERANCE


class TestEncodecPath:
    def test_codes_equal_reference_with_mixed_bandwidths(self, modules, reference_encodec, clips):
        codebooks = [CODEBOOKS[i % 4] for i in range(len(clips))]
        got = run_encoder(modules["encodec_encoder"], clips, codebooks)
        for clip, k, codes in zip(clips, codebooks, got):
            expected = ref.encodec_codes(reference_encodec, clip, BANDWIDTHS[CODEBOOKS.index(k)])
            assert codes.shape == (k, -(-clip.shape[0] // 320))
            np.testing.assert_array_equal(codes, expected)

    def test_codes_on_speech_are_not_degenerate(self, modules, speech_3s):
        codes = run_encoder(modules["encodec_encoder"], [speech_3s], [16])[0]
        assert len(np.unique(codes)) > 100
        # pretrained=False codebooks are all zero: every codebook must vary
        assert all(len(np.unique(row)) > 10 for row in codes)

    def test_embedding_equals_codes_to_features_bit_for_bit(self, modules, reference_encodec, clips):
        """The numpy table adds the codebooks in the reference's order: not close, equal."""
        codes = [ref.encodec_codes(reference_encodec, c, BANDWIDTHS[i % 4]) for i, c in enumerate(clips)]
        for c, features in zip(codes, run_embedding(modules["encodec_embedding"], codes)):
            assert features.dtype == np.float32 and features.shape == (128, c.shape[1])
            np.testing.assert_array_equal(features, ref.codes_to_features(reference_encodec, c))

    def test_vocos_encodec_equals_reference_with_mixed_bandwidths(self, modules, reference_encodec, clips):
        bandwidth_ids = [3, 0, 2, 1]
        features = [
            ref.codes_to_features(reference_encodec, ref.encodec_codes(reference_encodec, c, BANDWIDTHS[b]))
            for c, b in zip(clips, bandwidth_ids)
        ]
        batched = run_vocos(modules["vocos_encodec"], features, bandwidth_ids)
        for f, b, wave in zip(features, bandwidth_ids, batched):
            assert wave.shape == (f.shape[1] * 320,)
            assert ref.max_error(wave, ref.encodec_decode(reference_encodec, f, BANDWIDTHS[b])) <= REFERENCE_TOLERANCE
            alone = run_vocos(modules["vocos_encodec"], [f], [b])[0]
            assert ref.max_error(wave, alone) <= BATCH_TOLERANCE

    def test_full_resynthesis_equals_vocos_forward(self, modules, reference_encodec, speech_3s):
        for b, bandwidth in enumerate(BANDWIDTHS):
            codes = run_encoder(modules["encodec_encoder"], [speech_3s], [CODEBOOKS[b]])
            features = run_embedding(modules["encodec_embedding"], codes)
            wave = run_vocos(modules["vocos_encodec"], features, [b])[0]
            expected = ref.encodec_resynthesize(reference_encodec, speech_3s, bandwidth)
            assert ref.max_error(wave, expected) <= REFERENCE_TOLERANCE

    def test_minimum_lengths(self, modules, reference_encodec, speech_1s):
        one_sample = speech_1s[:1].copy()
        codes = run_encoder(modules["encodec_encoder"], [one_sample], [8])[0]
        np.testing.assert_array_equal(codes, ref.encodec_codes(reference_encodec, one_sample, 6.0))
        features = run_embedding(modules["encodec_embedding"], [codes])
        wave = run_vocos(modules["vocos_encodec"], features, [2])[0]
        assert wave.shape == (320,)
        assert ref.max_error(wave, ref.encodec_decode(reference_encodec, features[0], 6.0)) <= REFERENCE_TOLERANCE

    @pytest.mark.slow
    def test_sixty_seconds(self, modules, reference_encodec):
        clip = speech_clip(60 * 24_000, seed=4)
        codes = run_encoder(modules["encodec_encoder"], [clip], [8])
        np.testing.assert_array_equal(codes[0], ref.encodec_codes(reference_encodec, clip, 6.0))
        wave = run_vocos(modules["vocos_encodec"], run_embedding(modules["encodec_embedding"], codes), [2])[0]
        assert ref.max_error(wave, ref.encodec_resynthesize(reference_encodec, clip, 6.0)) <= REFERENCE_TOLERANCE


def test_masked_backbone_equals_vocos_backbone(reference_encodec, speech_1s):
    """The rewritten forward (what must differ) equals the original module on one item."""
    vocoder = BatchedVocos(reference_encodec).eval()
    codes = ref.encodec_codes(reference_encodec, speech_1s, 3.0)
    features = torch.from_numpy(ref.codes_to_features(reference_encodec, codes))[None]
    with torch.inference_mode():
        ours = vocoder.backbone(features, torch.tensor([features.shape[-1]]), torch.tensor([1]))
        theirs = reference_encodec.backbone(features, bandwidth_id=torch.tensor([1]))
    assert float((ours - theirs).abs().max()) <= BATCH_TOLERANCE

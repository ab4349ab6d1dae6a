"""Opt-in half-precision vocoder for the GPU profile: the backbone in fp16, the head and ISTFT in fp32.

The backbone (embedding convolution + ConvNeXt blocks) is >95% of the FLOPs and runs on tensor
cores in fp16; the head's Linear output goes through ``exp`` (magnitudes up to 1e2) and an inverse
FFT with an overlap-add normalised by the window envelope, where fp16's 11-bit mantissa and 65504
range would cost fidelity for little time, so the backbone's output is cast back to fp32 before it.
Like int8 it is an approximation: ``make repository PRECISION=fp16`` measures its SNR against the
reference on the export probe and refuses to write it below ``FP16_MIN_SNR_DB`` (see
:mod:`vocos_triton.build.export`); the figure is recorded in provenance.json.

On the CPU it runs too (fp16 matmuls without AVX-512 FP16 are emulated, so it is slow there: it is
meant for ``PROFILE=gpu``). bfloat16 is accepted as well (``dtype=torch.bfloat16``), for CPUs with
AVX-512 BF16 / AMX, but the export offers only fp16: bf16's 8-bit mantissa measured 18 dB less (43 vs 61 dB).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..modules.vocoder import ATEN, BatchedVocos, FusedLinear, frame_mask

HALF_DTYPES = (torch.float16, torch.bfloat16)


class HalfBackboneVocos(nn.Module):
    """A :class:`BatchedVocos` whose backbone computes in ``dtype``; same signature, fp32 in and out.

    Batch independence holds as in fp32 (padded frames are zeroed before every convolution), up to
    half-precision rounding: the GEMM a batch runs may sum in another order than the item alone.
    """

    def __init__(self, vocoder: BatchedVocos, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if dtype not in HALF_DTYPES:
            raise ValueError(f"dtype: expected one of {HALF_DTYPES}, got {dtype}")
        backbone = copy.deepcopy(vocoder.backbone)
        for module in backbone.modules():
            if isinstance(module, FusedLinear):
                # oneDNN's fused CPU matmul has no fp16 primitive; on CUDA FusedLinear is F.linear anyway
                module.kernel = ATEN
        self.backbone = backbone.to(dtype)
        self.head = copy.deepcopy(vocoder.head)  # fp32
        self.dtype = dtype
        self.centered: bool = vocoder.centered
        self.hop_length: int = vocoder.hop_length
        self.train(vocoder.training)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.backbone(features.to(self.dtype), lengths, condition)
        return self.head(x.to(torch.float32), frame_mask(lengths, features.shape[-1]))

    @torch.jit.export
    def output_samples(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths - 1) * self.hop_length if self.centered else lengths * self.hop_length


def halve_vocoder(vocoder: BatchedVocos, dtype: torch.dtype = torch.float16) -> HalfBackboneVocos:
    """A copy of ``vocoder`` with its backbone in ``dtype`` (fp16 by default), head and ISTFT in fp32."""
    return HalfBackboneVocos(vocoder, dtype)

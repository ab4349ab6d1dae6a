"""Opt-in int8 vocoder: dynamic int8 quantization of the Linear layers (VNNI through oneDNN/fbgemm).

fp32 stays the default; this trades fidelity for speed, and :func:`fidelity` measures the trade
(max abs error and SNR against the fp32 module). Activations are quantized per item, not per padded
batch, so that an item's output still does not depend on what else is in its batch.
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

from .vocoder import BatchedVocos, FusedLinear


class Int8Linear(nn.Module):
    """A :class:`FusedLinear` with int8 weights and per-item dynamically quantized activations."""

    def __init__(self, fused: FusedLinear) -> None:
        super().__init__()
        weight, bias = fused.weight, fused.bias
        self.linear = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
        scale = float(weight.abs().max()) / 127.0
        self.linear.set_weight_bias(torch.quantize_per_tensor(weight.float(), scale, 0, torch.qint8), bias.float())
        self.activation = fused.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.linear(x[i]) for i in range(x.shape[0])]  # per item: batch-independent scales
        y = torch.stack(rows)
        return nn.functional.gelu(y) if self.activation == "gelu" else y


def quantize_vocoder(vocoder: BatchedVocos) -> BatchedVocos:
    """A copy of ``vocoder`` whose Linear layers (ConvNeXt MLPs and the head) run in int8."""
    quantized = copy.deepcopy(vocoder)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FusedLinear):
                setattr(module, name, Int8Linear(child))
    return quantized


def fidelity(reference: torch.Tensor, approximation: torch.Tensor) -> Dict[str, float]:
    """Max abs error and SNR (dB) of ``approximation`` against ``reference`` (same shape)."""
    error = (approximation - reference).double()
    snr = 10 * torch.log10(reference.double().pow(2).sum() / error.pow(2).sum().clamp(min=1e-30))
    return {"max_abs_error": float(error.abs().max()), "snr_db": float(snr)}

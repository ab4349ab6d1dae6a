"""Opt-in int8 vocoder: dynamic int8 quantization of the Linear layers (VNNI through oneDNN/fbgemm).

fp32 stays the default; this trades fidelity for speed, and :func:`fidelity` measures the trade
(max abs error and SNR against the fp32 module). Dynamic quantization picks one activation scale per
tensor, so a padded batch would let one item's range (and the padding) change another's output; the
int8 vocoder therefore runs each item alone, unpadded. (What its batch can still change is int8
rounding: a 1e-7 difference in an fp32 convolution, e.g. from memory alignment, may move an
activation to the next int8 step. That is far below the int8-vs-fp32 error, but not the fp32 path's
1e-5 batch invariance.)
"""
from __future__ import annotations

import copy
from typing import Dict

import torch
from torch import nn

from ..modules.vocoder import BatchedVocos, FusedLinear
from ..serving.torchscript import set_quantized_engine

__all__ = ["Int8Linear", "ItemByItem", "fidelity", "quantize_vocoder", "set_quantized_engine"]


class Int8Linear(nn.Module):
    """A :class:`FusedLinear` with int8 weights and per-item dynamically quantized activations."""

    def __init__(self, fused: FusedLinear) -> None:
        super().__init__()
        weight, bias = fused.weight, fused.bias
        self.linear = torch.ao.nn.quantized.dynamic.Linear(weight.shape[1], weight.shape[0], dtype=torch.qint8)
        scale = float(weight.abs().max()) / 127.0
        self.linear.set_weight_bias(torch.quantize_per_tensor(weight.float(), scale, 0, torch.qint8), bias.float())
        self.activation = fused.activation
        # FusedLinear's attribute, so that the wrapped BatchedVocos' kernel methods still compile;
        # nothing reads it (ItemByItem does not export them: an int8 layer has one kernel)
        self.kernel: str = "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return nn.functional.gelu(y) if self.activation == "gelu" else y


class ItemByItem(nn.Module):
    """Runs a :class:`BatchedVocos` on each item of a padded batch alone (same signature and output)."""

    def __init__(self, vocoder: BatchedVocos) -> None:
        super().__init__()
        self.vocoder = vocoder

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        samples = self.vocoder.output_samples(lengths)
        out = torch.zeros(features.shape[0], int(self.vocoder.output_samples(lengths.max().view(1))[0]),
                          dtype=features.dtype, device=features.device)
        for i in range(features.shape[0]):
            n = int(lengths[i])
            item = self.vocoder(features[i : i + 1, :, :n], lengths[i : i + 1], condition[i : i + 1])
            out[i, : int(samples[i])] = item[0, : int(samples[i])]
        return out

    @torch.jit.export
    def output_samples(self, lengths: torch.Tensor) -> torch.Tensor:
        return self.vocoder.output_samples(lengths)


def quantize_vocoder(vocoder: BatchedVocos) -> ItemByItem:
    """A copy of ``vocoder`` whose Linear layers (ConvNeXt MLPs and the head) run in int8, item by item."""
    quantized = copy.deepcopy(vocoder)
    for module in list(quantized.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FusedLinear):
                setattr(module, name, Int8Linear(child))
    return ItemByItem(quantized).train(vocoder.training)  # a new wrapper would start in training mode


def fidelity(reference: torch.Tensor, approximation: torch.Tensor) -> Dict[str, float]:
    """Max abs error and SNR (dB) of ``approximation`` against ``reference`` (same shape)."""
    error = (approximation - reference).double()
    snr = 10 * torch.log10(reference.double().pow(2).sum() / error.pow(2).sum().clamp(min=1e-30))
    return {"max_abs_error": float(error.abs().max()), "snr_db": float(snr)}

"""Vocos over a padded, ragged batch: what must differ from ``vocos`` 0.1.0 to batch exactly.

Reference ``Vocos.decode`` runs one item, or a batch of equal lengths. Zero-padding shorter items
changes their output in two ways: the backbone's convolutions (about +-27 frames of receptive field)
see the padded frames' activations instead of the zeros the item alone is padded with, and the
ISTFT divides by a window envelope that, near the end of the item, includes the padded frames.
:class:`BatchedVocos` reuses the reference submodules and weights and fixes both: padded frames are
zeroed before every convolution, padded STFT frames are dropped, and each item is normalised by the
envelope of its own frames. The result per item equals the item run alone.

All modules here are TorchScript-compatible (``torch.jit.script``).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


class _LayerNorm(nn.Module):
    """``nn.LayerNorm`` with the conditioned signature, for the mel (unconditioned) variant."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class _AdaLayerNorm(nn.Module):
    """``vocos.modules.AdaLayerNorm`` with one condition per batch item: (B, T, C), (B,) -> (B, T, C)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.scale = norm.scale
        self.shift = norm.shift
        self.dim: int = norm.dim
        self.eps: float = norm.eps

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale = self.scale(condition)[:, None, :]
        shift = self.shift(condition)[:, None, :]
        x = nn.functional.layer_norm(x, (self.dim,), eps=self.eps)
        return x * scale + shift


def _wrap_norm(norm: nn.Module) -> nn.Module:
    return _AdaLayerNorm(norm) if hasattr(norm, "scale") else _LayerNorm(norm)


class _ConvNeXtBlock(nn.Module):
    """``vocos.modules.ConvNeXtBlock`` on the reference's own submodules; input already masked."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dwconv = block.dwconv
        self.norm = _wrap_norm(block.norm)
        self.pwconv1 = block.pwconv1
        self.act = block.act
        self.pwconv2 = block.pwconv2
        gamma = block.gamma if block.gamma is not None else torch.ones(block.dwconv.out_channels)
        self.gamma = nn.Parameter(gamma.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.dwconv(x).transpose(1, 2)
        x = self.norm(x, condition)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        return residual + (self.gamma * x).transpose(1, 2)


class MaskedBackbone(nn.Module):
    """``vocos.models.VocosBackbone`` over a padded batch.

    forward(x (B, C, T), mask (B, 1, T) with 1 on real frames, condition (B,)) -> (B, T, H).
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.embed = backbone.embed
        self.norm = _wrap_norm(backbone.norm)
        self.blocks = nn.ModuleList([_ConvNeXtBlock(block) for block in backbone.convnext])
        self.final_layer_norm = backbone.final_layer_norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.embed(x * mask)
        x = self.norm(x.transpose(1, 2), condition).transpose(1, 2)
        for block in self.blocks:
            # Each block starts with a depthwise conv: it must see zeros past the item's end,
            # as the item alone sees its zero padding.
            x = block(x * mask, condition)
        return self.final_layer_norm(x.transpose(1, 2))


class BatchedISTFTHead(nn.Module):
    """``vocos.heads.ISTFTHead`` with per-item frame counts.

    forward(x (B, T, H), frame_mask (B, T)) -> (B, L) where item b's first ``samples(T_b)`` samples
    are its audio. Padding "center" gives (T - 1) * hop samples, "same" gives T * hop.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        istft = head.istft
        self.out = head.out
        self.n_fft: int = istft.n_fft
        self.hop_length: int = istft.hop_length
        self.win_length: int = istft.win_length
        self.register_buffer("window", istft.window.detach().clone())
        # torch.istft(center=True) drops n_fft // 2 samples at both ends; vocos' "same" drops (win - hop) // 2.
        self.trim: int = istft.n_fft // 2 if istft.padding == "center" else (istft.win_length - istft.hop_length) // 2

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        x = self.out(x).transpose(1, 2)
        mag, phase = x.chunk(2, dim=1)
        mag = torch.clip(torch.exp(mag), max=1e2)
        spec = mag * (torch.cos(phase) + 1j * torch.sin(phase))
        spec = spec * frame_mask[:, None, :]
        num_frames = spec.shape[-1]
        frames = torch.fft.irfft(spec, self.n_fft, dim=1, norm="backward") * self.window[None, :, None]
        output_size = (num_frames - 1) * self.hop_length + self.win_length
        y = nn.functional.fold(
            frames, output_size=(1, output_size), kernel_size=(1, self.win_length), stride=(1, self.hop_length)
        )[:, 0, 0, self.trim : output_size - self.trim]
        window_sq = self.window.square()[None, :, None] * frame_mask[:, None, :]
        envelope = nn.functional.fold(
            window_sq, output_size=(1, output_size), kernel_size=(1, self.win_length), stride=(1, self.hop_length)
        )[:, 0, 0, self.trim : output_size - self.trim]
        # Past an item's end its envelope is 0: those samples are cut off by the caller.
        return torch.where(envelope > 1e-11, y / envelope, torch.zeros_like(y))


def frame_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B,) lengths -> (B, T) float mask, 1 on each item's real frames."""
    positions = torch.arange(num_frames, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).to(torch.float32)


class BatchedVocos(nn.Module):
    """Vocos decoding (backbone + ISTFT head) of a padded batch; the exported vocoder.

    forward(features (B, C, T), lengths (B,) int64 frames, condition (B,) int64 bandwidth ids,
    ignored by the mel variant) -> waveform (B, L); item b's audio is its first
    ``output_samples(lengths[b])`` samples.
    """

    def __init__(self, vocos: nn.Module) -> None:
        super().__init__()
        self.backbone = MaskedBackbone(vocos.backbone)
        self.head = BatchedISTFTHead(vocos.head)
        self.centered: bool = vocos.head.istft.padding == "center"
        self.hop_length: int = vocos.head.istft.hop_length

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        mask = frame_mask(lengths, features.shape[-1])
        x = self.backbone(features, mask[:, None, :], condition)
        return self.head(x, mask)

    @torch.jit.export
    def output_samples(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths - 1) * self.hop_length if self.centered else lengths * self.hop_length


def split_outputs(waveform: torch.Tensor, samples: List[int]) -> List[torch.Tensor]:
    """Cut each item's audio out of a padded (B, L) batch."""
    return [waveform[i, :n] for i, n in enumerate(samples)]

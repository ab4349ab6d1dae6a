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

from typing import Dict, List, Optional, Union

import torch
from torch import nn


def _depthwise_weight(conv: nn.Conv1d) -> torch.Tensor:
    """(C, 1, K) Conv1d weight as a (C, 1, 1, K) Conv2d weight."""
    return conv.weight.detach()[:, :, None, :].contiguous()


def conv_time_major(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int,
                    groups: int) -> torch.Tensor:
    """A 1-D convolution over time on a (B, T, C) tensor, returning (B, T, C') without copies.

    (B, T, C) memory is a channels-last (B, C, 1, T) image, for which oneDNN's convolution is much
    faster than Conv1d on the transposed tensor (which also costs two copies per call; docs/performance.md).
    """
    image = x.transpose(1, 2).unsqueeze(2)
    out = nn.functional.conv2d(image, weight, bias, padding=(0, padding), groups=groups)
    return out.squeeze(2).transpose(1, 2)


def zero_padding_(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero frames past each item's length in a (B, T, C) tensor, in place (touches padding only)."""
    num_frames = x.shape[1]
    for i in range(x.shape[0]):
        n = int(lengths[i])
        if n < num_frames:
            x[i, n:].zero_()
    return x


class _LayerNorm(nn.Module):
    """LayerNorm whose affine part may already be folded into the following Linear."""

    def __init__(self, norm: nn.LayerNorm, keep_affine: bool) -> None:
        super().__init__()
        self.dim: int = norm.normalized_shape[0]
        self.eps: float = norm.eps
        self.keep_affine = keep_affine
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if self.keep_affine:
            return nn.functional.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)
        return nn.functional.layer_norm(x, (self.dim,), None, None, self.eps)


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


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: the CPU implementations of :class:`FusedLinear`, switchable in a frozen TorchScript module
#: (``set_linear_kernel``); which is faster depends on the CPU's ISA and the torch build, see docs/hardware.md
ONEDNN = "onednn"  # one oneDNN matmul with the activation fused (torch.ops.mkldnn._linear_pointwise)
ATEN = "aten"  # F.linear (MKL sgemm on the CPU) + F.gelu: two passes, but a different gemm
LINEAR_KERNELS = (ONEDNN, ATEN)
#: the methods a vocoder exports to switch kernels; ``torch.jit.freeze`` must preserve them
KERNEL_METHODS = ("set_linear_kernel", "linear_kernel")


class FusedLinear(nn.Module):
    """``x @ weight.T + bias``, then ``activation`` ("gelu" or "none"), on (..., C_in) tensors.

    ``kernel`` picks the CPU implementation (both within 1e-7 of the reference): ``"onednn"`` runs one
    oneDNN matmul with the activation fused into it (the op PyTorch's own compiler emits), faster than
    ``"aten"`` (``F.linear``, i.e. MKL's sgemm, + ``F.gelu``) with AVX-512. With AVX2 only, oneDNN 3.12
    (torch 2.13) picks a slower matmul kernel than 3.10 did, and which of the two wins then depends on the
    CPU, so the stubs measure (``serving/kernels.py``; numbers in docs/hardware.md). Elsewhere (CUDA) it
    is always ``F.linear``. The attribute survives ``torch.jit.freeze`` because ``set_linear_kernel``
    (exported by the vocoders) assigns it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str = "none") -> None:
        super().__init__()
        if activation not in ("gelu", "none"):
            raise ValueError(f"unsupported activation {activation!r}")
        self.register_buffer("weight", weight.detach().contiguous().clone())
        self.register_buffer("bias", bias.detach().contiguous().clone())
        self.activation = activation
        self.kernel: str = ONEDNN if onednn_available() else ATEN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "onednn" and x.device.type == "cpu":  # ONEDNN (TorchScript takes no str globals)
            no_scalars: List[Optional[Union[float, int, complex]]] = []
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, self.activation, no_scalars, "none")
        y = nn.functional.linear(x, self.weight, self.bias)
        return nn.functional.gelu(y) if self.activation == "gelu" else y


def check_linear_kernel(kernel: str) -> str:
    """``kernel`` if it names a :class:`FusedLinear` implementation, else ValueError."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear kernel: expected one of {LINEAR_KERNELS}, got {kernel!r}")
    if kernel == ONEDNN and not onednn_available():
        raise ValueError("linear kernel 'onednn': this torch has no oneDNN (torch.ops.mkldnn._linear_pointwise)")
    return kernel


class _ConvNeXtBlock(nn.Module):
    """``vocos.modules.ConvNeXtBlock`` on (B, T, C) with the reference's weights, folded where exact in
    real arithmetic: an unconditioned LayerNorm's affine into ``pwconv1``, ``gamma`` into ``pwconv2``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.channels: int = block.dwconv.out_channels
        self.register_buffer("dw_weight", _depthwise_weight(block.dwconv))
        self.register_buffer("dw_bias", block.dwconv.bias.detach().clone())
        w1, b1 = block.pwconv1.weight.detach(), block.pwconv1.bias.detach()
        if isinstance(block.norm, nn.LayerNorm):
            self.norm = _LayerNorm(block.norm, keep_affine=False)
            # W (g * x + b) + c == (W * g) x + (W b + c)
            w1, b1 = w1 * block.norm.weight.detach()[None, :], b1 + w1 @ block.norm.bias.detach()
        else:
            self.norm = _AdaLayerNorm(block.norm)
        if not isinstance(block.act, nn.GELU) or block.act.approximate != "none":
            raise ValueError("the ConvNeXt blocks of vocos use the exact GELU")
        w2, b2 = block.pwconv2.weight.detach(), block.pwconv2.bias.detach()
        if block.gamma is not None:
            gamma = block.gamma.detach()
            w2, b2 = w2 * gamma[:, None], b2 * gamma
        self.pwconv1 = FusedLinear(w1, b1, "gelu")
        self.pwconv2 = FusedLinear(w2, b2)

    def set_linear_kernel(self, kernel: str) -> None:
        self.pwconv1.kernel = kernel
        self.pwconv2.kernel = kernel

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        y = conv_time_major(x, self.dw_weight, self.dw_bias, 3, self.channels)
        return x + self.pwconv2(self.pwconv1(self.norm(y, condition)))


class MaskedBackbone(nn.Module):
    """``vocos.models.VocosBackbone`` over a padded batch.

    forward(x (B, C, T), lengths (B,) frames, condition (B,)) -> (B, T, H). Frames past an item's
    length are zeroed before every convolution, which is what the item alone sees as zero padding.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        embed = backbone.embed
        self.register_buffer("embed_weight", embed.weight.detach()[:, :, None, :].contiguous())
        self.register_buffer("embed_bias", embed.bias.detach().clone())
        self.embed_padding: int = embed.padding[0]
        self.norm = _AdaLayerNorm(backbone.norm) if hasattr(backbone.norm, "scale") else _LayerNorm(backbone.norm, True)
        self.blocks = nn.ModuleList([_ConvNeXtBlock(block) for block in backbone.convnext])
        self.final_layer_norm = backbone.final_layer_norm

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = zero_padding_(x.transpose(1, 2).contiguous(), lengths)
        x = conv_time_major(x, self.embed_weight, self.embed_bias, self.embed_padding, 1)
        x = zero_padding_(self.norm(x, condition), lengths)
        for block in self.blocks:
            x = zero_padding_(block(x, condition), lengths)
        return self.final_layer_norm(x)


class BatchedISTFTHead(nn.Module):
    """``vocos.heads.ISTFTHead`` with per-item frame counts.

    forward(x (B, T, H), frame_mask (B, T)) -> (B, L) where item b's first ``samples(T_b)`` samples
    are its audio. Padding "center" gives (T - 1) * hop samples, "same" gives T * hop. Padded
    frames are dropped from the overlap-add and from each item's window envelope.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        istft = head.istft
        if istft.n_fft != istft.win_length or istft.win_length % istft.hop_length:
            raise ValueError("overlap-add by hop-sized slices needs win_length == n_fft, a multiple of hop_length")
        self.out = FusedLinear(head.out.weight, head.out.bias)
        self.n_fft: int = istft.n_fft
        self.hop_length: int = istft.hop_length
        self.overlap: int = istft.win_length // istft.hop_length
        self.register_buffer("window", istft.window.detach().clone())
        # torch.istft(center=True) drops n_fft // 2 samples at both ends; vocos' "same" drops (win - hop) // 2.
        self.trim: int = istft.n_fft // 2 if istft.padding == "center" else (istft.win_length - istft.hop_length) // 2

    def overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, n_fft) -> (B, (T - 1) * hop + n_fft): ``fold`` as ``overlap`` contiguous slice-adds."""
        batch, num_frames = frames.shape[0], frames.shape[1]
        chunks = frames.reshape(batch, num_frames, self.overlap, self.hop_length)
        out = torch.zeros(batch, num_frames + self.overlap - 1, self.hop_length, dtype=frames.dtype,
                          device=frames.device)
        for k in range(self.overlap):
            out[:, k : k + num_frames] += chunks[:, :, k]
        return out.reshape(batch, -1)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        x = self.out(x)
        half = self.n_fft // 2 + 1
        mag = torch.clip(torch.exp(x[:, :, :half]), max=1e2) * frame_mask[:, :, None]
        phase = x[:, :, half:]
        # mag * (cos + 1j sin), as the reference computes it, without the complex multiply
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        frames = torch.fft.irfft(spec, self.n_fft, dim=-1, norm="backward") * self.window
        y = self.overlap_add(frames)
        envelope = self.overlap_add(self.window.square()[None, None, :] * frame_mask[:, :, None])
        end = y.shape[-1] - self.trim
        y, envelope = y[:, self.trim : end], envelope[:, self.trim : end]
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
        # frames either side of a frame that its audio depends on: the backbone's convolutions (the embedding's
        # and each block's half-kernel) and the ISTFT's window (n_fft / hop frames cover each sample)
        self.context_frames: int = (self.backbone.embed_padding + 3 * len(self.backbone.blocks)
                                    + self.head.overlap)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = self.backbone(features, lengths, condition)
        return self.head(x, frame_mask(lengths, features.shape[-1]))

    @torch.jit.export
    def output_samples(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths - 1) * self.hop_length if self.centered else lengths * self.hop_length

    @torch.jit.export
    def geometry(self) -> Dict[str, int]:
        """What the serving code checks against the model's config.pbtxt (attributes do not survive freezing)."""
        return {"input_channels": self.backbone.embed_weight.shape[1], "n_fft": self.head.n_fft,
                "hop_length": self.hop_length, "centered": int(self.centered), "context_frames": self.context_frames}

    @torch.jit.export
    def set_linear_kernel(self, kernel: str) -> None:
        """Run every Linear layer with ``kernel`` (one of :data:`LINEAR_KERNELS`; validate it first with
        :func:`check_linear_kernel`, TorchScript cannot raise a helpful error here)."""
        for block in self.backbone.blocks:
            block.set_linear_kernel(kernel)
        self.head.out.kernel = kernel

    @torch.jit.export
    def linear_kernel(self) -> str:
        return self.head.out.kernel

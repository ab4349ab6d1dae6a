"""EnCodec 24 kHz encoder + residual vector quantizer as one TorchScript-compatible module.

The SEANet encoder is ``encodec``'s own module (weight norm folded into plain weights, which is the
same arithmetic done once). Its convolutions are causal but pad each input's end by reflection, so
items of a padded batch would see the padding instead of their own reflection: the encoder runs
item by item (each item exactly as alone), and the quantizer mirrors ``EuclideanCodebook.quantize``.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def _encoder_without_weight_norm(encodec_model: nn.Module) -> nn.Module:
    """A copy of the SEANet encoder with every ``weight_norm`` folded into plain ``weight`` tensors."""
    from encodec import EncodecModel

    # weight_norm modules cannot be deep-copied; rebuild the 24 kHz model and load the weights instead.
    fresh = EncodecModel.encodec_model_24khz(pretrained=False)
    fresh.load_state_dict(encodec_model.state_dict())
    module = fresh.encoder.eval()
    for sub in module.modules():
        if hasattr(sub, "weight_g") and hasattr(sub, "weight_v"):
            torch.nn.utils.remove_weight_norm(sub)
    return module


class EncodecEncoder(nn.Module):
    """forward(audio (B, L) zero-padded, lengths (B,) samples, num_codebooks (B,))
    -> codes (B, K_max, ceil(L_max / 320)) int64, K_max = max(num_codebooks).

    Item b's codes are ``codes[b, :num_codebooks[b], :ceil(lengths[b] / 320)]``; the rest is -1.
    """

    def __init__(self, encodec_model: nn.Module, max_codebooks: int = 16) -> None:
        super().__init__()
        self.encoder = _encoder_without_weight_norm(encodec_model)
        # 12 kbps, the highest bandwidth Vocos serves, uses 16 of the 32 codebooks.
        layers = encodec_model.quantizer.vq.layers[:max_codebooks]
        self.register_buffer("codebooks", torch.stack([layer._codebook.embed.detach().clone() for layer in layers]))
        self.hop_length: int = int(encodec_model.encoder.hop_length)

    def quantize(self, embedding: torch.Tensor, num_codebooks: int) -> torch.Tensor:
        """(1, D, T) -> (K, T): residual VQ, nearest codeword by the reference's distance formula."""
        residual = embedding.transpose(1, 2).reshape(-1, embedding.shape[1])  # (T, D) like the reference
        codes: List[torch.Tensor] = []
        for k in range(num_codebooks):
            codebook = self.codebooks[k]
            embed = codebook.t()
            dist = -(residual.pow(2).sum(1, keepdim=True) - 2 * residual @ embed + embed.pow(2).sum(0, keepdim=True))
            indices = dist.max(dim=-1).indices
            codes.append(indices)
            residual = residual - nn.functional.embedding(indices, codebook)
        return torch.stack(codes)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor, num_codebooks: torch.Tensor) -> torch.Tensor:
        batch, longest = audio.shape
        most_codebooks = int(num_codebooks.max())
        frames = (longest + self.hop_length - 1) // self.hop_length
        codes = torch.full((batch, most_codebooks, frames), -1, dtype=torch.long, device=audio.device)
        for i in range(batch):
            n = int(lengths[i])
            embedding = self.encoder(audio[i : i + 1, :n].unsqueeze(1))
            item = self.quantize(embedding, int(num_codebooks[i]))
            codes[i, : item.shape[0], : item.shape[1]] = item
        return codes

    @torch.jit.export
    def output_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(lengths + self.hop_length - 1, self.hop_length, rounding_mode="floor")

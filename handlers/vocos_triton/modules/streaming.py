"""Vocos decoding in chunks, exactly: per-layer state instead of overlapping windows.

The backbone is an embedding convolution and eight ConvNeXt blocks, each with one kernel-7 convolution
over time (3 frames either side) and otherwise per-frame arithmetic; the head is per frame up to an
overlap-add ISTFT. So every output frame depends on the input frames within +-27 of it, and an audio
sample on the frames whose windows cover it. :class:`StreamingVocos` runs one chunk of new frames per
sequence, several sequences in one padded forward, keeping per sequence:

* for each convolution, the last ``kernel - 1 = 6`` frames of its input (its left context);
* the overlap-add tail: the ``n_fft - hop`` samples (and window-envelope sums) that later frames add to.

Each convolution runs "valid" over ``cat(context, new frames)``, so its output lags its input by 3
frames; after the nine convolutions the backbone's output lags by :attr:`StreamingVocos.delay_frames`
(27). A chunk of ``n`` new frames therefore completes ``n`` backbone frames (27 behind) and ``n * hop``
samples of the overlap-add, every one of them final. Frames at positions before the sequence's start
(the zero context at start-up) and after its end (the zeros of the final flush) are zeroed after every
layer, which is exactly the zero padding the offline convolutions see, and dropped from the ISTFT and its
envelope, as :class:`~vocos_triton.modules.vocoder.BatchedVocos` drops the frames past an item's end.

The caller ends a sequence by running :attr:`StreamingVocos.flush_frames` zero frames through it (27 to
complete the backbone, 3 more to complete the overlap-add); see :mod:`vocos_triton.serving.streaming`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from .vocoder import BatchedVocos, FusedLinear, _ConvNeXtBlock, conv_time_major


def keep_positions(x: torch.Tensor, first: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Zero the frames of (B, T, C) ``x`` whose position ``first[b] + t`` is outside ``[0, end[b])``."""
    positions = first[:, None] + torch.arange(x.shape[1], device=x.device)[None, :]
    inside = (positions >= 0) & (positions < end[:, None])
    return x * inside[:, :, None].to(x.dtype)


def take_context(buffer: torch.Tensor, lengths: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size`` frames of (B, L, C) ``buffer`` ending at each item's ``lengths[b] + size``: the new
    context after ``lengths[b]`` frames were appended to a context of ``size`` frames."""
    index = lengths[:, None] + torch.arange(size, device=buffer.device)[None, :]
    return buffer.gather(1, index[:, :, None].expand(-1, -1, buffer.shape[2]))


class _StreamingBlock(nn.Module):
    """One ConvNeXt block of :class:`~vocos_triton.modules.vocoder.MaskedBackbone`, on a context + chunk."""

    def __init__(self, block: _ConvNeXtBlock) -> None:
        super().__init__()
        self.channels: int = block.channels
        self.register_buffer("dw_weight", block.dw_weight.detach().clone())
        self.register_buffer("dw_bias", block.dw_bias.detach().clone())
        self.context: int = block.dw_weight.shape[-1] - 1
        self.norm = block.norm
        self.pwconv1 = block.pwconv1
        self.pwconv2 = block.pwconv2

    def forward(self, buffer: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, context + T, C) -> (B, T, C): output t is the offline block's output at input frame t + 3."""
        num_frames = buffer.shape[1] - self.context
        y = conv_time_major(buffer, self.dw_weight, self.dw_bias, 0, self.channels)
        residual = buffer[:, self.context // 2 : self.context // 2 + num_frames]
        return residual + self.pwconv2(self.pwconv1(self.norm(y, condition)))


class StreamingVocos(nn.Module):
    """A :class:`~vocos_triton.modules.vocoder.BatchedVocos` run chunk by chunk; the exported streaming vocoder.

    forward(frames (B, C, T) new frames zero-padded, lengths (B,) new frames per item, positions (B,)
    frames of the sequence run before, ends (B,) the sequence's real frames so far (flush frames
    excluded), condition (B,) bandwidth ids, state) -> (audio (B, T * hop), state').

    Row b's first ``lengths[b] * hop`` samples are final; they are the overlap-add's samples from
    ``(positions[b] - delay_frames) * hop`` on, before the ISTFT's trim (``trim_samples``): the caller
    drops those before the trim and past ``(ends[b] + overlap - 1) * hop - trim`` at the end.
    ``state`` is :meth:`initial_state` for a new sequence, then what the previous call returned for it.
    """

    def __init__(self, vocoder: BatchedVocos) -> None:
        super().__init__()
        backbone, head = vocoder.backbone, vocoder.head
        self.register_buffer("embed_weight", backbone.embed_weight.detach().clone())
        self.register_buffer("embed_bias", backbone.embed_bias.detach().clone())
        self.embed_context: int = backbone.embed_weight.shape[-1] - 1
        self.norm = backbone.norm
        self.blocks = nn.ModuleList([_StreamingBlock(block) for block in backbone.blocks])
        self.final_layer_norm = backbone.final_layer_norm
        self.out: FusedLinear = head.out
        self.register_buffer("window", head.window.detach().clone())
        self.n_fft: int = head.n_fft
        self.hop_length: int = head.hop_length
        self.overlap: int = head.overlap
        self.trim_samples: int = head.trim
        self.centered: bool = vocoder.centered
        self.input_channels: int = backbone.embed_weight.shape[1]
        self.channels: int = backbone.embed_weight.shape[0]
        self.delay_frames: int = self.embed_context // 2 + sum(block.context // 2 for block in self.blocks)
        #: zero frames that end a sequence: the backbone's delay, then the overlap-add's tail
        self.flush_frames: int = self.delay_frames + self.overlap - 1

    @torch.jit.export
    def initial_state(self, batch: int) -> List[torch.Tensor]:
        """Zero context for every convolution, then the overlap-add tail and its envelope."""
        device = self.window.device
        state = [torch.zeros(batch, self.embed_context, self.input_channels, device=device)]
        for block in self.blocks:
            state.append(torch.zeros(batch, block.context, self.channels, device=device))
        tail = (self.overlap - 1) * self.hop_length
        state.append(torch.zeros(batch, tail, device=device))
        state.append(torch.zeros(batch, tail, device=device))
        return state

    @torch.jit.export
    def set_linear_kernel(self, kernel: str) -> None:
        """Run every Linear layer with ``kernel``, as :meth:`BatchedVocos.set_linear_kernel` does."""
        for block in self.blocks:
            block.pwconv1.kernel = kernel
            block.pwconv2.kernel = kernel
        self.out.kernel = kernel

    @torch.jit.export
    def linear_kernel(self) -> str:
        return self.out.kernel

    @torch.jit.export
    def geometry(self) -> Dict[str, int]:
        """What the caller needs to cut the audio and end a sequence (attributes do not survive freezing)."""
        return {"hop_length": self.hop_length, "trim_samples": self.trim_samples, "overlap": self.overlap,
                "delay_frames": self.delay_frames, "flush_frames": self.flush_frames,
                "input_channels": self.input_channels, "lookahead_frames": self.lookahead_frames(),
                "n_fft": self.n_fft, "centered": int(self.centered)}

    @torch.jit.export
    def lookahead_frames(self) -> int:
        """Frames after frame j that must have arrived before the j-th hop of audio is final."""
        # Output sample s sits at overlap-add position s + trim, covered by the frames up to
        # (s + trim) // hop, each final once the frames delay_frames after it have arrived.
        return self.delay_frames + (self.trim_samples + self.hop_length - 1) // self.hop_length

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor, ends: torch.Tensor,
                condition: torch.Tensor, state: List[torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        new_state: List[torch.Tensor] = []
        x = frames.transpose(1, 2)  # (B, T, C_in): padded frames past lengths[b] never reach a kept output
        joined = torch.cat([state[0], x], dim=1)
        new_state.append(take_context(joined, lengths, self.embed_context))
        first = positions - self.embed_context // 2
        x = conv_time_major(joined, self.embed_weight, self.embed_bias, 0, 1)
        x = keep_positions(self.norm(x, condition), first, ends)
        for i, block in enumerate(self.blocks):
            joined = torch.cat([state[i + 1], x], dim=1)
            new_state.append(take_context(joined, lengths, block.context))
            first = first - block.context // 2
            x = keep_positions(block(joined, condition), first, ends)
        x = self.final_layer_norm(x)
        audio, y_tail, envelope_tail = self._istft(x, lengths, first, ends, state[-2], state[-1])
        new_state.append(y_tail)
        new_state.append(envelope_tail)
        return audio, new_state

    def _istft(self, x: torch.Tensor, lengths: torch.Tensor, first: torch.Tensor, ends: torch.Tensor,
               y_tail: torch.Tensor, envelope_tail: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ISTFT head on (B, T, H) backbone frames at positions ``first[b] + t``: the T * hop samples they
        complete (normalised by the window envelope), and the new tails."""
        batch, num_frames = x.shape[0], x.shape[1]
        x = self.out(x)
        half = self.n_fft // 2 + 1
        steps = torch.arange(num_frames, device=x.device)[None, :]
        positions = first[:, None] + steps
        # padding past a row's own frames must not reach its overlap-add tail
        mask = ((positions >= 0) & (positions < ends[:, None]) & (steps < lengths[:, None])).to(x.dtype)
        mag = torch.clip(torch.exp(x[:, :, :half]), max=1e2) * mask[:, :, None]
        phase = x[:, :, half:]
        spec = torch.complex(mag * torch.cos(phase), mag * torch.sin(phase))
        windowed = torch.fft.irfft(spec, self.n_fft, dim=-1, norm="backward") * self.window
        y = self._overlap_add(windowed, y_tail)
        envelope = self._overlap_add(self.window.square()[None, None, :] * mask[:, :, None], envelope_tail)
        tail_frames = self.overlap - 1
        y_tail = take_context(y, lengths, tail_frames).reshape(batch, -1)
        envelope_tail = take_context(envelope, lengths, tail_frames).reshape(batch, -1)
        y, envelope = y[:, :num_frames].reshape(batch, -1), envelope[:, :num_frames].reshape(batch, -1)
        audio = torch.where(envelope > 1e-11, y / envelope, torch.zeros_like(y))
        return audio, y_tail, envelope_tail

    def _overlap_add(self, frames: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
        """(B, T, n_fft) frames + (B, (overlap - 1) * hop) tail -> (B, T + overlap - 1, hop) sums."""
        batch, num_frames = frames.shape[0], frames.shape[1]
        chunks = frames.reshape(batch, num_frames, self.overlap, self.hop_length)
        out = torch.zeros(batch, num_frames + self.overlap - 1, self.hop_length, dtype=frames.dtype,
                          device=frames.device)
        out[:, : self.overlap - 1] += tail.reshape(batch, self.overlap - 1, self.hop_length)
        for k in range(self.overlap):
            out[:, k : k + num_frames] += chunks[:, :, k]
        return out



def piece_bounds(geometry: Dict[str, int], position: int, length: int, end: int, last: bool) -> Tuple[int, int]:
    """Which of a row's ``length * hop`` completed samples are output: ``audio[start:stop]``.

    ``position`` is where the row's frames started in the sequence, ``end`` its real frames so far; the
    samples before the ISTFT's trim are dropped, and on the ``last`` (flushing) step those past the output.
    """
    hop, trim = geometry["hop_length"], geometry["trim_samples"]
    first_raw = (position - geometry["delay_frames"]) * hop
    start = max(0, trim - first_raw)
    stop = length * hop
    if last:
        stop = min(stop, (end + geometry["overlap"] - 1) * hop - trim - first_raw)
    return start, max(start, stop)


def decode_in_chunks(module: nn.Module, features: torch.Tensor, chunk_frames: List[int],
                     condition: int = 0) -> List[torch.Tensor]:
    """Run one sequence ``features`` (C, T) through a :class:`StreamingVocos` (eager or TorchScript) in
    chunks of the given sizes (summing to T), the last one flushed; returns each step's output piece."""
    geometry = {k: int(v) for k, v in module.geometry().items()}
    state = module.initial_state(1)
    pieces: List[torch.Tensor] = []
    position, real = 0, 0
    for index, count in enumerate(chunk_frames):
        last = index == len(chunk_frames) - 1
        frames = features[None, :, real : real + count]
        if last:
            frames = torch.cat([frames, frames.new_zeros(1, frames.shape[1], geometry["flush_frames"])], dim=2)
        length = frames.shape[2]
        real += count
        audio, state = module(frames, torch.tensor([length]), torch.tensor([position]), torch.tensor([real]),
                              torch.tensor([condition]), state)
        start, stop = piece_bounds(geometry, position, length, real, last)
        pieces.append(audio[0, start:stop])
        position += length
    return pieces

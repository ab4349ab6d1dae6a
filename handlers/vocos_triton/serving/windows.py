"""Long vocoder batches in time windows, exactly, so that no forward runs for seconds.

One forward of two 60 s items takes 2-10 s (one core, shared by two instances); a request whose caller
gives up meanwhile keeps the instance, and the requests queued behind it wait for work nobody receives.
Cut in windows of ``window`` frames (plus ``context`` frames of the neighbours either side), the batch is
several shorter forwards, and between two of them the model looks again at the deadlines
(:meth:`~vocos_triton.serving.base.RaggedBatchModel.run_planned`) and drops the items that can no longer
be in time.

Why it is exact: an output sample depends only on the frames within ``context`` of its own (the
backbone's convolutions, then the ISTFT's window; ``BatchedVocos.geometry()["context_frames"]``). A
window decodes frames ``[w0, w1)`` as if they were a whole item: the frames near its cut edges see zero
padding instead of their neighbours, so only the audio of its core ``[start, start + window)``, at least
``context`` frames from every cut, is kept. The head trims the same samples from every window (``center``
and ``same`` alike), so window sample ``j`` is the item's sample ``j + w0 * hop``. Each item ends with
its own last window, which reaches its true end and gives its exact length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Generator, List, Optional, Sequence, Set

import numpy as np


@dataclass
class Progress:
    """What a model reports after each forward of a batch run in steps."""

    #: padded frames the forward just run computed (None: the whole batch as planned, in one forward)
    frames: Optional[int] = None
    #: frames still to compute, by the item's index in the batch (finished items are absent)
    remaining: Dict[int, int] = field(default_factory=dict)


#: a batch run in steps: yields :class:`Progress` after each forward and is sent the indices of the items
#: to drop (their callers will not wait); returns each item's result (None for a dropped item)
Steps = Generator[Progress, Set[int], List[Optional[np.ndarray]]]


def decode_in_windows(lengths: Sequence[int], decode: Callable[[List[int], int, int], np.ndarray], window: int,
                      context: int, hop_length: int, samples: Callable[[int], int]) -> Steps:
    """Decode items of ``lengths`` frames in windows of ``window`` frames.

    ``decode(members, w0, w1)`` runs one forward of the items ``members`` (indices), each on its frames
    ``[w0, min(w1, its length))``, and returns their (len(members), L) padded waveforms; ``samples(T)`` is
    the audio length of T frames (the geometry's rule).
    """
    pieces: Dict[int, List[np.ndarray]] = {i: [] for i in range(len(lengths))}
    active = set(range(len(lengths)))
    start = 0
    while active:
        members = sorted(i for i in active if lengths[i] > start)
        end = start + window
        w0, w1 = max(0, start - context), min(max(lengths[i] for i in members), end + context)
        waveform = decode(members, w0, w1)
        for row, i in enumerate(members):
            # the window's core, in the item's samples; the item's last window reaches its end
            last = samples(lengths[i]) if end >= lengths[i] else end * hop_length
            pieces[i].append(waveform[row, (start - w0) * hop_length : last - w0 * hop_length])
        active = {i for i in members if lengths[i] > end}
        dropped = yield Progress(len(members) * (w1 - w0), {i: lengths[i] - end for i in active})
        for i in (dropped or set()) & active:
            active.discard(i)
            pieces.pop(i)
        start = end
    return [np.concatenate(pieces[i]) if i in pieces else None for i in range(len(lengths))]

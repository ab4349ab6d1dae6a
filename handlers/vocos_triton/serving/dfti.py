"""Real FFTs with MKL's DFTI through ctypes: the FFT that torch's CPU ``torch.stft`` runs, without torch.

Why MKL and not ``numpy.fft``: the reference log-mel (``torch.stft`` in float32, then ``log``) is exact
to float32 rounding only where a bin holds energy. In the bands that speech leaves empty (above 11 kHz
for espeak, above 8 kHz for anything recorded at 16 kHz) and in near-silent frames, a bin's magnitude
*is* the FFT's rounding noise (about 1e-7 of the frame's norm), and the log of noise differs between two
correct FFTs by up to 1.8 (numpy's float64 pocketfft, or a float32 pocketfft, against torch on real
speech and on the export's probe). torch's CPU builds compute the FFT with MKL (statically linked);
the shared MKL from the ``mkl`` wheel, configured as torch configures it (out of place, conjugate-even
output as complex numbers, a batch of transforms), gives the same numbers bit for bit (tested with MKL
2024.2 and 2026.2 against torch 2.11 and 2.13), so the numpy front end equals the reference to the
last rounding of the matmul and log (< 1e-6).

Loading the library and running an FFT adds about 11 MB to a lone process's PSS; importing torch, 260 MB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from pathlib import Path
from typing import List

import numpy as np

# mkl_dfti.h
_FORWARD_DOMAIN_REAL = 33
_CONJUGATE_EVEN_STORAGE, _COMPLEX_COMPLEX = 10, 39
_PLACEMENT, _NOT_INPLACE = 11, 44
_NUMBER_OF_TRANSFORMS, _INPUT_DISTANCE, _OUTPUT_DISTANCE = 7, 14, 15
# mkl_service.h: one thread per call; the stub is one of several processes on the cores, and the
# threaded layers would load Intel's OpenMP runtime
_THREADING_SEQUENTIAL = 1


class FftUnavailable(RuntimeError):
    """No MKL runtime library (``libmkl_rt``) in this environment; ``pip install mkl`` provides one."""


def _candidates() -> List[str]:
    """Where ``libmkl_rt`` may be: the environment's own ``lib/`` (the ``mkl`` wheel puts it there),
    then the system's library path."""
    local = sorted((Path(sys.prefix) / "lib").glob("libmkl_rt.so*"), reverse=True)
    system = ctypes.util.find_library("mkl_rt")
    return [str(p) for p in local] + ([system] if system else [])


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL:
    """The process's MKL (loaded once, sequential threading); raises :class:`FftUnavailable`."""
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path}: {exc}")
            continue
        lib.MKL_Set_Threading_Layer(ctypes.c_int(_THREADING_SEQUENTIAL))  # before any other MKL call
        lib.DftiErrorMessage.restype = ctypes.c_char_p
        return lib
    where = "; ".join(tried) or f"none in {Path(sys.prefix) / 'lib'} or on the library path"
    raise FftUnavailable(f"MKL's runtime library libmkl_rt is needed for the numpy mel front end ({where}); "
                         "install the `mkl` wheel into this environment")


def available() -> bool:
    try:
        load_library()
    except FftUnavailable:
        return False
    return True


def version() -> str:
    """MKL's version line, e.g. for provenance."""
    buffer = ctypes.create_string_buffer(256)
    load_library().MKL_Get_Version_String(buffer, ctypes.c_int(len(buffer)))
    return buffer.value.decode(errors="replace").strip()


class RealFft:
    """rfft(frames (N, n) float32) -> (N, n // 2 + 1) complex64, unnormalised: ``torch.fft.rfft`` on CPU."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lib = load_library()

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            message = self.lib.DftiErrorMessage(ctypes.c_long(status)).decode(errors="replace")
            raise RuntimeError(f"MKL DFTI {what} (n={self.n}): {message.strip()}")

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if frames.ndim != 2 or frames.shape[1] != self.n:
            raise ValueError(f"frames: expected (N, {self.n}), got {frames.shape}")
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        bins = self.n // 2 + 1
        out = np.empty((frames.shape[0], bins), np.complex64)
        if not frames.shape[0]:
            return out
        lib, handle = self.lib, ctypes.c_void_p()
        # a descriptor per call, as torch configures its own: a plan is tens of microseconds against
        # milliseconds of frames, and holds no state between requests
        self._check(lib.DftiCreateDescriptor_s_1d(ctypes.byref(handle), ctypes.c_int(_FORWARD_DOMAIN_REAL),
                                                  ctypes.c_long(self.n)), "create")
        try:
            for key, value in ((_CONJUGATE_EVEN_STORAGE, _COMPLEX_COMPLEX), (_PLACEMENT, _NOT_INPLACE),
                               (_NUMBER_OF_TRANSFORMS, frames.shape[0]), (_INPUT_DISTANCE, self.n),
                               (_OUTPUT_DISTANCE, bins)):
                self._check(lib.DftiSetValue(handle, ctypes.c_int(key), ctypes.c_long(value)), f"set {key}")
            self._check(lib.DftiCommitDescriptor(handle), "commit")
            self._check(lib.DftiComputeForward(handle, frames.ctypes.data_as(ctypes.c_void_p),
                                               out.ctypes.data_as(ctypes.c_void_p)), "forward")
        finally:
            lib.DftiFreeDescriptor(ctypes.byref(handle))
        return out


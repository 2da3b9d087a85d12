"""Math helpers compiled by numba for the CPU kernels (imported only where numba is installed)."""

from __future__ import annotations

import numba
import numpy as np

# LLVM fast-math flags for the CPU kernels: reassociation (vectorised reductions), contraction (FMA) and
# approximate functions, but not "no NaNs" / "no infinities": the kernels use -inf as a start value and mask.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two (Cody-Waite): k * _LN2_HI is exact for |k| < 2**12
_LN2_LO = np.float32(-2.12194440e-4)


@numba.njit(fastmath=FASTMATH, nogil=True, cache=True, error_model="numpy", inline="always")
def exp_inplace(x: np.ndarray, bits: np.ndarray) -> None:
    """``x[:] = exp(x)`` for float32 ``x`` ``[n]`` with entries <= 88 (``bits``: int32 scratch ``[n]``).

    Vectorised (``np.exp`` in a numba loop calls libm once per element); relative error below 2e-7.
    exp(x) = 2**k * 2**f with k = round(x / ln 2) and |f| <= 1/2: exp(r), r = f ln 2 = x - k ln 2, by its
    degree-7 Taylor series, 2**k from its exponent bits. Entries below -87 give exp(-87) (about 1.6e-38).
    """
    n = x.shape[0]
    for i in range(n):
        v = max(x[i], np.float32(-87.0))
        k = np.floor(v * _LOG2E + np.float32(0.5))
        r = (v - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln(2) / 2
        p = np.float32(1.0 / 5040)
        p = p * r + np.float32(1.0 / 720)
        p = p * r + np.float32(1.0 / 120)
        p = p * r + np.float32(1.0 / 24)
        p = p * r + np.float32(1.0 / 6)
        p = p * r + np.float32(0.5)
        p = p * r + np.float32(1.0)
        p = p * r + np.float32(1.0)
        bits[i] = (np.int32(k) + np.int32(127)) << np.int32(23)
        x[i] = p
    scale = bits.view(np.float32)
    for i in range(n):
        x[i] *= scale[i]

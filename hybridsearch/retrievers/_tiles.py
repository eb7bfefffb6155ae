"""The register tile shared by the float32 scoring kernels (ColBERT MaxSim, exact dense scan).

:func:`tile_4x2` computes the 8 dot products of query rows ``i .. i+3`` of ``q`` with rows
``j, j+1`` of ``p`` over ``d`` dimensions: 8 independent accumulators, 6 loads per 8 fused
multiply-adds, which LLVM vectorises along ``d``. Inlined into each caller.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Reassociation lets LLVM vectorise the dot products; no "ninf"/"nnan": callers compare with -inf.
FASTMATH = {"reassoc", "contract", "nsz"}


@njit(inline="always", fastmath=FASTMATH)
def tile_4x2(q, i, p, j, d):
    """``(q[i]·p[j], q[i]·p[j+1], q[i+1]·p[j], q[i+1]·p[j+1], ..., q[i+3]·p[j+1])``."""
    s00 = s01 = s10 = s11 = np.float32(0.0)
    s20 = s21 = s30 = s31 = np.float32(0.0)
    for e in range(d):
        p0 = p[j, e]
        p1 = p[j + 1, e]
        q0 = q[i, e]
        q1 = q[i + 1, e]
        q2 = q[i + 2, e]
        q3 = q[i + 3, e]
        s00 += q0 * p0
        s01 += q0 * p1
        s10 += q1 * p0
        s11 += q1 * p1
        s20 += q2 * p0
        s21 += q2 * p1
        s30 += q3 * p0
        s31 += q3 * p1
    return s00, s01, s10, s11, s20, s21, s30, s31

"""The numba kernel behind ``backend="numba"`` of :mod:`emkd.matching.l1_kernels` (imported only when numba is).

``torch.cdist(p=1)`` computes one ``|a - b|`` sum per output entry, reloading both rows for every pair: about 1 G
absolute differences per second on this project's 2-core machine. This kernel tiles the ``[Ns, Nt]`` output into
``TILE_ROWS x TILE_COLS`` blocks and keeps the block's sums in registers while it walks the features, so each
feature loaded serves ``TILE_COLS`` (student side) or ``TILE_ROWS`` (teacher side) pairs and the loop runs at the
rate of the subtract / absolute value / add instructions themselves (docs/performance.md, section 5).

``fastmath={"reassoc", "nsz"}`` lets LLVM split each sum over features across the lanes of a vector register and add
the lanes at the end: the float32 rounding differs from ``cdist``'s (measured within 2e-6 relative at the paper's
scale); NaN and infinity still propagate, as they would without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np

TILE_ROWS = 6  # student rows per tile
TILE_COLS = 4  # teacher rows per tile: 24 running sums, each a vector over features (AVX-512 CPUs have 32 registers)


@contextmanager
def threads(n: int) -> Iterator[int]:
    """Run numba's parallel loops on ``min(n, NUMBA_NUM_THREADS)`` threads inside the block (numba's setting is per
    calling thread; the previous value comes back on exit). Yields the number used."""
    previous = numba.get_num_threads()
    used = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(used)
    try:
        yield used
    finally:
        numba.set_num_threads(previous)


@numba.njit(parallel=True, fastmath={"reassoc", "nsz"}, cache=True)
def l1_accumulate(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out[g, i, j] += sum_f |a[g, i, f] - b[g, j, f]|``, in place.

    Args:
        a: ``[G, Ns, F]`` float32, C-contiguous (student rows).
        b: ``[G, Nt, F]`` float32, C-contiguous (teacher rows).
        out: ``[G, Ns, Nt]`` float32, C-contiguous; each entry gets one sum over this call's ``F`` features added.

    The ``G x ceil(Ns / TILE_ROWS)`` row blocks are shared among numba's threads; each walks every teacher tile.
    A block cut short by the end of ``Ns`` (or a tile by the end of ``Nt``) is computed as the full block that ends
    there, overlapping the one before, and adds only the rows (columns) it owns: every entry is summed by the
    unrolled full-tile loop whenever ``Ns >= TILE_ROWS`` and ``Nt >= TILE_COLS`` (the demo's 16 student rows would
    otherwise leave a quarter of the work to the slow loop).
    """
    groups, ns, nf = a.shape
    nt = b.shape[1]
    row_blocks = (ns + TILE_ROWS - 1) // TILE_ROWS
    full = ns >= TILE_ROWS and nt >= TILE_COLS
    for task in numba.prange(groups * row_blocks):
        g = task // row_blocks
        i_own = (task % row_blocks) * TILE_ROWS  # the first row this block adds to out
        acc = np.zeros((TILE_ROWS, TILE_COLS), np.float32)  # (TILE_ROWS, TILE_COLS) running sums
        for j_own in range(0, nt, TILE_COLS):
            acc[:] = 0.0
            if full:
                i0 = min(i_own, ns - TILE_ROWS)  # a full block, shifted back at the end of the rows
                j0 = min(j_own, nt - TILE_COLS)
                # Constant trip counts: LLVM unrolls r and q and keeps acc in registers.
                for f in range(nf):
                    for r in range(TILE_ROWS):
                        x = a[g, i0 + r, f]
                        for q in range(TILE_COLS):
                            acc[r, q] += abs(x - b[g, j0 + q, f])
                for r in range(i_own - i0, TILE_ROWS):  # rows (columns) before i_own (j_own) belong to a neighbour
                    for q in range(j_own - j0, TILE_COLS):
                        out[g, i0 + r, j0 + q] += acc[r, q]
            else:  # fewer rows than a tile on either side
                rows = min(TILE_ROWS, ns - i_own)
                cols = min(TILE_COLS, nt - j_own)
                for f in range(nf):
                    for r in range(rows):
                        x = a[g, i_own + r, f]
                        for q in range(cols):
                            acc[r, q] += abs(x - b[g, j_own + q, f])
                for r in range(rows):
                    for q in range(cols):
                        out[g, i_own + r, j_own + q] += acc[r, q]


PROBE_CENTRES = 12  # independent running sums in the probe: enough to hide the add's latency


@numba.njit(parallel=True, fastmath={"reassoc", "nsz"}, cache=True)
def sub_abs_add_probe(x: np.ndarray, repeats: int) -> np.ndarray:
    """The machine's sustained ``acc += |x - c|`` rate, the ceiling :func:`l1_accumulate` is measured against.

    Each of ``x``'s ``[T, F]`` float32 rows (one per thread; keep ``F`` small enough for the L1 cache) is walked
    ``repeats`` times against ``PROBE_CENTRES`` constants: ``T * F * PROBE_CENTRES * repeats`` subtract / absolute
    value / add steps, one load per ``PROBE_CENTRES`` of them, vectorised over ``F`` as the kernel's inner loop is.
    Returns the ``[T]`` sums, so that the work cannot be optimised away.
    """
    threads, nf = x.shape
    out = np.zeros(threads, np.float32)
    for t in numba.prange(threads):
        acc = np.zeros(PROBE_CENTRES, np.float32)
        for _ in range(repeats):
            for f in range(nf):
                v = x[t, f]
                for q in range(PROBE_CENTRES):
                    acc[q] += abs(v - np.float32(q) * np.float32(1.0 / PROBE_CENTRES))
        out[t] = acc.sum()
    return out

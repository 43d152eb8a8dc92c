"""Vocabulary chunking shared by the fused losses (:mod:`emkd.losses.fused`) and the matching cost
(:mod:`emkd.matching.cost`): every full-vocabulary quantity is accumulated over chunks of LM-head rows.

The loops over these chunks (:func:`vocab_chunks`) run without data-dependent host synchronisation: no ``.item()``,
``bool(tensor)``, ``nonzero()`` or boolean-mask indexing inside them, only masked arithmetic on tensors whose shapes
are known before the loop, so that on a GPU the host queues every chunk's kernels without waiting for the device
(``tests/test_host_sync.py``; docs/performance.md section 6).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

IMPLEMENTATIONS = ("fused", "naive")
DEFAULT_CHUNK_SIZE = 1024  # vocabulary rows per chunk on the CPU: 729 tokens x 1024 x 4 B = 3 MB of logits at a time
CUDA_CHUNK_SIZE = 8192  # vocabulary rows per chunk on CUDA devices: an estimate, see default_chunk_size


def check_implementation(implementation: str) -> None:
    """``fused`` (chunked, the default) or ``naive`` (full logits, the reference)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def default_chunk_size(device: torch.device | str) -> int:
    """Vocabulary rows per chunk when the caller gives none, by the device the tensors are on.

    * CPU (and any device other than CUDA): :data:`DEFAULT_CHUNK_SIZE` = 1024, measured at the paper's scale on the
      CPU (docs/performance.md section 1: it meets both the memory and the time targets there).
    * CUDA: :data:`CUDA_CHUNK_SIZE` = 8192. This value is an estimate, not a measurement (the development machine
      has no GPU): at 1024 one EM-KD loss call launches a few thousand small kernels, and 8192 rows keep every
      per-chunk buffer small next to a GPU's memory (``2 x 873`` matching rows ``x 8192 x 4 B`` = 57 MB at the
      paper's scale) while launching 8 x fewer. Measure on your GPU and pass ``chunk_size=`` to change it.

    ``device`` is a :class:`torch.device` or a string such as ``"cpu"`` or ``"cuda:1"``.
    """
    return CUDA_CHUNK_SIZE if torch.device(device).type == "cuda" else DEFAULT_CHUNK_SIZE


def resolve_chunk_size(chunk_size: int | None, device: torch.device | str) -> int:
    """``chunk_size`` when the caller set it, else :func:`default_chunk_size` of ``device``."""
    if chunk_size is None:
        return default_chunk_size(device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def vocab_chunks(total: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of every chunk of ``total`` vocabulary rows, ``chunk_size`` rows each (the last may be
    shorter). The body of a loop over them must not synchronise with the device (see the module docstring)."""
    for start in range(0, total, chunk_size):
        yield start, min(start + chunk_size, total)


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Float32 logits of vocabulary rows ``start:stop``: ``h [N, D]``, ``w [V, D]``, ``b [V]`` -> ``[N, stop - start]``."""
    z = h.float() @ w[start:stop].float().T  # (N, C)
    if b is not None:
        z = z + b[start:stop].float()
    return z

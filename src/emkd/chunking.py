"""Vocabulary chunking shared by the fused losses (:mod:`emkd.losses.fused`) and the matching cost
(:mod:`emkd.matching.cost`): every full-vocabulary quantity is accumulated over chunks of LM-head rows."""

from __future__ import annotations

import torch

IMPLEMENTATIONS = ("fused", "naive")
DEFAULT_CHUNK_SIZE = 1024  # vocabulary rows per chunk: 729 tokens x 1024 x 4 B = 3 MB of logits at a time


def check_implementation(implementation: str) -> None:
    """``fused`` (chunked, the default) or ``naive`` (full logits, the reference)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Float32 logits of vocabulary rows ``start:stop``: ``h [N, D]``, ``w [V, D]``, ``b [V]`` -> ``[N, stop - start]``."""
    z = h.float() @ w[start:stop].float().T  # (N, C)
    if b is not None:
        z = z + b[start:stop].float()
    return z

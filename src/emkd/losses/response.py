"""Losses on response positions: supervised cross-entropy and token-level divergences (SPEC §3-5)."""

from __future__ import annotations

import torch

from emkd.inputs import DistillInputs, zero_like_graph


def response_logits(
    student: DistillInputs, teacher: DistillInputs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits ``[R, V]``, teacher logits ``[R, V]`` (no gradient) and targets ``[R]`` at every response
    position of the batch, sample-major. The pair must have passed :func:`emkd.inputs.check_pair`."""
    zs = student.logits(student.response_hidden())  # (R, V)
    with torch.no_grad():
        zt = teacher.logits(teacher.response_hidden())  # (R, V)
    return zs, zt, student.response_targets


def mean_or_zero(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Mean of a 1D tensor; an exact zero connected to ``anchor``'s graph when it is empty."""
    if values.numel() == 0:
        return zero_like_graph(anchor)
    return values.mean()


def sum_or_zero(values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Sum of a 1D tensor in float32; an exact zero connected to ``anchor``'s graph when it is empty."""
    if values.numel() == 0:
        return zero_like_graph(anchor)
    return values.float().sum()

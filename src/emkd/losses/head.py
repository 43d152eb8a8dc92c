"""Per-row divergences of two heads' distributions, by either implementation (the one entry point the losses use).

``fused`` (the default of every loss) goes through :mod:`emkd.losses.fused` and never builds a full-vocabulary
logit matrix; ``naive`` applies the heads, builds ``[N, V]`` logits and calls :mod:`emkd.losses.divergence`: it is
the reference the fused path is tested against and the baseline of ``benchmarks/loss_bench.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emkd.chunking import check_implementation
from emkd.inputs import IGNORE_INDEX, DistillInputs, joined_rows
from emkd.losses.divergence import forward_kl, jsd, reverse_kl
from emkd.losses.fused import fused_head_divergences


def logit_divergences(
    zs: torch.Tensor,
    zt: torch.Tensor | None,
    kinds: tuple[str, ...],
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The naive computation from materialised logits: student ``zs`` ``[N, V]``, teacher ``zt`` ``[N, V]`` ->
    ``{kind: [N]}``."""
    out = {}
    for kind in kinds:
        if kind == "ce":
            out[kind] = F.cross_entropy(zs.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
        elif kind == "forward":
            out[kind] = forward_kl(zs, zt, temperature)
        elif kind == "reverse":
            out[kind] = reverse_kl(zs, zt, temperature)
        elif kind == "jsd":
            out[kind] = jsd(zs, zt, temperature, jsd_beta)
        else:
            raise ValueError(f"unknown divergence kind {kind!r}")
    return out


def head_divergences(
    student: DistillInputs,
    hs: torch.Tensor,
    teacher: DistillInputs | None,
    ht: torch.Tensor | None,
    kinds: tuple[str, ...],
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    implementation: str = "fused",
    chunk_size: int | None = None,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row ``kinds`` between ``student``'s head on rows ``hs`` ``[N, Ds]`` and ``teacher``'s head on the paired
    rows ``ht`` ``[N, Dt]`` (no gradient to the teacher) -> ``{kind: [N] float32}``.

    ``ce`` takes ``targets`` ``[N]`` (``-100`` gives 0) and ignores the temperature; the divergences use
    ``softmax(z / temperature)`` as in :mod:`emkd.losses.divergence`. ``chunk_size`` (fused only): vocabulary rows per
    chunk, ``None`` for :func:`emkd.chunking.default_chunk_size` of the rows' device; ``given`` (fused only): the
    logits of the last rows, :func:`~emkd.losses.fused.fused_head_divergences`'s.
    """
    check_implementation(implementation)
    if implementation == "naive":
        zs = student.logits(hs)  # (N, V)
        zt = None
        if teacher is not None and ht is not None:
            with torch.no_grad():
                zt = teacher.logits(ht)  # (N, V)
        return logit_divergences(zs, zt, kinds, temperature, targets, jsd_beta)
    values = fused_head_divergences(
        hs, student.head_weight, student.head_bias,
        None if teacher is None else ht, None if teacher is None else teacher.head_weight,
        None if teacher is None else teacher.head_bias,
        tuple(kinds), temperature, targets, jsd_beta, chunk_size, given,
    )  # (N, K)
    return {kind: values[:, k] for k, kind in enumerate(kinds)}


def response_and_row_divergences(
    student: DistillInputs,
    teacher: DistillInputs,
    rows_s: list[torch.Tensor],
    rows_t: list[torch.Tensor],
    divergence: str,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    rows_logits: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One fused pass over both heads for the response positions and any further paired rows (vision pairs, TPA
    candidates): the rows are stacked after the response rows, so the student head is read once.

    Args:
        rows_s, rows_t: paired ``[M_i, Ds]`` / ``[M_i, Dt]`` row blocks (may be empty lists).
        divergence: ``forward`` | ``reverse`` | ``jsd``, applied to every row.
        rows_logits: per block, its rows' logits ``([M_i, V], [M_i, V])`` without gradient when already computed
            (:attr:`emkd.matching.VisionPairs.logit_values`); when every block has them and the vocabulary is one
            chunk, the pass computes only the response rows' logits.

    Returns:
        ``({"ce": [R], divergence: [R]}, [sum M_i])``: the response rows' values and the further rows' divergence.
    """
    targets = student.response_targets  # (R,)
    num_responses = int(targets.numel())
    extra = sum(int(r.shape[0]) for r in rows_s)
    ignore = torch.full((extra,), IGNORE_INDEX, dtype=torch.long, device=targets.device)
    given = None
    if rows_logits and all(z is not None for z in rows_logits):
        given = (joined_rows([zs for zs, _ in rows_logits]), joined_rows([zt for _, zt in rows_logits]))  # (sum M_i, V)
    hs, ht = student.response_hidden(), teacher.response_hidden()  # (R, Ds), (R, Dt)
    if rows_s:
        hs, ht = torch.cat([hs, joined_rows(rows_s)]), torch.cat([ht, joined_rows(rows_t)])
    values = head_divergences(
        student, hs, teacher, ht,
        ("ce", divergence), temperature, torch.cat([targets, ignore]), implementation="fused", chunk_size=chunk_size,
        given=given,
    )
    response = {kind: v[:num_responses] for kind, v in values.items()}
    return response, values[divergence][num_responses:]

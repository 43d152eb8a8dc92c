"""What every loss term is normalised by, so that one owner can normalise over a whole optimizer step (SPEC §3).

A loss term is a weighted mean: ``weight * total / count``, where ``total`` sums the term over its units (response
tokens, samples, vision pairs) and ``count`` is the number of those units. Called on one batch, a loss divides by the
batch's own counts and returns its means. Under gradient accumulation and data parallelism that is not the mean of
the optimizer step: a micro-batch with few response tokens would weigh each of them more. So every loss also returns
its terms unreduced (:class:`LossTerms`), and the trainer divides each ``total`` by the count of its unit over every
micro-batch of the step on every process (:meth:`LossTerms.loss` with the step's counts): the gradient of the step is
then that of one batch holding all of its samples.

Units (:data:`UNITS`), all of which can be counted from a collated batch before any model runs:

* ``samples``: the samples of the batch, text-only ones included;
* ``response_tokens``: positions that predict a supervised label (``labels[:, 1:] != -100``);
* ``image_samples``: samples with at least one vision token on both sides (at least one matched pair);
* ``vision_pairs``: matched vision pairs, ``min(Ns_b, Nt_b)`` per sample (every matching pairs that many).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emkd.inputs import DistillInputs

UNITS = ("samples", "response_tokens", "image_samples", "vision_pairs")


@dataclass
class Term:
    """One term of a loss: ``weight * total / count(unit)``.

    Args:
        weight: the term's weight in the loss.
        total: scalar tensor, the term summed over its units (attached to the graph).
        unit: one of :data:`UNITS`, what ``total`` is summed over and divided by.
    """

    weight: float
    total: torch.Tensor
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"a loss term's unit must be one of {UNITS}, got {self.unit!r}")


@dataclass
class LossTerms:
    """The unreduced terms of one loss call and the unit counts of the batch it saw.

    ``terms`` are in the order the loss adds them up; ``counts`` maps every unit of :data:`UNITS` to its number in
    this batch. :meth:`values` and :meth:`loss` divide by these counts unless given others (the optimizer step's).
    """

    terms: dict[str, Term]
    counts: dict[str, int] = field(default_factory=dict)

    def values(self, counts: dict[str, float] | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Each term's ``total / count(unit)`` (times ``scale`` when it is not 1), unweighted. A term whose unit
        counts zero has an empty total, an exact zero, and stays zero."""
        counts = self.counts if counts is None else counts
        out = {}
        for name, term in self.terms.items():
            n = counts[term.unit]
            value = term.total / n if n > 0 else term.total
            out[name] = value * scale if scale != 1.0 else value
        return out

    def loss(self, counts: dict[str, float] | None = None, scale: float = 1.0) -> torch.Tensor:
        """``sum_t weight_t * values[t]``, in term order."""
        return combine(self, self.values(counts, scale))


def combine(terms: LossTerms, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t weight_t * values[t]`` in the order of ``terms`` (a weight of 1 multiplies nothing)."""
    loss = None
    for name, term in terms.terms.items():
        part = values[name] if term.weight == 1.0 else term.weight * values[name]
        loss = part if loss is None else loss + part
    if loss is None:
        raise ValueError("a loss needs at least one term")
    return loss


def count_units(
    num_response: torch.Tensor, ns: torch.Tensor | None = None, nt: torch.Tensor | None = None
) -> dict[str, int]:
    """The counts of every unit of :data:`UNITS` from per-sample numbers.

    Args:
        num_response: ``[B]`` response positions of each sample.
        ns, nt: ``[B]`` vision tokens of each sample on the student and the teacher side; ``None`` (no teacher,
            ``sft``) counts no image sample and no pair.
    """
    counts = {"samples": int(num_response.numel()), "response_tokens": int(num_response.sum())}
    if ns is None or nt is None:
        counts.update(image_samples=0, vision_pairs=0)
    else:
        counts["image_samples"] = int(((ns > 0) & (nt > 0)).sum())
        counts["vision_pairs"] = int(torch.minimum(ns, nt).sum())
    return counts


def inputs_counts(student: DistillInputs, teacher: DistillInputs | None = None) -> dict[str, int]:
    """:func:`count_units` of a pair of :class:`~emkd.DistillInputs` (the counts a loss call normalises by)."""
    if teacher is None:
        return count_units(student.response_mask.sum(1))
    return count_units(student.response_mask.sum(1), student.vision_mask.sum(1), teacher.vision_mask.sum(1))


__all__ = ["UNITS", "LossTerms", "Term", "combine", "count_units", "inputs_counts"]

"""Supervised fine-tuning: the student's cross-entropy on response tokens, with no teacher (the ``sft`` method).

``CE = -(1/R) sum_r log softmax(W h_r + b)[y_r]`` over the ``R`` response positions of the batch (the positions
whose next token is a supervised label), where ``h_r`` ``[D]`` is the student's final hidden state at position
``r``, ``W`` ``[V, D]`` and ``b`` ``[V]`` its LM head, and ``y_r`` the next token.

Reduction: the sum over the batch's response positions divided by their number (``terms`` keeps the sum, unit
``response_tokens``); a batch without response positions gives an exact zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emkd.inputs import DistillInputs, check_common_options
from emkd.losses.head import head_divergences
from emkd.losses.normalisation import LossTerms, Term, combine, inputs_counts
from emkd.losses.response import sum_or_zero


@dataclass
class SFTOutput:
    """The loss, which is its one term ``ce`` (the mean over the batch's response positions), and the term
    unreduced (:class:`~emkd.losses.normalisation.LossTerms`, what the trainer normalises over an optimizer step)."""

    loss: torch.Tensor
    ce: torch.Tensor
    terms: LossTerms | None = None

    def components(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce")}


class SFTLoss(torch.nn.Module):
    """``loss = CE`` over the student's response positions (module docstring); holds no weights.

    Args:
        implementation: ``fused`` (default; chunked over the vocabulary, no ``[R, V]`` logits) | ``naive`` (full
            logits, the reference).
        chunk_size: vocabulary rows per chunk of the fused path; ``None`` (default): by the inputs' device,
            :func:`emkd.chunking.default_chunk_size` (1024 on the CPU, 8192 on CUDA).
    """

    def __init__(self, implementation: str = "fused", chunk_size: int | None = None) -> None:
        super().__init__()
        check_common_options(implementation=implementation, chunk_size=chunk_size)
        self.implementation, self.chunk_size = implementation, chunk_size

    def extra_repr(self) -> str:
        return f"implementation={self.implementation!r}, chunk_size={self.chunk_size}"

    def forward(self, student: DistillInputs) -> SFTOutput:
        rows = head_divergences(student, student.response_hidden(), None, None, ("ce",),
                                targets=student.response_targets, implementation=self.implementation,
                                chunk_size=self.chunk_size)["ce"]  # (R,)
        terms = LossTerms({"ce": Term(1.0, sum_or_zero(rows, student.hidden), "response_tokens")},
                          inputs_counts(student))
        values = terms.values()
        return SFTOutput(loss=combine(terms, values), ce=values["ce"], terms=terms)


__all__ = ["SFTLoss", "SFTOutput"]

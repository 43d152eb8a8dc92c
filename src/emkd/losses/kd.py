"""Response-only distillation baselines (SPEC §5).

Vanilla KD is ``KDLoss("forward", 1, 1)``. MiniLLM as EM-KD compares it is ``KDLoss("reverse", 0.5, 0.5)``: a
token-level reverse KL under teacher forcing. The original MiniLLM optimises the sequence-level reverse KL with a
policy gradient over student samples; that optimisation is not reproduced here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emkd.inputs import DistillInputs, check_choice, check_common_options, check_pair
from emkd.losses.head import head_divergences
from emkd.losses.normalisation import LossTerms, Term, combine, inputs_counts
from emkd.losses.response import sum_or_zero

KD_DIVERGENCES = ("forward", "reverse", "jsd")


@dataclass
class KDOutput:
    """The loss and its two terms (means over the batch's response positions), and the terms unreduced
    (:class:`~emkd.losses.normalisation.LossTerms`, what the trainer normalises over an optimizer step)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    terms: LossTerms | None = None

    def components(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce", "kd")}


class KDLoss(torch.nn.Module):
    """``loss = ce_weight * CE + kd_weight * D`` over response positions (means over positions).

    Args:
        divergence: ``forward`` ``KL(p_t || p_s)`` | ``reverse`` ``KL(p_s || p_t)`` | ``jsd`` (generalised JSD with
            mixture ``m = jsd_beta * p_t + (1 - jsd_beta) * p_s``).
        ce_weight, kd_weight: weights of the two terms.
        temperature: softmax temperature of ``D`` (no ``T**2`` factor).
        vocab: ``strict`` | ``crop``.
        implementation: ``fused`` (default; CE and ``D`` in one chunked pass over the heads, no ``[R, V]`` logits) |
            ``naive`` (full logits, the reference).
        chunk_size: vocabulary rows per chunk of the fused path; ``None`` (default): by the inputs' device,
            :func:`emkd.chunking.default_chunk_size` (1024 on the CPU, 8192 on CUDA).

    Reduction: both terms are sums over the batch's response positions divided by their number (``terms`` keeps the
    sums, unit ``response_tokens``).
    """

    def __init__(
        self,
        divergence: str = "forward",
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        jsd_beta: float = 0.5,
        vocab: str = "strict",
        implementation: str = "fused",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        check_common_options(vocab=vocab, implementation=implementation, temperature=temperature, chunk_size=chunk_size)
        check_choice("divergence", divergence, KD_DIVERGENCES)
        if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must lie in (0, 1), got {jsd_beta}")
        self.divergence, self.ce_weight, self.kd_weight = divergence, ce_weight, kd_weight
        self.temperature, self.jsd_beta, self.vocab = temperature, jsd_beta, vocab
        self.implementation, self.chunk_size = implementation, chunk_size

    def extra_repr(self) -> str:
        return (
            f"divergence={self.divergence!r}, ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, "
            f"temperature={self.temperature}, jsd_beta={self.jsd_beta}, vocab={self.vocab!r}, "
            f"implementation={self.implementation!r}"
        )

    def forward(self, student: DistillInputs, teacher: DistillInputs) -> KDOutput:
        student, teacher = check_pair(student, teacher, self.vocab)
        rows = head_divergences(
            student, student.response_hidden(), teacher, teacher.response_hidden(), ("ce", self.divergence),
            self.temperature, student.response_targets, self.jsd_beta, self.implementation, self.chunk_size,
        )  # {kind: (R,)}
        terms = LossTerms(
            {
                "ce": Term(self.ce_weight, sum_or_zero(rows["ce"], student.hidden), "response_tokens"),
                "kd": Term(self.kd_weight, sum_or_zero(rows[self.divergence], student.hidden), "response_tokens"),
            },
            inputs_counts(student, teacher),
        )
        values = terms.values()
        return KDOutput(loss=combine(terms, values), ce=values["ce"], kd=values["kd"], terms=terms)

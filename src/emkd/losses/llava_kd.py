"""LLaVA-KD's MDist + RDist (LLaVA-KD Eq. 1-7), and LLaVA-KD* for unbalanced vision tokens (SPEC §4).

* CE: supervised cross-entropy over response positions (Eq. 1).
* RES: forward KL ``KL(p_t || p_s)`` over response positions (Eq. 2).
* VIS: forward KL between paired vision logits (Eq. 3). Pairs are ``i <-> i`` when a sample's token counts are equal
  (the original LLaVA-KD); otherwise EM-KD's matching (LLaVA-KD*, as EM-KD Table 2 compares it).
* REL: per sample ``1 - cos(vec(Z_s Z_s^T), vec(Z_t Z_t^T))`` with ``Z`` the ``[M, V]`` paired vision logits stacked in
  pair order (Eq. 4-5), averaged over samples. (The authors' fork flattens the whole batch into one cosine; this
  is the paper's per-sample meaning.)

``loss = CE + alpha * RES + beta * VIS + gamma * REL``.

Reduction (SPEC §4): CE and RES are means over the batch's response positions, VIS the mean over all vision pairs of
the batch, REL the mean over samples with at least one pair. A text-only sample adds no pair and is not one of those
samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from emkd.inputs import DistillInputs, check_choice, check_common_options, check_pair, padded_rows, zero_like_graph
from emkd.losses.divergence import forward_kl
from emkd.losses.fused import fused_head_gram
from emkd.losses.head import response_and_row_divergences
from emkd.losses.normalisation import LossTerms, Term, combine, inputs_counts
from emkd.losses.response import response_logits, sum_or_zero
from emkd.matching.pairing import (
    AUTO_MATCHINGS,
    VisionPairs,
    check_assignment,
    pair_batch,
    pair_indices,
    paired_logits,
)


def relation_term(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """RDist of one sample: ``1 - cos(vec(zs zs^T), vec(zt zt^T))`` for ``[M, V]`` paired logits."""
    gram_s = zs @ zs.T  # (M, M)
    with torch.no_grad():
        gram_t = zt @ zt.T  # (M, M)
    return gram_distance(gram_s, gram_t)


def gram_distance(gram_s: torch.Tensor, gram_t: torch.Tensor) -> torch.Tensor:
    """``1 - cos(vec(gram_s), vec(gram_t))`` for two ``[M, M]`` Gram matrices."""
    return 1.0 - F.cosine_similarity(gram_s.reshape(1, -1), gram_t.reshape(1, -1), eps=1e-8)[0]


@dataclass
class LlavaKDOutput:
    """Every term as a scalar tensor, the matches ``(idx_s, idx_t)`` of each sample, and the terms unreduced
    (``terms``: sums over response tokens, vision pairs and samples with a pair)."""

    loss: torch.Tensor
    ce: torch.Tensor
    res: torch.Tensor
    vis: torch.Tensor
    rel: torch.Tensor
    matches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    terms: LossTerms | None = None

    def components(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce", "res", "vis", "rel")}


class LlavaKDLoss(torch.nn.Module):
    """LLaVA-KD (MDist + RDist); LLaVA-KD* when vision token counts differ. Call as ``loss_fn(student, teacher)``.

    Args:
        alpha: weight of RES; beta: weight of VIS; gamma: weight of REL (paper: 1, 1, 0.5).
        temperature: softmax temperature of RES and VIS.
        matching: ``auto`` (identity when a sample's counts are equal, else ``hungarian_logits``) or any EM-KD
            matching (``hungarian_logits``, ``hungarian_hidden``, ``avgpool``, ``identity``):
            :data:`emkd.matching.pairing.AUTO_MATCHINGS`.
        assignment: the solver of the Hungarian matchings, ``auto`` (SciPy) | ``scipy`` | ``auction`` (batched, on
            the costs' device): :func:`emkd.matching.hungarian_match`'s ``backend``.
        vocab: ``strict`` | ``crop``, as for :class:`emkd.EMKDLoss`.
        implementation: ``fused`` (default: CE, RES and VIS in one chunked pass over the heads, REL's Gram matrices
            summed over vocabulary chunks) | ``naive`` (full ``[N, V]`` logits, the reference).
        chunk_size: vocabulary rows per chunk of the fused path; ``None`` (default): by the inputs' device,
            :func:`emkd.chunking.default_chunk_size` (1024 on the CPU, 8192 on CUDA).

    Reductions: CE and RES are means over response positions, VIS is the mean over all vision pairs of the batch,
    REL the mean over samples with at least one pair.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.5,
        temperature: float = 1.0,
        matching: str = "auto",
        vocab: str = "strict",
        implementation: str = "fused",
        chunk_size: int | None = None,
        assignment: str = "auto",
    ) -> None:
        super().__init__()
        check_common_options(vocab=vocab, implementation=implementation, temperature=temperature, chunk_size=chunk_size)
        check_choice("matching", matching, AUTO_MATCHINGS)
        check_assignment(assignment)
        self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
        self.matching, self.assignment, self.vocab = matching, assignment, vocab
        self.implementation, self.chunk_size = implementation, chunk_size

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, "
            f"matching={self.matching!r}, assignment={self.assignment!r}, vocab={self.vocab!r}, "
            f"implementation={self.implementation!r}"
        )

    def forward(self, student: DistillInputs, teacher: DistillInputs) -> LlavaKDOutput:
        student, teacher = check_pair(student, teacher, self.vocab)
        anchor = student.hidden

        paired = pair_batch(student, teacher, self.matching, self.implementation, self.chunk_size, self.assignment,
                            keep_logits=self.implementation == "fused")
        matches = pair_indices(paired, anchor.device)
        pairs_by_sample = [pairs for pairs in paired if pairs is not None]

        if self.implementation == "fused":
            ce, res, vis, rel_terms = self._fused_terms(student, teacher, pairs_by_sample)
        else:
            zs, zt, targets = response_logits(student, teacher)  # (R, V), (R, V), (R,)
            ce = sum_or_zero(F.cross_entropy(zs, targets, reduction="none"), anchor)
            res = sum_or_zero(forward_kl(zs, zt, self.temperature), anchor)
            vis_rows, rel_terms = [], []
            for pairs in pairs_by_sample:
                vzs, vzt = paired_logits(pairs, student, teacher)  # (M, V), (M, V)
                vis_rows.append(forward_kl(vzs, vzt, self.temperature))
                rel_terms.append(relation_term(vzs.float(), vzt.float()))
            vis = sum_or_zero(torch.cat(vis_rows), anchor) if vis_rows else zero_like_graph(anchor)

        rel = torch.stack(rel_terms).sum() if rel_terms else zero_like_graph(anchor)
        terms = LossTerms(
            {
                "ce": Term(1.0, ce, "response_tokens"),
                "res": Term(self.alpha, res, "response_tokens"),
                "vis": Term(self.beta, vis, "vision_pairs"),
                "rel": Term(self.gamma, rel, "image_samples"),
            },
            inputs_counts(student, teacher),
        )
        values = terms.values()
        return LlavaKDOutput(loss=combine(terms, values), **values, matches=matches, terms=terms)

    def _fused_terms(
        self, student: DistillInputs, teacher: DistillInputs, pairs_by_sample: list[VisionPairs]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """The sums of CE and RES (over response positions) and of VIS (over pairs) from one chunked pass over the
        stacked response and vision-pair rows; REL per sample."""
        anchor = student.hidden
        response, vision_rows = response_and_row_divergences(
            student, teacher, [p.student_hidden for p in pairs_by_sample], [p.teacher_hidden for p in pairs_by_sample],
            "forward", self.temperature, self.chunk_size, [p.logit_values for p in pairs_by_sample],
        )
        ce = sum_or_zero(response["ce"], anchor)
        res = sum_or_zero(response["forward"], anchor)
        vis = sum_or_zero(vision_rows, anchor) if pairs_by_sample else zero_like_graph(anchor)
        by_size: dict[int, list[VisionPairs]] = {}
        for pairs in pairs_by_sample:  # samples with equal pair counts share one batched Gram pass
            by_size.setdefault(pairs.size, []).append(pairs)
        rel_terms = []  # REL is their sum over samples: the order does not matter
        for group in by_size.values():
            gram_s = fused_head_gram(padded_rows([p.student_hidden for p in group]), student.head_weight,
                                     student.head_bias, self.chunk_size)  # (G, M, M)
            with torch.no_grad():
                gram_t = fused_head_gram(padded_rows([p.teacher_hidden for p in group]), teacher.head_weight,
                                         teacher.head_bias, self.chunk_size)  # (G, M, M)
            rel_terms.extend(gram_distance(g_s, g_t) for g_s, g_t in zip(gram_s, gram_t))
        return ce, res, vis, rel_terms

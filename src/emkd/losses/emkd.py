"""EM-KD: distilling an efficient MLLM from a vanilla teacher with unbalanced vision tokens (SPEC §3).

EM-KD (Eq. 3-7, Listing 1) pairs each student vision token with a teacher vision token by Hungarian matching on the
Manhattan distance of their vision logits, then adds two losses on the matched pairs to the usual response losses:

* VSD, Vision Semantic Distillation (Eq. 3): reverse KL between matched vision logits, ``KL(p_s || p_t)``.
* VLAD, Vision-Language Affinity Distillation (Eq. 4-5): smooth L1 (beta = 1) between the cosine affinity matrices of
  matched vision tokens against all text tokens, student ``[M, K]`` versus teacher ``[M, K]``; no projection is
  needed when the hidden sizes differ.
* SUP: cross-entropy over response positions; RLD: reverse KL over response positions.

``loss = alpha * SUP + (1 - alpha) * RLD + beta * VSD + gamma * VLAD``.

Reduction: SUP and RLD are means over the batch's response positions. VSD and VLAD are per-sample means (over pairs;
VLAD over pairs and text tokens) summed over samples and divided by ``B``, the number of samples of the batch,
text-only samples included: Listing 1's ``L_distill / batch_size`` (``vision_reduction="batch"``, the default).
``vision_reduction="image_samples"`` divides by the number of samples with at least one matched pair instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from emkd.inputs import DistillInputs, check_choice, check_common_options, check_pair, padded_rows, zero_like_graph
from emkd.losses.divergence import reverse_kl
from emkd.losses.head import response_and_row_divergences
from emkd.losses.normalisation import LossTerms, Term, combine, inputs_counts
from emkd.losses.response import response_logits, sum_or_zero
from emkd.matching.pairing import MATCHINGS, VisionPairs, check_assignment, pair_batch, pair_indices, paired_logits

VSD_TARGETS = ("logits", "hidden")
#: what VSD and VLAD are divided by: every sample of the batch (``batch``, Listing 1) or the samples with a pair
VISION_REDUCTIONS = ("batch", "image_samples")


@dataclass
class EMKDOutput:
    """Every term of the EM-KD loss as a scalar tensor, plus the matches ``(idx_s, idx_t)`` of each sample
    (empty tensors for a sample without vision tokens) and the terms unreduced (``terms``: sums over response
    tokens and over samples, what the trainer normalises over an optimizer step)."""

    loss: torch.Tensor
    sup: torch.Tensor
    rld: torch.Tensor
    vsd: torch.Tensor
    vlad: torch.Tensor
    matches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    terms: LossTerms | None = None

    def components(self) -> dict[str, float]:
        """The scalar terms as Python floats, for logging."""
        return {k: float(getattr(self, k).detach()) for k in ("loss", "sup", "rld", "vsd", "vlad")}


def sum_of_means(values: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``sum_b mean(values[block b])`` of ``values`` ``[sum_b M_b]`` cut into blocks of ``sizes`` (every ``M_b > 0``):
    VSD's per-sample means summed over samples, by one reduction instead of one per sample."""
    if min(sizes) == max(sizes):
        return values.view(len(sizes), sizes[0]).mean(dim=1).sum()
    counts = torch.tensor(sizes, device=values.device, dtype=values.dtype)  # (n,)
    return (values / torch.repeat_interleave(counts, counts.long(), output_size=sum(sizes))).sum()


def vlad_term(pairs: VisionPairs, text_s: torch.Tensor, text_t: torch.Tensor) -> torch.Tensor:
    """VLAD of one sample (Eq. 4-5).

    Args:
        pairs: ``M`` matched vision tokens, ``[M, Ds]`` and ``[M, Dt]``.
        text_s: ``[K, Ds]`` student text-token hidden states; ``text_t``: ``[K, Dt]`` the teacher's.

    Returns:
        ``mean_{m,k} SmoothL1_{beta=1}(A_s[m, k] - A_t[m, k])`` with ``A = cos(vision_m, text_k)``.
    """
    return vlad_terms([pairs], [text_s], [text_t])[0]


def vlad_terms(
    pairs: list[VisionPairs], texts_s: list[torch.Tensor], texts_t: list[torch.Tensor]
) -> torch.Tensor:
    """:func:`vlad_term` of ``n`` samples at once -> ``[n]``: the samples' pairs and text tokens are zero-padded to
    ``[n, M_max, D]`` and ``[n, K_max, D]``, and each sample's smooth L1 is averaged over its own ``M_b x K_b``
    entries (one batched product instead of one small graph per sample). Every sample needs ``K_b > 0``."""
    def padded(rows: list[torch.Tensor]) -> torch.Tensor:
        return F.normalize(padded_rows(rows).float(), dim=-1, eps=1e-8)

    m = torch.tensor([p.size for p in pairs], device=texts_s[0].device)  # (n,)
    k = torch.tensor([t.shape[0] for t in texts_s], device=texts_s[0].device)  # (n,)
    a_s = padded([p.student_hidden for p in pairs]) @ padded(texts_s).transpose(1, 2)  # (n, M_max, K_max)
    with torch.no_grad():
        a_t = padded([p.teacher_hidden for p in pairs]) @ padded(texts_t).transpose(1, 2)  # (n, M_max, K_max)
        rows = torch.arange(a_s.shape[1], device=m.device)[None, :] < m[:, None]  # (n, M_max)
        cols = torch.arange(a_s.shape[2], device=m.device)[None, :] < k[:, None]  # (n, K_max)
        real = rows[:, :, None] & cols[:, None, :]  # (n, M_max, K_max)
    loss = F.smooth_l1_loss(a_s, a_t, beta=1.0, reduction="none") * real  # (n, M_max, K_max)
    return loss.sum(dim=(1, 2)) / (m * k)  # (n,)


class EMKDLoss(torch.nn.Module):
    """EM-KD loss. Holds hyperparameters only; call as ``loss_fn(student, teacher)``.

    Args:
        alpha: weight of SUP; ``1 - alpha`` weighs RLD (paper: 0.5).
        beta: weight of VSD (paper: 0.25).
        gamma: weight of VLAD (paper: 25).
        temperature: softmax temperature of VSD and RLD (``p = softmax(z / T)``, no ``T**2`` factor).
        matching: ``hungarian_logits`` (paper) | ``hungarian_hidden`` | ``avgpool`` | ``identity`` (Table 3b):
            :data:`emkd.matching.pairing.MATCHINGS`.
        assignment: the solver of the Hungarian matchings (Eq. 1), ``auto`` (SciPy) | ``scipy`` | ``auction``
            (batched, on the costs' device): :func:`emkd.matching.hungarian_match`'s ``backend``.
        vsd_target: ``logits`` (paper, reverse KL) | ``hidden`` (Table 3c: ``MSE(P h_s, h_t)`` per pair, with ``P``
            passed as ``projector=`` when the call needs one).
        vocab: ``strict`` raises when the heads' vocabulary sizes differ; ``crop`` cuts both to the smaller.
        implementation: ``fused`` (default) computes every logit term over vocabulary chunks from hidden states and
            heads (:mod:`emkd.losses.fused`): no ``[N, V]`` logit matrix exists, and SUP, RLD and VSD share one
            pass over the student head. ``naive`` builds the logits as EM-KD's Listing 1 does (the reference).
        chunk_size: vocabulary rows per chunk of the fused path; ``None`` (default): by the inputs' device,
            :func:`emkd.chunking.default_chunk_size` (1024 on the CPU, 8192 on CUDA).
        vision_reduction: what the sum over samples of ``VSD_b`` and ``VLAD_b`` is divided by: ``batch`` (default)
            the number of samples ``B``, text-only samples included (Listing 1's ``L_distill / batch_size``; a
            sample without pairs adds 0 and still counts); ``image_samples`` the number of samples with at least one
            matched pair (a mean over those samples).

    Reductions: SUP and RLD are means over all response positions of the batch; VSD and VLAD as
    ``vision_reduction`` says, of per-sample means over pairs (VLAD: over pairs and text tokens; a sample without
    text tokens adds 0). Each term is an exact zero, never NaN, when nothing contributes to it.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.25,
        gamma: float = 25.0,
        temperature: float = 1.0,
        matching: str = "hungarian_logits",
        vsd_target: str = "logits",
        vocab: str = "strict",
        implementation: str = "fused",
        chunk_size: int | None = None,
        vision_reduction: str = "batch",
        assignment: str = "auto",
    ) -> None:
        super().__init__()
        check_common_options(vocab=vocab, implementation=implementation, temperature=temperature, chunk_size=chunk_size)
        check_choice("vision_reduction", vision_reduction, VISION_REDUCTIONS)
        check_choice("matching", matching, MATCHINGS)
        check_assignment(assignment)
        check_choice("vsd_target", vsd_target, VSD_TARGETS)
        self.alpha, self.beta, self.gamma, self.temperature = alpha, beta, gamma, temperature
        self.matching, self.assignment, self.vsd_target, self.vocab = matching, assignment, vsd_target, vocab
        self.implementation, self.chunk_size = implementation, chunk_size
        self.vision_reduction = vision_reduction

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, "
            f"matching={self.matching!r}, assignment={self.assignment!r}, vsd_target={self.vsd_target!r}, "
            f"vocab={self.vocab!r}, implementation={self.implementation!r}, vision_reduction={self.vision_reduction!r}"
        )

    def forward(
        self, student: DistillInputs, teacher: DistillInputs, projector: torch.nn.Module | None = None
    ) -> EMKDOutput:
        student, teacher = check_pair(student, teacher, self.vocab)
        anchor = student.hidden

        # Matching and VLAD, per sample.
        paired = pair_batch(student, teacher, self.matching, self.implementation, self.chunk_size, self.assignment,
                            keep_logits=self.implementation == "fused" and self.vsd_target == "logits")
        matches = pair_indices(paired, anchor.device)
        pairs_by_sample = [pairs for pairs in paired if pairs is not None]
        vlad_inputs = []
        for b, pairs in enumerate(paired):
            text_s, text_t = student.text_tokens(b), teacher.text_tokens(b)
            if pairs is not None and text_s.shape[0] > 0:
                vlad_inputs.append((pairs, text_s, text_t))
        vlad = vlad_terms(*map(list, zip(*vlad_inputs))).sum() if vlad_inputs else zero_like_graph(anchor)

        if self.implementation == "fused":
            sup, rld, vsd = self._fused_logit_terms(student, teacher, pairs_by_sample, projector)
        else:
            zs, zt, targets = response_logits(student, teacher)  # (R, V), (R, V), (R,)
            sup = sum_or_zero(F.cross_entropy(zs, targets, reduction="none"), anchor)
            rld = sum_or_zero(reverse_kl(zs, zt, self.temperature), anchor)
            vsd_terms = [self._vsd(pairs, student, teacher, projector) for pairs in pairs_by_sample]
            vsd = torch.stack(vsd_terms).sum() if vsd_terms else zero_like_graph(anchor)

        per_sample = "samples" if self.vision_reduction == "batch" else "image_samples"
        terms = LossTerms(
            {
                "sup": Term(self.alpha, sup, "response_tokens"),
                "rld": Term(1.0 - self.alpha, rld, "response_tokens"),
                "vsd": Term(self.beta, vsd, per_sample),
                "vlad": Term(self.gamma, vlad, per_sample),
            },
            inputs_counts(student, teacher),
        )
        values = terms.values()
        return EMKDOutput(loss=combine(terms, values), **values, matches=matches, terms=terms)

    def _fused_logit_terms(
        self,
        student: DistillInputs,
        teacher: DistillInputs,
        pairs_by_sample: list[VisionPairs],
        projector: torch.nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sums of SUP and RLD over response positions and of ``VSD_b`` over samples, from one chunked pass over
        the heads (for logit VSD): the response rows and every sample's matched vision rows are stacked, CE is read
        on the former and reverse KL on all."""
        anchor = student.hidden
        vision = pairs_by_sample if self.vsd_target == "logits" else []
        response, vision_rows = response_and_row_divergences(
            student, teacher, [p.student_hidden for p in vision], [p.teacher_hidden for p in vision], "reverse",
            self.temperature, self.chunk_size, [p.logit_values for p in vision],
        )
        sup = sum_or_zero(response["ce"], anchor)
        rld = sum_or_zero(response["reverse"], anchor)
        if self.vsd_target == "hidden":
            terms = [self._vsd(pairs, student, teacher, projector) for pairs in pairs_by_sample]
            vsd = torch.stack(terms).sum() if terms else zero_like_graph(anchor)
        else:
            vsd = sum_of_means(vision_rows, [p.size for p in vision]) if vision else zero_like_graph(anchor)
        return sup, rld, vsd

    def _vsd(
        self,
        pairs: VisionPairs,
        student: DistillInputs,
        teacher: DistillInputs,
        projector: torch.nn.Module | None,
    ) -> torch.Tensor:
        """VSD of one sample on the naive path (and on either path for ``vsd_target="hidden"``)."""
        if self.vsd_target == "hidden":
            hs = pairs.student_hidden.float()  # (M, Ds)
            ht = pairs.teacher_hidden.float()  # (M, Dt)
            if projector is not None:
                hs = projector(hs)
            elif hs.shape[1] != ht.shape[1]:
                raise ValueError(
                    f"vsd_target='hidden' with Ds={hs.shape[1]} != Dt={ht.shape[1]} needs projector= (a Ds -> Dt map)"
                )
            if hs.shape != ht.shape:
                raise ValueError(f"projected student {tuple(hs.shape)} != teacher {tuple(ht.shape)}")
            return F.mse_loss(hs, ht)
        zs, zt = paired_logits(pairs, student, teacher)  # (M, V), (M, V)
        return reverse_kl(zs, zt, self.temperature).mean()  # (M,) -> scalar

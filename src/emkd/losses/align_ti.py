"""The model-free pieces of Align-TI (Align-TI Eq. 3-8, Algorithm 1, Fig. 9; SPEC §6).

* :func:`instruction_vision_attention` reduces one layer's attention to ``a_l(x)``: attention from the instruction
  tokens to the vision tokens, averaged over heads and instruction tokens.
* :func:`instruction_relevance_score` scores layers (Eq. 3): ``IRS(l) = 1 - mean cos(a_l(x1), a_l(x2))`` over pairs of
  distinct calibration inputs; the layer with the highest score feeds IVA.
* :func:`iva_loss` is Instruction-aware Vision Alignment (Eq. 4): per sample
  ``sum_k w_k KL(p_t || p_s)`` on vision logits, weighted by the teacher's attention ``w``; :func:`iva_total` is its
  sum over the batch, before the division :data:`NORMALISATIONS` chooses.
* :func:`ribbon_attention_mask` builds the mask and position ids that let one pass score every TPA candidate.
"""

from __future__ import annotations

import functools
import itertools
import random

import torch
import torch.nn.functional as F

from emkd.chunking import check_implementation
from emkd.inputs import DistillInputs, check_pair, joined_rows, zero_like_graph
from emkd.losses.divergence import forward_kl
from emkd.losses.head import head_divergences
from emkd.matching.pairing import IVA_MATCHINGS, pair_batch, pair_indices, paired_logits, resolve_matching

#: Align-TI's normalisation of KD, TPA and IVA (SPEC §6): ``token_sum`` (the paper: each sums over its tokens, then
#: the mean over samples) or ``token_mean`` (each is a mean over its tokens)
NORMALISATIONS = ("token_sum", "token_mean")


def check_normalisation(normalisation: str) -> None:
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def instruction_vision_attention(
    attention: torch.Tensor, vision_mask: torch.Tensor, instruction_mask: torch.Tensor
) -> list[torch.Tensor]:
    """``a_l(x)`` of each sample from one layer's attention weights.

    Args:
        attention: ``[B, H, L, L]`` (or head-averaged ``[B, L, L]``) attention probabilities, query by key.
        vision_mask: ``[B, L]`` bool, image-token positions (keys).
        instruction_mask: ``[B, L]`` bool, user-turn text positions (queries).

    Returns:
        One ``[Nv_b]`` float32 tensor per sample: mean over heads and over instruction queries of the attention each
        vision token receives. A sample without instruction tokens gets an empty tensor.
    """
    if attention.dim() == 4:
        attention = attention.float().mean(1)  # (B, L, L)
    if attention.dim() != 3:
        raise ValueError(f"attention must be [B, H, L, L] or [B, L, L], got shape {tuple(attention.shape)}")
    out = []
    for b in range(attention.shape[0]):
        rows = attention[b][instruction_mask[b].bool()]  # (Ni, L)
        if rows.shape[0] == 0:
            out.append(attention.new_zeros(0, dtype=torch.float32))
            continue
        out.append(rows[:, vision_mask[b].bool()].float().mean(0))  # (Nv,)
    return out


def instruction_relevance_score(
    layer_vectors: torch.Tensor, num_pairs: int = 1024, seed: int = 0
) -> torch.Tensor:
    """IRS of every layer (Align-TI Eq. 3).

    Args:
        layer_vectors: ``[num_layers, N, Nv]``, ``a_l(x_n)`` for ``N >= 2`` calibration inputs with equal ``Nv``.
        num_pairs: pairs of distinct inputs to average over; all ``N (N - 1) / 2`` pairs when there are no more
            than that, else this many distinct pairs drawn with ``seed``.

    Returns:
        ``[num_layers]`` float32 scores; ``argmax`` is the layer IVA uses.
    """
    if layer_vectors.dim() != 3 or layer_vectors.shape[1] < 2:
        raise ValueError(
            f"layer_vectors must be [num_layers, N >= 2, Nv], got shape {tuple(layer_vectors.shape)}"
        )
    n = layer_vectors.shape[1]
    all_pairs = list(itertools.combinations(range(n), 2))
    if len(all_pairs) > num_pairs:
        all_pairs = random.Random(seed).sample(all_pairs, num_pairs)
    i = torch.tensor([p[0] for p in all_pairs])
    j = torch.tensor([p[1] for p in all_pairs])
    v = layer_vectors.float()
    cos = F.cosine_similarity(v[:, i], v[:, j], dim=-1, eps=1e-12)  # (num_layers, num_pairs)
    return 1.0 - cos.mean(1)


def iva_loss(
    student: DistillInputs,
    teacher: DistillInputs,
    weights: list[torch.Tensor],
    matching: str = "auto",
    temperature: float = 1.0,
    vocab: str = "strict",
    implementation: str = "fused",
    chunk_size: int | None = None,
    normalisation: str = "token_sum",
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Instruction-aware Vision Alignment (Align-TI Eq. 4) -> ``(iva, matches)``.

    Per sample ``IVA_b = sum_m w[t_m] * KL(p_t[t_m] || p_s[s_m])`` over vision pairs (a sum, not a mean, as in Eq. 4),
    where ``w`` (``weights[b]``, ``[Nt_b]``) weighs the teacher's vision tokens. Balanced tokens pair ``i <-> i``;
    unbalanced ones are matched as in EM-KD and each pair takes the weight of its teacher token.

    ``normalisation``: ``token_sum`` (default, the paper) gives ``iva = sum_b IVA_b / B``, the mean over all ``B``
    samples (a sample without vision tokens adds 0 and counts); ``token_mean`` gives ``sum_b IVA_b / sum_b M_b``,
    the mean over the batch's vision pairs of ``w * KL``. ``implementation``: ``fused`` (default; matching cost and
    KL over vocabulary chunks) or ``naive`` (full ``[M, V]`` logits, the reference).
    """
    check_normalisation(normalisation)
    total, matches = iva_total(student, teacher, weights, matching, temperature, vocab, implementation, chunk_size)
    n = student.batch_size if normalisation == "token_sum" else sum(int(s.numel()) for s, _ in matches)
    return (total / n if n > 0 else total), matches


def iva_total(
    student: DistillInputs,
    teacher: DistillInputs,
    weights: list[torch.Tensor],
    matching: str = "auto",
    temperature: float = 1.0,
    vocab: str = "strict",
    implementation: str = "fused",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``(sum_b IVA_b, matches)``: :func:`iva_loss` before its division (an exact zero when no sample has a pair)."""
    check_implementation(implementation)
    if matching not in IVA_MATCHINGS:
        raise ValueError(f"IVA matching must be one of {IVA_MATCHINGS}, got {matching!r}")
    student, teacher = check_pair(student, teacher, vocab)
    if len(weights) != student.batch_size:
        raise ValueError(f"iva_loss needs one weight vector per sample: B={student.batch_size}, got {len(weights)}")
    n_s, n_t = student.vision_mask.sum(1), teacher.vision_mask.sum(1)
    terms = []
    for b in range(student.batch_size):
        if weights[b].shape != (int(n_t[b]),):
            raise ValueError(
                f"sample {b}: IVA weights must be [Nt={int(n_t[b])}] (one per teacher vision token), got "
                f"{tuple(weights[b].shape)}"
            )
    matchings = [resolve_matching(matching, int(n_s[b]), int(n_t[b])) for b in range(student.batch_size)]
    paired = pair_batch(student, teacher, matchings, implementation, chunk_size)
    kept = [(b, pairs) for b, pairs in enumerate(paired) if pairs is not None]
    matches = pair_indices(paired, student.hidden.device)
    if implementation == "fused" and kept:  # every sample's pairs in one chunked pass over the heads
        rows = head_divergences(
            student, joined_rows([p.student_hidden for _, p in kept]), teacher,
            joined_rows([p.teacher_hidden for _, p in kept]),
            ("forward",), temperature, chunk_size=chunk_size,
        )["forward"]  # (sum M,)
        kls = rows.split([p.size for _, p in kept])
    else:
        kls = [forward_kl(*paired_logits(p, student, teacher), temperature) for _, p in kept]  # (M,) each
    for (b, pairs), kl in zip(kept, kls):
        w = weights[b].detach().float().to(student.hidden.device)[pairs.idx_t]  # (M,)
        terms.append((w * kl).sum())
    total = torch.stack(terms).sum() if terms else zero_like_graph(student.hidden)
    return total, matches


def ribbon_attention_mask(
    prefix_len: int, response_len: int, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ribbon mask of Align-TI's parallel TPA (Fig. 9; SPEC §6).

    Layout after the ``P`` prefix tokens: ``[c_1^(1..d), y_1, c_2^(1..d), y_2, ..., c_L^(1..d), y_L]``.

    * prefix token ``q`` sees prefix tokens ``0..q`` (causal);
    * ground truth ``y_k`` sees the prefix and ``y_1..y_k``, never a candidate;
    * candidate ``c_k^(u)`` sees the prefix, ``y_1..y_{k-1}`` and itself.

    Position ids: prefix ``0..P-1``; ``y_k`` and every ``c_k^(u)`` get ``P + k - 1``.

    Returns:
        ``allowed`` ``[T, T]`` bool (query by key) and ``position_ids`` ``[T]`` long, ``T = P + L (d + 1)``.
    """
    if prefix_len < 0 or response_len < 0 or num_candidates < 0:
        raise ValueError(
            f"ribbon_attention_mask needs non-negative sizes, got prefix_len={prefix_len}, "
            f"response_len={response_len}, num_candidates={num_candidates}"
        )
    allowed, position_ids = _ribbon(prefix_len, response_len, num_candidates)
    return allowed.clone(), position_ids.clone()


@functools.lru_cache(maxsize=1024)
def _ribbon(P: int, L: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ribbon_attention_mask`, built without Python loops and cached by size (a batch repeats sizes)."""
    T = P + L * (d + 1)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    allowed[:P, :P] = torch.tril(torch.ones(P, P, dtype=torch.bool))
    allowed[P:, :P] = True
    k = torch.arange(L)
    gt = P + k * (d + 1) + d  # (L,) index of y_k
    cand = P + k[:, None] * (d + 1) + torch.arange(d)[None, :]  # (L, d) index of c_k^(u)
    earlier = k[None, :] < k[:, None]  # (L, L): [k, j] is j < k
    allowed[gt[:, None], gt[None, :]] = earlier | torch.eye(L, dtype=torch.bool)  # y_k sees y_1..y_k
    allowed[cand.reshape(-1)[:, None], gt[None, :]] = earlier.repeat_interleave(d, dim=0)  # c_k^(u) sees y_<k
    allowed[cand.reshape(-1), cand.reshape(-1)] = True  # and itself
    position_ids = torch.cat([torch.arange(P), P + k.repeat_interleave(d + 1)])
    return allowed, position_ids


def additive_attention_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[T, T]`` bool -> ``[1, 1, T, T]`` additive float mask (0 where allowed, the dtype's minimum elsewhere), the
    form every Hugging Face attention implementation reads the same way."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]

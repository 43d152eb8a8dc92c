"""Naive float64 references for every loss, written from SPEC §1-§6 and nothing else.

Nothing here imports emkd: a reference reads the fields of a ``DistillInputs`` (``hidden``, ``head_weight``,
``head_bias``, ``vision_mask``, ``attention_mask``, ``labels``) and recomputes the loss the slow, obvious way:

* the full ``[B, L, V]`` logits of both sides are materialised in float64;
* vision / text / response positions are found by Python loops over the sequence;
* every divergence is one row at a time, every pair, cosine, Gram entry and smooth-L1 term one at a time;
* Hungarian matching is SciPy's ``linear_sum_assignment`` on a float64 Manhattan cost filled entry by entry;
* ``avgpool`` pools the **logits** for VSD/VIS (the implementation pools hidden states and decodes them; the two agree
  because pooling is an average and the head is affine) and the hidden states for VLAD.

The teacher is detached (SPEC: gradients reach the student only), so autograd through a reference gives the gradient
the implementation must reproduce. Each loss function returns a dict of scalar float64 tensors plus ``matches``
(per sample ``(idx_s, idx_t)`` as Python lists; empty lists for a sample without a pair).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = -100


# ---- per-row building blocks ------------------------------------------------------------------------------------
def log_softmax(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(z / T)`` of one ``[V]`` row, float64."""
    s = z.double() / temperature
    return s - torch.logsumexp(s, dim=0)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` for one pair of ``[V]`` logit rows."""
    log_p = log_softmax(p_logits, temperature)
    log_q = log_softmax(q_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum()


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """``m = beta p_t + (1 - beta) p_s``; ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, in probability space."""
    p_s = log_softmax(student_logits, temperature).exp()
    p_t = log_softmax(teacher_logits, temperature).exp()
    m = beta * p_t + (1.0 - beta) * p_s
    kl_t = (p_t * (p_t.log() - m.log())).sum()
    kl_s = (p_s * (p_s.log() - m.log())).sum()
    return beta * kl_t + (1.0 - beta) * kl_s


def cross_entropy(z: torch.Tensor, target: int) -> torch.Tensor:
    """``-log softmax(z)[target]`` for one ``[V]`` row (no temperature)."""
    return -log_softmax(z, 1.0)[target]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))


def smooth_l1(d: torch.Tensor) -> torch.Tensor:
    """Smooth L1 with ``beta = 1``: ``0.5 d^2`` when ``|d| < 1``, else ``|d| - 0.5``."""
    return 0.5 * d * d if float(d.detach().abs()) < 1.0 else d.abs() - 0.5


def mean(values: list[torch.Tensor]) -> torch.Tensor:
    if not values:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(values).sum() / len(values)


def sum_over(values: list[torch.Tensor], count: int) -> torch.Tensor:
    """``sum(values) / count``; zero when nothing is summed or counted."""
    if not values or count == 0:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(values).sum() / count


# ---- positions and logits ---------------------------------------------------------------------------------------
def positions(side, b: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Sample ``b``'s vision positions, text positions, response positions and response targets, in order."""
    L = side.hidden.shape[1]
    vision_mask = [bool(x) for x in side.vision_mask[b].tolist()]
    attention_mask = [bool(x) for x in side.attention_mask[b].tolist()]
    labels = [int(x) for x in side.labels[b].tolist()]
    vision = [i for i in range(L) if vision_mask[i]]
    text = [i for i in range(L) if attention_mask[i] and not vision_mask[i]]
    response = [i for i in range(L - 1) if labels[i + 1] != IGNORE_INDEX]
    targets = [labels[i + 1] for i in response]
    return vision, text, response, targets


def common_vocab(student, teacher, vocab: str) -> int:
    v_s, v_t = student.head_weight.shape[0], teacher.head_weight.shape[0]
    if v_s != v_t:
        assert vocab == "crop", "the reference only handles different V with vocab='crop'"
    return min(v_s, v_t)


def full_logits(side, vocab_size: int, detach: bool) -> torch.Tensor:
    """``[B, L, V]`` float64 logits of every position (padding included), head cut to ``vocab_size`` rows."""
    hidden = side.hidden.double()
    weight = side.head_weight.double()[:vocab_size]
    bias = None if side.head_bias is None else side.head_bias.double()[:vocab_size]
    if detach:
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    z = torch.einsum("bld,vd->blv", hidden, weight)
    return z if bias is None else z + bias


def hidden64(side, detach: bool) -> torch.Tensor:
    h = side.hidden.double()
    return h.detach() if detach else h


def response_rows(student, teacher, zs_full, zt_full) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """``(student row [V], teacher row [V], target)`` of every response position of the batch, sample-major."""
    rows = []
    for b in range(student.hidden.shape[0]):
        _, _, resp_s, y_s = positions(student, b)
        _, _, resp_t, y_t = positions(teacher, b)
        assert y_s == y_t, f"sample {b}: the reference needs equal response targets on both sides"
        for i_s, i_t, y in zip(resp_s, resp_t, y_s):
            rows.append((zs_full[b, i_s], zt_full[b, i_t], y))
    return rows


# ---- matching -----------------------------------------------------------------------------------------------------
def manhattan(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``C[i, j] = sum_f |a[i, f] - b[j, f]|`` in float64, one entry at a time, without gradient."""
    a, b = a.detach().double(), b.detach().double()
    cost = np.zeros((a.shape[0], b.shape[0]), dtype=np.float64)
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            cost[i, j] = float((a[i] - b[j]).abs().sum())
    return cost


def assignment(cost: np.ndarray) -> tuple[list[int], list[int]]:
    """Minimum-cost one-to-one assignment, sorted by the student (row) index."""
    rows, cols = linear_sum_assignment(cost)
    order = np.argsort(rows)
    return [int(r) for r in rows[order]], [int(c) for c in cols[order]]


def pool_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[N, F] -> [length, F]``: adaptive average pooling over the token axis."""
    if x.shape[0] == length:
        return x
    return F.adaptive_avg_pool1d(x.T.unsqueeze(0), length).squeeze(0).T


def resolve(matching: str, ns: int, nt: int) -> str:
    if matching != "auto":
        return matching
    return "identity" if ns == nt else "hungarian_logits"


@dataclass
class Pairs:
    """``M`` matched vision tokens of one sample: logits ``[M, V]`` and hidden states ``[M, D]`` in pair order."""

    idx_s: list[int]
    idx_t: list[int]
    zs: torch.Tensor
    zt: torch.Tensor
    hs: torch.Tensor
    ht: torch.Tensor


def pair_sample(student, teacher, zs_full, zt_full, b: int, matching: str) -> Pairs | None:
    vis_s, _, _, _ = positions(student, b)
    vis_t, _, _, _ = positions(teacher, b)
    ns, nt = len(vis_s), len(vis_t)
    if ns == 0 or nt == 0:
        return None
    matching = resolve(matching, ns, nt)
    zs = zs_full[b, vis_s]  # (Ns, V)
    zt = zt_full[b, vis_t]  # (Nt, V)
    hs = hidden64(student, detach=False)[b, vis_s]  # (Ns, Ds)
    ht = hidden64(teacher, detach=True)[b, vis_t]  # (Nt, Dt)
    if matching == "identity":
        assert ns == nt
        idx_s, idx_t = list(range(ns)), list(range(nt))
    elif matching == "avgpool":
        m = min(ns, nt)
        zs, hs = pool_tokens(zs, m), pool_tokens(hs, m)
        zt, ht = pool_tokens(zt, m), pool_tokens(ht, m)
        idx_s, idx_t = list(range(m)), list(range(m))
    elif matching == "hungarian_logits":
        idx_s, idx_t = assignment(manhattan(zs, zt))
    elif matching == "hungarian_hidden":
        idx_s, idx_t = assignment(manhattan(hs, ht))
    else:
        raise AssertionError(matching)
    return Pairs(idx_s, idx_t, zs[idx_s], zt[idx_t], hs[idx_s], ht[idx_t])


# ---- EM-KD (SPEC §3) --------------------------------------------------------------------------------------------
def vlad_sample(hs_pairs: torch.Tensor, ht_pairs: torch.Tensor, text_s: torch.Tensor, text_t: torch.Tensor):
    """``mean_{m,k} SmoothL1(cos(hs[m], text_s[k]) - cos(ht[m], text_t[k]))``, one term at a time."""
    terms = []
    for m in range(hs_pairs.shape[0]):
        for k in range(text_s.shape[0]):
            a_s = cosine(hs_pairs[m], text_s[k])
            a_t = cosine(ht_pairs[m], text_t[k])
            terms.append(smooth_l1(a_s - a_t))
    return mean(terms)


def ref_emkd(
    student,
    teacher,
    *,
    alpha: float = 0.5,
    beta: float = 0.25,
    gamma: float = 25.0,
    temperature: float = 1.0,
    matching: str = "hungarian_logits",
    vsd_target: str = "logits",
    vocab: str = "strict",
    projector: torch.nn.Linear | None = None,
    vision_reduction: str = "batch",
) -> dict:
    """SPEC §3. ``vision_reduction="batch"``: VSD and VLAD sum their per-sample values over samples and divide by
    ``B`` (text-only samples included); ``"image_samples"``: by the number of samples with a pair."""
    v = common_vocab(student, teacher, vocab)
    zs_full = full_logits(student, v, detach=False)
    zt_full = full_logits(teacher, v, detach=True)
    rows = response_rows(student, teacher, zs_full, zt_full)
    sup = mean([cross_entropy(zs, y) for zs, _, y in rows])
    rld = mean([kl(zs, zt, temperature) for zs, zt, _ in rows])  # reverse: KL(student || teacher)

    vsd_terms, vlad_terms, matches = [], [], []
    for b in range(student.hidden.shape[0]):
        pairs = pair_sample(student, teacher, zs_full, zt_full, b, matching)
        if pairs is None:
            matches.append(([], []))
            continue
        matches.append((pairs.idx_s, pairs.idx_t))
        M = len(pairs.idx_s)
        per_pair = []
        for m in range(M):
            if vsd_target == "logits":
                per_pair.append(kl(pairs.zs[m], pairs.zt[m], temperature))
            else:
                h = pairs.hs[m]
                if projector is not None:
                    h = projector.weight.double() @ h
                    if projector.bias is not None:
                        h = h + projector.bias.double()
                per_pair.append(((h - pairs.ht[m]) ** 2).mean())
        vsd_terms.append(mean(per_pair))
        _, text_s_pos, _, _ = positions(student, b)
        _, text_t_pos, _, _ = positions(teacher, b)
        text_s = hidden64(student, detach=False)[b, text_s_pos]  # (K, Ds)
        text_t = hidden64(teacher, detach=True)[b, text_t_pos]  # (K, Dt)
        if len(text_s_pos) > 0:
            vlad_terms.append(vlad_sample(pairs.hs, pairs.ht, text_s, text_t))
    B = student.hidden.shape[0]
    per = B if vision_reduction == "batch" else len(vsd_terms)  # vsd_terms: one per sample with a pair
    vsd, vlad = sum_over(vsd_terms, per), sum_over(vlad_terms, per)
    loss = alpha * sup + (1.0 - alpha) * rld + beta * vsd + gamma * vlad
    return dict(loss=loss, sup=sup, rld=rld, vsd=vsd, vlad=vlad, matches=matches)


# ---- LLaVA-KD (SPEC §4) -----------------------------------------------------------------------------------------
def relation_sample(zs: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """``1 - cos(vec(Z_s Z_s^T), vec(Z_t Z_t^T))``, Gram entries one at a time."""
    M = zs.shape[0]
    gram_s = [zs[i] @ zs[j] for i in range(M) for j in range(M)]
    gram_t = [zt[i] @ zt[j] for i in range(M) for j in range(M)]
    return 1.0 - cosine(torch.stack(gram_s), torch.stack(gram_t))


def ref_llava_kd(
    student,
    teacher,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 0.5,
    temperature: float = 1.0,
    matching: str = "auto",
    vocab: str = "strict",
) -> dict:
    v = common_vocab(student, teacher, vocab)
    zs_full = full_logits(student, v, detach=False)
    zt_full = full_logits(teacher, v, detach=True)
    rows = response_rows(student, teacher, zs_full, zt_full)
    ce = mean([cross_entropy(zs, y) for zs, _, y in rows])
    res = mean([kl(zt, zs, temperature) for zs, zt, _ in rows])  # forward: KL(teacher || student)

    vis_rows, rel_terms, matches = [], [], []
    for b in range(student.hidden.shape[0]):
        pairs = pair_sample(student, teacher, zs_full, zt_full, b, matching)
        if pairs is None:
            matches.append(([], []))
            continue
        matches.append((pairs.idx_s, pairs.idx_t))
        for m in range(len(pairs.idx_s)):
            vis_rows.append(kl(pairs.zt[m], pairs.zs[m], temperature))
        rel_terms.append(relation_sample(pairs.zs, pairs.zt))
    vis, rel = mean(vis_rows), mean(rel_terms)  # VIS over all pairs of the batch; REL over samples
    loss = ce + alpha * res + beta * vis + gamma * rel
    return dict(loss=loss, ce=ce, res=res, vis=vis, rel=rel, matches=matches)


# ---- response-only KD (SPEC §5) ---------------------------------------------------------------------------------
def ref_kd(
    student,
    teacher,
    *,
    divergence: str = "forward",
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    vocab: str = "strict",
) -> dict:
    v = common_vocab(student, teacher, vocab)
    zs_full = full_logits(student, v, detach=False)
    zt_full = full_logits(teacher, v, detach=True)
    rows = response_rows(student, teacher, zs_full, zt_full)
    ce = mean([cross_entropy(zs, y) for zs, _, y in rows])
    if divergence == "forward":
        kd = mean([kl(zt, zs, temperature) for zs, zt, _ in rows])
    elif divergence == "reverse":
        kd = mean([kl(zs, zt, temperature) for zs, zt, _ in rows])
    else:
        kd = mean([jsd(zs, zt, temperature, jsd_beta) for zs, zt, _ in rows])
    return dict(loss=ce_weight * ce + kd_weight * kd, ce=ce, kd=kd)


# ---- Align-TI (SPEC §6) -----------------------------------------------------------------------------------------
def ref_iva(
    student, teacher, weights, *, matching: str = "auto", temperature: float = 1.0, vocab: str = "strict",
    normalisation: str = "token_sum",
) -> tuple[torch.Tensor, list]:
    """``IVA_b = sum_m w[t_m] KL(p_t[t_m] || p_s[s_m])`` on vision logits; ``token_sum``: the sum over samples
    divided by ``B`` (every sample); ``token_mean``: divided by the number of vision pairs of the batch."""
    v = common_vocab(student, teacher, vocab)
    zs_full = full_logits(student, v, detach=False)
    zt_full = full_logits(teacher, v, detach=True)
    terms, matches = [], []
    for b in range(student.hidden.shape[0]):
        pairs = pair_sample(student, teacher, zs_full, zt_full, b, matching)
        if pairs is None:
            matches.append(([], []))
            continue
        matches.append((pairs.idx_s, pairs.idx_t))
        w = weights[b].detach().double()
        total = torch.zeros((), dtype=torch.float64)
        for m, t in enumerate(pairs.idx_t):
            total = total + w[t] * kl(pairs.zt[m], pairs.zs[m], temperature)
        terms.append(total)
    count = student.hidden.shape[0] if normalisation == "token_sum" else sum(len(s) for s, _ in matches)
    return sum_over(terms, count), matches


def ref_instruction_vision_attention(attention: torch.Tensor, vision_mask, instruction_mask) -> list[torch.Tensor]:
    """``a(x)[k]`` = mean over heads and instruction queries of the attention vision key ``k`` receives."""
    if attention.dim() == 3:
        attention = attention.unsqueeze(1)
    B, H, L, _ = attention.shape
    out = []
    for b in range(B):
        queries = [q for q in range(L) if bool(instruction_mask[b, q])]
        keys = [k for k in range(L) if bool(vision_mask[b, k])]
        if not queries:  # no instruction: nothing to average
            out.append(torch.zeros(0, dtype=torch.float64))
            continue
        vec = []
        for k in keys:
            total = 0.0
            for h in range(H):
                for q in queries:
                    total += float(attention[b, h, q, k])
            vec.append(total / (H * len(queries)))
        out.append(torch.tensor(vec, dtype=torch.float64))
    return out


def ref_irs(layer_vectors: torch.Tensor) -> torch.Tensor:
    """``IRS(l) = 1 - mean over all pairs of distinct inputs of cos(a_l(x1), a_l(x2))``."""
    v = layer_vectors.double()
    scores = []
    for layer in range(v.shape[0]):
        pairs = list(itertools.combinations(range(v.shape[1]), 2))
        cos = [float(cosine(v[layer, i], v[layer, j])) for i, j in pairs]
        scores.append(1.0 - sum(cos) / len(cos))
    return torch.tensor(scores, dtype=torch.float64)

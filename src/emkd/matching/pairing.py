"""Pair a student's vision tokens with a teacher's, per sample (SPEC §2, EM-KD Table 3b).

The student of an efficient MLLM has fewer vision tokens than its teacher (``Ns < Nt``), so token ``i`` of one side
has no fixed partner on the other. Each strategy below returns ``M`` pairs of hidden states, one row per pair, which
every vision loss then consumes:

* ``hungarian_logits`` (EM-KD): minimum-cost assignment on the Manhattan distance between raw vision logits.
* ``hungarian_hidden``: the same on hidden states (needs ``Ds == Dt``).
* ``avgpool``: 1D adaptive average pooling of the longer side down to the shorter length, paired in order. Pooling
  is an average and the head is affine, so the logits of pooled hidden states equal pooled logits: VSD on pooled
  logits and VLAD on pooled hidden states are both served by pooling the hidden states.
* ``identity``: ``i <-> i`` (LLaVA-KD with balanced tokens; needs ``Ns == Nt``).
* ``auto`` (LLaVA-KD, Align-TI's IVA): ``identity`` for a sample whose counts are equal, else ``hungarian_logits``
  (:func:`resolve_matching`, per sample).

The two Hungarian strategies solve their assignment with the backend ``assignment=`` names, one of
:data:`emkd.matching.hungarian.BACKENDS`: ``auto`` (SciPy), ``scipy`` or ``auction`` (batched, on the costs' device).

With ``implementation="fused"`` the logit cost is accumulated over vocabulary chunks from the hidden states and the
heads (:func:`emkd.matching.cost.head_l1_cost`) and no logits are returned; ``"naive"`` builds both sides' ``[N, V]``
logits, as EM-KD's Listing 1 does, and returns the matched rows of them for the losses to reuse.

Matching never carries gradient; the student rows returned keep theirs.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from emkd.chunking import check_implementation
from emkd.inputs import DistillInputs, joined_rows
from emkd.matching.cost import head_l1_cost, l1_cost
from emkd.matching.hungarian import BACKENDS, hungarian_match, hungarian_match_batch

#: the pairing strategies of SPEC §2 (EM-KD Table 3b); ``EMKDLoss``'s ``matching``
MATCHINGS = ("hungarian_logits", "hungarian_hidden", "avgpool", "identity")
#: ``auto`` and every strategy: LLaVA-KD's ``matching`` (SPEC §4) and what the match quality measures
AUTO_MATCHINGS = ("auto", *MATCHINGS)
#: Align-TI's IVA weighs each pair by the attention of ONE teacher token (SPEC §6): every matching whose pairs are
#: tokens, so not ``avgpool`` (its teacher side is a pooled segment)
IVA_MATCHINGS = tuple(m for m in AUTO_MATCHINGS if m != "avgpool")


@dataclass
class VisionPairs:
    """``M`` matched vision tokens of one sample.

    ``student_hidden`` ``[M, Ds]`` (with gradient) and ``teacher_hidden`` ``[M, Dt]``; ``student_logits`` /
    ``teacher_logits`` ``[M, V]`` when matching already computed them (else ``None``); ``idx_s`` / ``idx_t`` ``[M]``
    the matched token indices (for ``avgpool``, indices into the pooled sequences). ``logit_values``: the fused
    matching's float32 logits of both sides' matched rows, ``([M, V], [M, V])`` without gradient, when
    :func:`pair_batch` was asked to keep them and the vocabulary was one chunk (else ``None``); the fused losses
    read them instead of computing the same products again.
    """

    student_hidden: torch.Tensor
    teacher_hidden: torch.Tensor
    idx_s: torch.Tensor
    idx_t: torch.Tensor
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    logit_values: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.idx_s.numel())


def check_assignment(assignment: str) -> None:
    """Raise ``ValueError`` unless ``assignment`` is one of the backends of :func:`hungarian_match` (``BACKENDS``)."""
    if assignment not in BACKENDS:
        raise ValueError(f"assignment must be one of {BACKENDS}, got {assignment!r}")


def resolve_matching(matching: str, ns: int, nt: int) -> str:
    """The strategy that pairs a sample of ``ns`` student and ``nt`` teacher vision tokens: ``matching`` itself, or
    for ``auto`` ``identity`` when the counts are equal (LLaVA-KD) and ``hungarian_logits`` otherwise (LLaVA-KD*)."""
    if matching != "auto":
        return matching
    return "identity" if ns == nt else "hungarian_logits"


def paired_logits(
    pairs: VisionPairs, student: DistillInputs, teacher: DistillInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student ``[M, V]`` (with gradient) and teacher ``[M, V]`` (without) logits of matched vision tokens, in pair
    order: the rows matching already decoded (``implementation="naive"``), else decoded here from the pairs' hidden
    states through each side's head (``z = h W^T (+ b)``, SPEC §1)."""
    zs = pairs.student_logits if pairs.student_logits is not None else student.logits(pairs.student_hidden)
    if pairs.teacher_logits is not None:
        return zs, pairs.teacher_logits
    with torch.no_grad():
        zt = teacher.logits(pairs.teacher_hidden)
    return zs, zt


def _pool_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """``[N, D] -> [length, D]`` by 1D adaptive average pooling over the token axis."""
    if x.shape[0] == length:
        return x
    return F.adaptive_avg_pool1d(x.T.unsqueeze(0), length).squeeze(0).T


def pair_vision_tokens(
    student: DistillInputs,
    teacher: DistillInputs,
    b: int,
    matching: str,
    implementation: str = "fused",
    chunk_size: int | None = None,
    assignment: str = "auto",
) -> VisionPairs | None:
    """Pair sample ``b``'s vision tokens; ``None`` when either side has none (the sample adds nothing).

    ``matching`` is one of :data:`AUTO_MATCHINGS`; ``assignment`` (``BACKENDS``) solves the Hungarian ones;
    ``chunk_size``: vocabulary rows per chunk of the fused cost (``None``: :func:`emkd.chunking.default_chunk_size`).
    """
    check_implementation(implementation)
    check_assignment(assignment)
    if matching not in AUTO_MATCHINGS:
        raise ValueError(f"matching must be one of {AUTO_MATCHINGS}, got {matching!r}")
    vs = student.vision_tokens(b)  # (Ns, Ds)
    vt = teacher.vision_tokens(b).detach()  # (Nt, Dt)
    ns, nt = vs.shape[0], vt.shape[0]
    if ns == 0 or nt == 0:
        return None
    matching = resolve_matching(matching, ns, nt)
    device = vs.device

    if matching == "identity":
        if ns != nt:
            raise ValueError(
                f"sample {b}: matching='identity' needs equal vision token counts, student has {ns}, teacher {nt}"
            )
        idx = torch.arange(ns, device=device)
        return VisionPairs(vs, vt, idx, idx.clone())

    if matching == "avgpool":
        m = min(ns, nt)
        idx = torch.arange(m, device=device)
        return VisionPairs(_pool_tokens(vs, m), _pool_tokens(vt, m), idx, idx.clone())

    if matching == "hungarian_hidden":
        if vs.shape[1] != vt.shape[1]:
            raise ValueError(
                f"matching='hungarian_hidden' needs equal hidden sizes, student Ds={vs.shape[1]}, teacher "
                f"Dt={vt.shape[1]}; use matching='hungarian_logits'"
            )
        idx_s, idx_t = hungarian_match(l1_cost(vs, vt), assignment)
        return VisionPairs(vs[idx_s], vt[idx_t], idx_s, idx_t)

    # hungarian_logits: decode both sides through their heads and match on raw logits.
    if implementation == "fused":
        cost = head_l1_cost(vs, student.head_weight, student.head_bias, vt, teacher.head_weight, teacher.head_bias,
                            chunk_size)  # (Ns, Nt)
        idx_s, idx_t = hungarian_match(cost, assignment)
        return VisionPairs(vs[idx_s], vt[idx_t], idx_s, idx_t)
    zs = student.logits(vs)  # (Ns, V)
    with torch.no_grad():
        zt = teacher.logits(vt)  # (Nt, V)
    idx_s, idx_t = hungarian_match(l1_cost(zs, zt), assignment)
    return VisionPairs(vs[idx_s], vt[idx_t], idx_s, idx_t, zs[idx_s], zt[idx_t])


def pair_batch(
    student: DistillInputs,
    teacher: DistillInputs,
    matching: str | list[str],
    implementation: str = "fused",
    chunk_size: int | None = None,
    assignment: str = "auto",
    keep_logits: bool = False,
) -> list[VisionPairs | None]:
    """:func:`pair_vision_tokens` for every sample (``matching`` one name, or one per sample; ``auto`` is resolved
    per sample by :func:`resolve_matching`).

    With the fused implementation, the ``hungarian_logits`` costs of samples that have the same token counts are
    computed together: one chunked pass over the heads and one batched L1 cost per group instead of one per sample
    (the same numbers; what a batch of fixed-resolution images needs), and each group's assignments are solved by
    one :func:`~emkd.matching.hungarian.hungarian_match_batch` call (one padded batch for ``assignment="auction"``).
    The matched rows of all those samples are then gathered by one indexing per side; with ``keep_logits``, so
    are their logits when the whole vocabulary was one chunk of the cost (:attr:`VisionPairs.logit_values`).
    """
    check_implementation(implementation)
    check_assignment(assignment)
    per_sample = [matching] * student.batch_size if isinstance(matching, str) else list(matching)
    if len(per_sample) != student.batch_size:
        raise ValueError(f"pair_batch: {len(per_sample)} matchings for a batch of {student.batch_size}")
    out: list[VisionPairs | None] = [None] * student.batch_size
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for b, name in enumerate(per_sample):
        ns, nt = student.vision_tokens(b).shape[0], teacher.vision_tokens(b).shape[0]
        if implementation == "fused" and resolve_matching(name, ns, nt) == "hungarian_logits" and ns > 0 and nt > 0:
            groups[(ns, nt)].append(b)
        else:
            out[b] = pair_vision_tokens(student, teacher, b, name, implementation, chunk_size, assignment)
    if not groups:
        return out
    rows_s, offsets_s = student.token_rows("vision")
    rows_t, offsets_t = teacher.token_rows("vision")
    solved: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (sample, idx_s, idx_t) of every grouped sample
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # per sample of `solved`: its matched rows' logits
    with torch.no_grad():
        for (ns, nt), members in groups.items():
            vs = _group_rows(rows_s, offsets_s, members, ns)  # (G, Ns, Ds)
            vt = _group_rows(rows_t, offsets_t, members, nt)  # (G, Nt, Dt)
            cost = head_l1_cost(vs, student.head_weight, student.head_bias, vt, teacher.head_weight,
                                teacher.head_bias, chunk_size, keep_logits=keep_logits)
            costs, logits = cost if keep_logits else (cost, None)  # (G, Ns, Nt), the logits or None
            found = hungarian_match_batch(list(costs), assignment)
            solved += [(b, *idx) for b, idx in zip(members, found)]
            if logits is not None:
                kept += _matched_logits(*logits, found)
    keep = keep_logits and len(kept) == len(solved)
    # one indexing per side for every grouped sample's matched rows: one node in the backward pass, not one per sample
    sizes = [int(idx_s.numel()) for _, idx_s, _ in solved]
    at_s = _shifted([idx_s for _, idx_s, _ in solved], [offsets_s[b] for b, _, _ in solved], sizes, rows_s.device)
    at_t = _shifted([idx_t for _, _, idx_t in solved], [offsets_t[b] for b, _, _ in solved], sizes, rows_t.device)
    matched = zip(rows_s.index_select(0, at_s).split(sizes), rows_t.detach().index_select(0, at_t).split(sizes))
    for k, ((b, idx_s, idx_t), (hs, ht)) in enumerate(zip(solved, matched)):
        out[b] = VisionPairs(hs, ht, idx_s, idx_t, logit_values=kept[k] if keep else None)
    return out


def _matched_logits(
    zs: torch.Tensor, zt: torch.Tensor, found: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each sample's matched rows of a group's logits ``zs`` ``[G, Ns, V]`` / ``zt`` ``[G, Nt, V]``, by one
    indexing per side: ``G`` pairs ``([M_g, V], [M_g, V])``."""
    g, ns, v = zs.shape
    nt = zt.shape[1]
    sizes = [int(idx_s.numel()) for idx_s, _ in found]
    at_s = _shifted([idx_s for idx_s, _ in found], [k * ns for k in range(g)], sizes, zs.device)
    at_t = _shifted([idx_t for _, idx_t in found], [k * nt for k in range(g)], sizes, zt.device)
    return list(zip(zs.reshape(g * ns, v).index_select(0, at_s).split(sizes),
                    zt.reshape(g * nt, v).index_select(0, at_t).split(sizes)))


def _shifted(indices: list[torch.Tensor], shifts: list[int], sizes: list[int], device: torch.device) -> torch.Tensor:
    """``cat([indices[k] + shifts[k]])`` on ``device``, by one concatenation and one addition for the whole batch."""
    flat = joined_rows(indices).to(device)  # (sum M_k,)
    if min(sizes) == max(sizes):
        return (flat.view(len(sizes), sizes[0]) + torch.tensor(shifts, device=device)[:, None]).view(-1)
    repeats = torch.tensor(sizes, device=device)  # output_size: no wait for the device to learn the length
    return flat + torch.repeat_interleave(torch.tensor(shifts, device=device), repeats, output_size=sum(sizes))


def _group_rows(rows: torch.Tensor, offsets: list[int], members: list[int], n: int) -> torch.Tensor:
    """The ``n`` rows of each sample of ``members`` (starting at ``offsets[b]`` in ``rows``) as ``[G, n, D]``,
    without gradient: a view when the samples' rows lie back to back, else a copy."""
    rows = rows.detach()
    first = offsets[members[0]]
    if all(offsets[b] == first + g * n for g, b in enumerate(members)):
        return rows[first : first + len(members) * n].view(len(members), n, rows.shape[1])
    return torch.stack([rows[offsets[b] : offsets[b] + n] for b in members])


def pair_indices(paired: list[VisionPairs | None], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(idx_s, idx_t)`` of every sample of :func:`pair_batch`'s result; empty tensors for a sample without pairs."""
    empty = torch.empty(0, dtype=torch.long, device=device)
    return [(empty, empty.clone()) if p is None else (p.idx_s, p.idx_t) for p in paired]

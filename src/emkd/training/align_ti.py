"""Align-TI with real models (Align-TI Eq. 4-8, Algorithm 1, Fig. 9; SPEC §6): TPA's candidates, the augmented
"ribbon" batch that scores every candidate in one pass, and the full training step ``CE + IVA + KD + TPA``.

The model-free pieces (``a_l(x)``, IRS, IVA, the ribbon mask) live in :mod:`emkd.losses.align_ti`; this module only
runs models and lines tensors up.

One step (:func:`align_ti_step`) runs

1. the student on the original batch, without gradient, to sample ``d`` candidates ``c_k^(1..d)`` for every
   supervised response token ``y_k`` from the student's distribution at the position that predicts ``y_k``
   (:func:`sample_candidates`);
2. the student (with gradient) and the teacher (without) on the AUGMENTED batch (:func:`build_tpa_batch`)::

       [prefix, c_1^(1..d), y_1, c_2^(1..d), y_2, ..., c_L^(1..d), y_L]

   under the ribbon mask, fed as an additive float 4D mask with the ribbon position ids. The teacher's pass records
   the head-averaged attention of layer ``iva_layer`` (eager attention for that call).

So the teacher runs once and the student twice (sampling without gradient, augmented with gradient), as Table 13 of
the paper counts for the student. The ribbon mask makes every ground-truth token see exactly its original context at
its original position id, and gives every candidate exactly zero weight from a ground-truth query, so the augmented
pass's hidden states and attention rows at ground-truth tokens equal those of a normal pass (tests pin it to float
tolerance). CE, IVA (weights ``a_{l*}(x)`` and vision logits of both models) and KD are therefore read from the
augmented passes at the ground-truth tokens (the "original view", gathered through ``index_map``).

Layout choices (the SPEC is silent on them):

* The prefix of a sample is every token before its FIRST supervised token (``labels[j] != -100``, ``j >= 1``); the
  response is every remaining real token ``y_1 .. y_L``, supervised or not (later user turns of a multi-turn sample
  are part of it). Candidates are drawn only for supervised ``y_k``; the ``d`` candidate slots of an unsupervised
  ``y_k`` hold ``pad_token_id`` so that the layout stays the uniform one of :func:`ribbon_attention_mask`. They are
  computed but never scored.
* ``TPA`` sums ``KL(p_t || p_s)`` at ``c_k^(u)``, i.e. between the two models' ``P(. | x, y_<k, c_k^(u))``, over
  supervised ``k`` and over ``u``; ``KD`` sums ``KL(p_t || p_s)`` over the response positions, the tokens that predict
  supervised ``y_k`` (the last prefix token and ``y_1 .. y_{L-1}``), exactly vanilla KD's positions. The
  ``normalisation`` of :func:`align_ti_step` divides these sums (see there).
* Candidates never include a vision placeholder id of either model (``image_token_id``, ``video_token_id``, ...):
  a sampled image token would change the number of image tokens the models must fill.
* With ``vocab="crop"`` candidates are sampled from the first ``min(V_s, V_t)`` logits, so both models know them.

Models are reached only through the :class:`~emkd.models.base.DistillAdapter` interface: the augmented passes call
``adapter.augmented_forward`` (refused up front by ``adapter.check_augmented_forward``) and IVA's weights come from
``adapter.recording_attention``. The project's student class (as student or teacher) and Hugging Face LLaVA-1.5,
LLaVA-NeXT and LLaVA-OneVision teachers implement them (Qwen2 language models take a custom 4D mask and 1D position
ids, in both "sdpa" and "eager"). Qwen2-VL / Qwen2.5-VL teachers refuse with ``NotImplementedError``: their 3D
M-RoPE position ids are computed from the token layout and cannot take the ribbon position ids; with the option
``tpa=False`` (recipe ``loss: {tpa: false}``) :func:`align_ti_step` trains them on ``CE + IVA + KD`` from one normal
pass of each model, without candidates or the augmented batch. An adapter without
these methods (a teacher read from a cache) refuses with a one-line ``NotImplementedError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from emkd.inputs import IGNORE_INDEX, DistillInputs, check_choice, check_common_options, check_pair, zero_like_graph
from emkd.losses.align_ti import (
    NORMALISATIONS,
    check_normalisation,
    instruction_vision_attention,
    iva_total,
    ribbon_attention_mask,
)
from emkd.losses.divergence import forward_kl
from emkd.losses.head import response_and_row_divergences
from emkd.losses.normalisation import LossTerms, Term, combine, inputs_counts
from emkd.losses.response import sum_or_zero
from emkd.matching.pairing import IVA_MATCHINGS
from emkd.models.base import DistillAdapter

SAMPLINGS = ("nucleus", "greedy")
# config attributes that hold ids of vision placeholders; none of them may be sampled as a candidate
VISION_TOKEN_ATTRS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
)
# rows of logits handled at once by sample_candidates (sorting [R, V] at V = 151,936 is large)
_SAMPLE_CHUNK = 64


# ---- options and result -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TPAOptions:
    """How :func:`tpa_losses` samples and scores TPA's candidates (Align-TI Eq. 5-7, Algorithm 1; SPEC §6); the
    defaults are the paper's. ``ValueError`` names an invalid field.

    Attributes:
        num_candidates: ``d >= 1`` candidates per supervised response token.
        sampling: ``"nucleus"`` or ``"greedy"`` (:func:`sample_candidates`).
        top_p: nucleus mass in ``(0, 1]``.
        temperature: of the KL's softmax (SPEC §1), ``> 0``; the candidates are always drawn at temperature 1.
        vocab: ``"strict"`` or ``"crop"`` (SPEC §1).
        implementation: ``"fused"`` (CE, KD and TPA over vocabulary chunks, no ``[R (d + 1), V]`` logits) or
            ``"naive"`` (full logits, the reference).
        teacher_attention_layer: also record the teacher's head-averaged attention of this decoder layer in its
            augmented pass (IVA's weights ``a_{l*}(x)``; negative counts from the end); ``None``: no recording.
    """

    num_candidates: int = 4
    sampling: str = "nucleus"
    top_p: float = 0.9
    temperature: float = 1.0
    vocab: str = "strict"
    implementation: str = "fused"
    teacher_attention_layer: int | None = None

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
        check_choice("sampling", self.sampling, SAMPLINGS)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        check_common_options(vocab=self.vocab, implementation=self.implementation, temperature=self.temperature)


@dataclass
class TPATotals:
    """The float32 sums (scalar tensors) behind :class:`TPAResult`'s means, what :func:`align_ti_step` normalises:
    ``ce`` and ``kd`` over the ``R`` response positions, ``tpa`` over the ``R d`` candidates."""

    ce: torch.Tensor
    kd: torch.Tensor
    tpa: torch.Tensor


@dataclass
class TPAResult:
    """What :func:`tpa_losses` computed; a field can also be read by name, ``result["kd"]``.

    Attributes:
        ce: the student's mean cross-entropy over the ``R`` response positions (augmented pass; equals a normal
            pass's).
        kd: mean ``KL(p_t || p_s)`` over the response positions (teacher-forced, from the augmented passes).
        tpa: mean ``KL(p_t || p_s)`` over supervised ``k`` and ``u`` at ``c_k^(u)`` (Eq. 7).
        totals: the sums behind the three means.
        student, teacher: :class:`~emkd.DistillInputs` of the augmented passes in the ORIGINAL layout (the
            student's carries the gradient).
        candidates: ``[R, d]`` long, the candidate ids.
        sampling_logits: ``[R, V_s]``, the sampling pass's student logits at the response positions.
        student_batch, teacher_batch: the augmented batches of :func:`build_tpa_batch`.
        teacher_attention: ``[B, L, L]`` head-averaged teacher attention of ``teacher_attention_layer`` in the
            original layout (a ground-truth query gives every candidate exactly zero weight, so these rows equal a
            normal pass's), or ``None``.
    """

    ce: torch.Tensor
    kd: torch.Tensor
    tpa: torch.Tensor
    totals: TPATotals
    student: DistillInputs
    teacher: DistillInputs
    candidates: torch.Tensor
    sampling_logits: torch.Tensor
    student_batch: dict[str, Any]
    teacher_batch: dict[str, Any]
    teacher_attention: torch.Tensor | None = None


# ---- candidates -------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_candidates(
    logits: torch.Tensor,
    num_candidates: int,
    sampling: str = "nucleus",
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
    exclude_ids: list[int] | tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Draw TPA's candidates ``c^(1..d)`` from each row's distribution ``softmax(logits)``, without gradient.

    Args:
        logits: ``[R, V]`` student logits, one row per supervised response token (the row that predicts it).
        num_candidates: ``d >= 1``.
        sampling: ``"nucleus"``: ``d`` tokens drawn i.i.d. (with replacement, so a token may repeat) from the
            top-``p`` nucleus, the smallest set of most probable tokens whose mass reaches ``top_p``, renormalised;
            ``"greedy"``: the ``d`` most probable tokens (``topk``), in decreasing order.
        top_p: nucleus mass in ``(0, 1]``.
        generator: a ``torch.Generator`` (on ``logits``' device) for reproducible draws.
        exclude_ids: token ids that are never drawn (vision placeholders); their logits are set to ``-inf``.

    Returns:
        ``[R, d]`` long token ids.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_candidates: logits must be [R, V], got shape {tuple(logits.shape)}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    R, V = logits.shape
    excluded = sorted({int(i) for i in (exclude_ids or ()) if 0 <= int(i) < V})
    if sampling == "greedy" and num_candidates > V - len(excluded):
        raise ValueError(
            f"greedy sampling of {num_candidates} candidates needs as many allowed tokens; the vocabulary has {V} "
            f"of which {len(excluded)} are excluded"
        )
    out = torch.empty(R, num_candidates, dtype=torch.long, device=logits.device)
    for start in range(0, R, _SAMPLE_CHUNK):
        z = logits[start : start + _SAMPLE_CHUNK].detach().float()  # (r, V)
        if excluded:
            z = z.clone()
            z[:, excluded] = float("-inf")
        if sampling == "greedy":
            out[start : start + z.shape[0]] = z.topk(num_candidates, dim=-1).indices
            continue
        probs, order = z.softmax(-1).sort(dim=-1, descending=True)  # (r, V), (r, V)
        before = probs.cumsum(-1) - probs  # mass of the strictly more probable tokens
        probs = probs.masked_fill(before >= top_p, 0.0)  # outside the nucleus (the top token always stays)
        picks = torch.multinomial(probs, num_candidates, replacement=True, generator=generator)  # (r, d)
        out[start : start + z.shape[0]] = order.gather(1, picks)
    return out


# ---- the augmented batch ----------------------------------------------------------------------------------------
def response_layout(side_batch: dict[str, torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """Per sample ``(P, n, supervised)``: prefix length ``P`` (position of the first supervised token, ``j >= 1``
    with ``labels[j] != -100``), real length ``n``, and ``supervised`` ``[n - P]`` bool (``y_k`` is supervised).

    A sample without supervised tokens gets ``P = n`` (no response). Raises ``ValueError`` for a sample that is not
    right-padded (its real tokens must be the first ``n``).
    """
    attention, labels = side_batch["attention_mask"], side_batch["labels"]
    if attention.dim() != 2 or labels.shape != attention.shape:
        raise ValueError(
            f"a batch side needs [B, L] attention_mask and labels, got {tuple(attention.shape)} and "
            f"{tuple(labels.shape)}"
        )
    layout = []
    for b in range(attention.shape[0]):
        n = int(attention[b].sum())
        if not bool(attention[b, :n].all()):
            first_pad = int((~attention[b].bool()).nonzero()[0])
            raise ValueError(
                f"sample {b}: TPA needs right-padded samples (real tokens first); attention_mask has {n} real tokens "
                f"but position {first_pad} is padding"
            )
        sup = (labels[b, 1:n] != IGNORE_INDEX).nonzero().flatten() + 1  # supervised positions j >= 1
        P = int(sup[0]) if sup.numel() else n
        supervised = labels[b, P:n] != IGNORE_INDEX  # (n - P,)
        layout.append((P, n, supervised))
    return layout


def build_tpa_batch(
    side_batch: dict[str, torch.Tensor],
    candidates: list[torch.Tensor],
    num_candidates: int,
    pad_token_id: int = 0,
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Lay one side of a batch out for parallel TPA (Align-TI Fig. 9; SPEC §6).

    Per sample, with prefix ``x = input_ids[:P]`` and response ``y_1 .. y_L = input_ids[P:n]`` (see
    :func:`response_layout`), the augmented sequence is ``[x, c_1^(1..d), y_1, ..., c_L^(1..d), y_L]`` of length
    ``T_b = P + L (d + 1)``, with :func:`~emkd.losses.align_ti.ribbon_attention_mask`'s mask and position ids.
    Samples are right-padded to ``T = max T_b``.

    Args:
        side_batch: one side of a collated batch (``input_ids``, ``attention_mask``, ``labels`` ``[B, L]``, image
            inputs), right-padded.
        candidates: one ``[R_b, d]`` long tensor per sample, the candidates of its ``R_b`` supervised response
            tokens in order (sample ``b``'s rows of :func:`sample_candidates`). Unsupervised ``y_k`` get
            ``pad_token_id`` in their candidate slots (computed, never scored).
        num_candidates: ``d``.
        pad_token_id: fills padding and the unscored candidate slots; must not be an image token id.
        mask_dtype: dtype of the additive mask.

    Returns:
        A dict with

        * ``input_ids`` ``[B, T]`` long;
        * ``attention_mask`` ``[B, 1, T, T]`` additive float mask (0 allowed, ``finfo(mask_dtype).min`` masked);
          a padding query sees itself only, so that no row is fully masked;
        * ``position_ids`` ``[B, T]`` long (ribbon position ids; 0 on padding);
        * ``labels`` ``[B, T]`` long: the original label of every ground-truth token at its augmented index
          (``labels[index_map[b, i]] = labels_orig[b, i]``), ``-100`` at candidates and padding;
        * ``real_mask`` ``[B, T]`` bool, the non-padding tokens;
        * ``index_map`` ``[B, L]`` long, the augmented index of every original position (0 on original padding);
        * ``candidate_batch`` ``[R]`` and ``candidate_index`` ``[R, d]`` long: sample and augmented index of
          ``c_k^(u)`` for every supervised ``y_k``, sample-major (``R = sum R_b``, the batch's response positions);
        * ``candidates`` ``[R, d]`` long, the candidate ids; ``prefix_len``, ``response_len`` ``[B]`` long;
        * ``num_candidates`` ``d``, and the side's image inputs, unchanged.
    """
    d = int(num_candidates)
    if d < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    input_ids, labels = side_batch["input_ids"], side_batch["labels"]
    B, L_orig = input_ids.shape
    layout = response_layout(side_batch)
    if len(candidates) != B:
        raise ValueError(f"build_tpa_batch needs one candidate tensor per sample: B={B}, got {len(candidates)}")
    lengths = [P + int(sup.numel()) * (d + 1) for P, _, sup in layout]
    T = max(lengths)
    device = input_ids.device
    ids = torch.full((B, T), int(pad_token_id), dtype=torch.long, device=device)
    aug_labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
    positions = torch.zeros(B, T, dtype=torch.long, device=device)
    allowed = torch.zeros(B, T, T, dtype=torch.bool, device=device)
    index_map = torch.zeros(B, L_orig, dtype=torch.long, device=device)
    cand_batch, cand_index, cand_ids = [], [], []
    for b, ((P, n, supervised), T_b) in enumerate(zip(layout, lengths)):
        L = int(supervised.numel())
        R_b = int(supervised.sum())
        c = candidates[b].to(device=device, dtype=torch.long)
        if tuple(c.shape) != (R_b, d):
            raise ValueError(
                f"sample {b}: expected candidates [R_b={R_b} supervised response tokens, d={d}], got {tuple(c.shape)}"
            )
        slots = torch.full((L, d), int(pad_token_id), dtype=torch.long, device=device)  # (L, d)
        slots[supervised] = c
        y = input_ids[b, P:n]  # (L,)
        ids[b, :P] = input_ids[b, :P]
        ids[b, P:T_b] = torch.cat([slots, y[:, None]], dim=1).reshape(-1)  # [c_k^(1..d), y_k] for k = 1..L
        mask_b, pos_b = ribbon_attention_mask(P, L, d)
        allowed[b, :T_b, :T_b] = mask_b.to(device)
        positions[b, :T_b] = pos_b.to(device)
        orig = torch.arange(n, device=device)
        index_map[b, :n] = torch.where(orig < P, orig, P + (orig - P) * (d + 1) + d)
        aug_labels[b, index_map[b, :n]] = labels[b, :n]
        k = supervised.nonzero().flatten()  # (R_b,) 0-based k of the supervised y_k
        cand_index.append(P + k[:, None] * (d + 1) + torch.arange(d, device=device))  # (R_b, d)
        cand_batch.append(torch.full((R_b,), b, dtype=torch.long, device=device))
        cand_ids.append(c)
    pad_rows = torch.arange(T, device=device)[None, :] >= torch.tensor(lengths, device=device)[:, None]  # (B, T)
    diagonal = torch.eye(T, dtype=torch.bool, device=device)[None] & pad_rows[:, :, None]  # (B, T, T)
    allowed |= diagonal  # a padding query sees itself, so softmax never meets a fully masked row
    mask = torch.zeros(B, 1, T, T, dtype=mask_dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    out: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": positions,
        "labels": aug_labels,
        "real_mask": ~pad_rows,
        "index_map": index_map,
        "candidate_batch": torch.cat(cand_batch),
        "candidate_index": torch.cat(cand_index),
        "candidates": torch.cat(cand_ids),
        "prefix_len": torch.tensor([P for P, _, _ in layout], dtype=torch.long),
        "response_len": torch.tensor([int(s.numel()) for _, _, s in layout], dtype=torch.long),
        "num_candidates": d,
    }
    reserved = set(out) & (set(side_batch) - {"input_ids", "attention_mask", "labels"})
    if reserved:
        raise ValueError(f"the batch side uses keys reserved by build_tpa_batch: {sorted(reserved)}")
    for key, value in side_batch.items():
        if key not in ("input_ids", "attention_mask", "labels", "instruction_mask"):
            out[key] = value  # image inputs, unchanged
    return out


# ---- running models on the augmented batch ----------------------------------------------------------------------
def check_tpa_support(adapter: DistillAdapter) -> None:
    """Raise ``NotImplementedError`` for a model that cannot run the augmented batch (custom mask + position ids):
    the adapter's :meth:`~emkd.models.base.DistillAdapter.check_augmented_forward`."""
    adapter.check_augmented_forward()


def augmented_hidden(
    adapter: DistillAdapter, aug: dict[str, Any], model: torch.nn.Module | None = None
) -> torch.Tensor:
    """Final-norm hidden states ``[B, T, D]`` of ``adapter``'s model on an augmented batch of :func:`build_tpa_batch`.

    The 4D additive mask goes to the model as ``attention_mask`` (Hugging Face's mask preparation returns a 4D mask
    as it is; "sdpa" and "eager" both add it to the scores) and the ribbon ids as ``position_ids``
    (:meth:`~emkd.models.base.DistillAdapter.augmented_forward`). Gradients flow as the caller's autograd mode says;
    ``model`` replaces the adapter's model for the forward (a DDP wrapper).
    """
    return adapter.augmented_forward(aug, model)


def augmented_pass(
    adapter: DistillAdapter, aug: dict[str, Any], model: torch.nn.Module | None = None,
    attention_layer: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`augmented_hidden`, plus the head-averaged attention ``[B, T, T]`` of decoder layer ``attention_layer``
    (:meth:`~emkd.models.base.DistillAdapter.recording_attention`: eager attention in that layer for the call) when
    one is asked for."""
    if attention_layer is None:
        return adapter.augmented_forward(aug, model), None
    with adapter.recording_attention(attention_layer) as record:
        hidden = adapter.augmented_forward(aug, model)
    return hidden, record.attention


def _gather_attention(attention: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``attention[b, index[b, i], index[b, j]]``: ``[B, T, T]`` and ``[B, L]`` -> ``[B, L, L]``."""
    index = index.to(attention.device)
    B, L = index.shape
    rows = attention.gather(1, index[..., None].expand(B, L, attention.shape[-1]))  # (B, L, T)
    return rows.gather(2, index[:, None, :].expand(B, L, L))  # (B, L, L)


def _gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b, i]]``: ``[B, T, D]`` and ``[B, L]`` -> ``[B, L, D]``."""
    return hidden.gather(1, index.to(hidden.device)[..., None].expand(-1, -1, hidden.shape[-1]))


def _candidate_hidden(hidden: torch.Tensor, aug: dict[str, Any]) -> torch.Tensor:
    """``hidden`` at every candidate ``c_k^(u)``, sample-major then ``u``: ``[B, T, D]`` -> ``[R d, D]``."""
    rows = hidden[aug["candidate_batch"].to(hidden.device)[:, None], aug["candidate_index"].to(hidden.device)]
    return rows.reshape(-1, rows.shape[-1])  # (R, d, D) -> (R d, D)


def _vision_ids(adapter: DistillAdapter) -> set[int]:
    ids = {int(adapter.side.image_token_id)}
    configs = [adapter.model.config, getattr(adapter.model.config, "text_config", None)]
    for config in configs:
        for name in VISION_TOKEN_ATTRS:
            value = getattr(config, name, None)
            if isinstance(value, int):
                ids.add(value)
    return ids


def _pad_id(adapter: DistillAdapter) -> int:
    tokenizer = adapter.side.tokenizer
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if value is not None:
            return int(value)
    raise ValueError("the student tokenizer has neither pad_token_id nor eos_token_id; TPA needs a filler token id")


def _view(hidden: torch.Tensor, side_batch: dict[str, torch.Tensor], aug: dict[str, Any], adapter: DistillAdapter):
    """The original layout of an augmented pass: DistillInputs over the ORIGINAL positions (SPEC §1)."""
    head = adapter.model.get_output_embeddings()
    device = hidden.device
    input_ids = side_batch["input_ids"].to(device)
    attention = side_batch["attention_mask"].to(device)
    instruction = side_batch.get("instruction_mask")
    return DistillInputs(
        hidden=_gather_positions(hidden, aug["index_map"]),  # (B, L, D)
        head_weight=head.weight,
        head_bias=getattr(head, "bias", None),
        vision_mask=(input_ids == adapter.side.image_token_id) & attention.bool(),
        attention_mask=attention,
        labels=side_batch["labels"].to(device),
        instruction_mask=None if instruction is None else instruction.to(device),
    )


# ---- TPA and KD (Eq. 5-7) ---------------------------------------------------------------------------------------
@torch.no_grad()
def _sampling_pass(
    student_adapter: DistillAdapter,
    teacher_adapter: DistillAdapter,
    side_batch: dict[str, torch.Tensor],
    options: TPAOptions,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Step 1, without gradient: the student's logits ``[R, V_s]`` at the response positions, the candidates
    ``[R, d]`` drawn from them (never a vision placeholder of either model; ``vocab="crop"``: among the first
    ``min(V_s, V_t)`` ids), and ``R_b`` of every sample."""
    sampled = student_adapter(side_batch).inputs
    v_s = sampled.vocab_size
    v_t = teacher_adapter.model.get_output_embeddings().weight.shape[0]
    if v_s != v_t and options.vocab == "strict":
        raise ValueError(
            f"vocabulary sizes differ: student head V={v_s}, teacher head V={v_t}; pass vocab='crop' to cut both "
            "heads to the smaller size"
        )
    sampling_logits = sampled.logits(sampled.response_hidden())  # (R, V_s)
    exclude = sorted(_vision_ids(student_adapter) | _vision_ids(teacher_adapter))
    candidates = sample_candidates(
        sampling_logits[:, : min(v_s, v_t)], options.num_candidates, options.sampling, options.top_p, generator, exclude
    )  # (R, d)
    return sampling_logits, candidates, sampled.response_mask.sum(1).tolist()


def _row_losses(
    student: DistillInputs, teacher: DistillInputs, c_s: torch.Tensor, c_t: torch.Tensor, options: TPAOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(CE [R], KL [R], KL [R d])``: the student's cross-entropy and ``KL(p_t || p_s)`` at the response
    positions, and ``KL(p_t || p_s)`` at the candidate rows ``c_s [R d, Ds]`` / ``c_t [R d, Dt]``."""
    if options.implementation == "fused":  # CE, KD and TPA in one chunked pass over the heads
        response, candidate_rows = response_and_row_divergences(
            student, teacher, [c_s], [c_t], "forward", options.temperature
        )
        return response["ce"], response["forward"], candidate_rows
    z_s = student.logits(student.response_hidden())  # (R, V)
    with torch.no_grad():
        z_t = teacher.logits(teacher.response_hidden())  # (R, V)
        zc_t = teacher.logits(c_t)  # (R d, V)
    ce_rows = torch.nn.functional.cross_entropy(z_s, student.response_targets, reduction="none")  # (R,)
    kd_rows = forward_kl(z_s, z_t, options.temperature)  # (R,)
    return ce_rows, kd_rows, forward_kl(student.logits(c_s), zc_t, options.temperature)  # (R d,)


def tpa_losses(
    student_adapter: DistillAdapter,
    teacher_adapter: DistillAdapter,
    batch: dict[str, dict[str, torch.Tensor]],
    options: TPAOptions | None = None,
    *,
    generator: torch.Generator | None = None,
    student_model: torch.nn.Module | None = None,
) -> TPAResult:
    """KD and TPA of Align-TI (Eq. 5-7, Algorithm 1) with one sampling pass and one augmented pass per model.

    Args:
        student_adapter, teacher_adapter: the two models (student first). Both run the augmented batch
            (:meth:`~emkd.models.base.DistillAdapter.augmented_forward`, checked before any model runs); the teacher
            records attention when ``teacher_attention_layer`` is set.
        batch: ``{"student": side, "teacher": side}`` of :class:`emkd.data.PairCollator`.
        options: :class:`TPAOptions` (default: the paper's).
        generator: a ``torch.Generator`` for reproducible candidates (:func:`sample_candidates`).
        student_model: the (wrapped) student module the gradient pass runs through; default the adapter's.

    Returns:
        :class:`TPAResult`.
    """
    options = TPAOptions() if options is None else options
    check_tpa_support(student_adapter)
    check_tpa_support(teacher_adapter)
    s_side, t_side = batch["student"], batch["teacher"]
    d = options.num_candidates

    # 1. sampling pass (no gradient): the student's distribution for every supervised y_k
    sampling_logits, candidates, counts = _sampling_pass(student_adapter, teacher_adapter, s_side, options, generator)
    per_sample = list(candidates.split(counts))  # B x (R_b, d)

    # 2. augmented passes: student with gradient, teacher without
    pad_id = _pad_id(student_adapter)
    s_aug = build_tpa_batch(s_side, per_sample, d, pad_token_id=pad_id)
    t_aug = build_tpa_batch(t_side, per_sample, d, pad_token_id=pad_id)
    h_s = augmented_hidden(student_adapter, s_aug, model=student_model)  # (B, Ts, Ds)
    with torch.no_grad():
        layer = options.teacher_attention_layer
        h_t, att_t = augmented_pass(teacher_adapter, t_aug, attention_layer=layer)  # (B, Tt, Dt), (B, Tt, Tt)

    # 3. ground-truth tokens: the original layout, validated like every loss input
    student, teacher = check_pair(
        _view(h_s, s_side, s_aug, student_adapter), _view(h_t, t_side, t_aug, teacher_adapter), options.vocab
    )

    # 4. candidates: P(. | x, y_<k, c_k^(u)) of both models, same (k, u) order on both sides
    c_s = _candidate_hidden(h_s, s_aug)  # (R d, Ds)
    with torch.no_grad():
        c_t = _candidate_hidden(h_t, t_aug).to(c_s.device)  # (R d, Dt)
    ce_rows, kd_rows, candidate_rows = _row_losses(student, teacher, c_s, c_t, options)
    totals = TPATotals(sum_or_zero(ce_rows, h_s), sum_or_zero(kd_rows, h_s), sum_or_zero(candidate_rows, h_s))
    R = int(student.response_targets.numel())
    return TPAResult(
        ce=totals.ce / R if R else totals.ce,
        kd=totals.kd / R if R else totals.kd,
        tpa=totals.tpa / (R * d) if R else totals.tpa,
        totals=totals,
        student=student,
        teacher=teacher,
        candidates=candidates,
        sampling_logits=sampling_logits,
        student_batch=s_aug,
        teacher_batch=t_aug,
        teacher_attention=None if att_t is None else _gather_attention(att_t, t_aug["index_map"]),
    )


# ---- the Align-TI step (Eq. 8) ----------------------------------------------------------------------------------
def _iva_weights(parts: TPAResult) -> list[torch.Tensor]:
    """IVA's weights ``a_{l*}(x)`` (``[Nt_b]`` per sample) from the teacher's augmented pass; zeros for a sample
    without instruction tokens, which then adds 0 to IVA."""
    teacher = parts.teacher
    weights = instruction_vision_attention(parts.teacher_attention, teacher.vision_mask, teacher.instruction_mask)
    n_t = teacher.vision_mask.sum(1)
    return [w if w.numel() else torch.zeros(int(n_t[b]), device=w.device) for b, w in enumerate(weights)]


def _normal_losses(
    student_adapter: DistillAdapter,
    teacher_adapter: DistillAdapter,
    batch: dict[str, dict[str, torch.Tensor]],
    options: TPAOptions,
    student_model: torch.nn.Module | None,
) -> TPAResult:
    """CE and KD of :func:`tpa_losses` from one normal pass of each model (the teacher records the attention of
    ``teacher_attention_layer``), with TPA's sum 0 and no candidates: Align-TI with ``tpa=False``."""
    s_side, t_side = batch["student"], batch["teacher"]
    kwargs = {} if student_model is None else {"model": student_model}
    s_out = student_adapter(s_side, **kwargs)
    with torch.no_grad():
        t_out = teacher_adapter(t_side, attention_layer=options.teacher_attention_layer)
    student, teacher = check_pair(s_out.inputs, t_out.inputs, options.vocab)
    ce_rows, kd_rows, _ = _row_losses(
        student, teacher, student.hidden.new_zeros(0, student.hidden.shape[-1]),
        teacher.hidden.new_zeros(0, teacher.hidden.shape[-1]), options,
    )
    h_s = student.hidden
    totals = TPATotals(sum_or_zero(ce_rows, h_s), sum_or_zero(kd_rows, h_s), zero_like_graph(h_s))
    R = int(student.response_targets.numel())
    return TPAResult(
        ce=totals.ce / R if R else totals.ce,
        kd=totals.kd / R if R else totals.kd,
        tpa=totals.tpa,
        totals=totals,
        student=student,
        teacher=teacher,
        candidates=torch.empty(R, 0, dtype=torch.long, device=h_s.device),
        sampling_logits=h_s.new_zeros(0, 0),
        student_batch={},
        teacher_batch={},
        teacher_attention=t_out.attention,
    )


def _loss_terms(parts: TPAResult, iva_sum: torch.Tensor, normalisation: str, num_candidates: int) -> LossTerms:
    """The four sums of ``CE + IVA + KD + TPA`` and what each is divided by (:func:`align_ti_step`)."""
    totals = parts.totals
    if normalisation == "token_sum":
        kd = Term(1.0, totals.kd, "samples")
        tpa = Term(1.0, totals.tpa, "samples")
        iva = Term(1.0, iva_sum, "samples")
    else:  # a mean over the R d candidates is the mean over the R positions of each one's mean over its d
        kd = Term(1.0, totals.kd, "response_tokens")
        tpa = Term(1.0, totals.tpa / num_candidates, "response_tokens")
        iva = Term(1.0, iva_sum, "vision_pairs")
    return LossTerms(
        {"ce": Term(1.0, totals.ce, "response_tokens"), "iva": iva, "kd": kd, "tpa": tpa},
        inputs_counts(parts.student, parts.teacher),
    )


def align_ti_step(
    student_adapter: DistillAdapter,
    teacher_adapter: DistillAdapter,
    batch: dict[str, dict[str, torch.Tensor]],
    iva_layer: int,
    num_candidates: int = 4,
    sampling: str = "nucleus",
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
    student_model: torch.nn.Module | None = None,
    iva_matching: str = "auto",
    temperature: float = 1.0,
    vocab: str = "strict",
    implementation: str = "fused",
    normalisation: str = "token_sum",
    tpa: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One Align-TI loss (Eq. 8): ``loss = CE + IVA + KD + TPA``, gradients to the student only.

    Args:
        student_adapter, teacher_adapter: the two models (student first).
        batch: ``{"student": side, "teacher": side}``; both sides need ``instruction_mask`` (IVA's queries).
        iva_layer: teacher decoder layer ``l*`` of IVA's weights (``best_layer`` of :func:`emkd.training.irs.
            compute_irs`; negative counts from the end).
        num_candidates, sampling, top_p, temperature, vocab, implementation: see :class:`TPAOptions`.
        generator, student_model: see :func:`tpa_losses`.
        iva_matching: pairing of unbalanced vision tokens for IVA (:func:`~emkd.losses.align_ti.iva_loss`).
        normalisation: how KD, TPA and IVA are reduced, one rule for the three (SPEC §6; CE is always the mean
            cross-entropy over the batch's response positions):

            * ``token_sum`` (default, the paper: Eq. 2, 4, 7 and Algorithm 1 sum over tokens): per sample, KD sums
              over its response positions, TPA over its response positions and their ``d`` candidates, IVA over its
              vision tokens; each is then the mean over the ``B`` samples of the batch (a sample that has no such
              token adds 0 and still counts);
            * ``token_mean``: KD is the mean over the batch's response positions, TPA the mean over its ``R d``
              candidates, IVA the mean over its vision pairs of ``w_k KL_k``.
        tpa: ``True`` (default, the paper): the full loss. ``False``: Align-TI without TPA, ``CE + IVA + KD`` read
            from one normal pass of each model (no candidates, no augmented batch; ``tpa`` is 0 and
            ``num_candidates``, ``sampling``, ``top_p`` go unused). This is what a teacher whose position ids cannot
            take the ribbon (Qwen2-VL / Qwen2.5-VL, M-RoPE) trains with.

    Everything is read from the augmented passes at the ground-truth tokens, IVA's weights ``a_{l*}(x)`` from the
    teacher's (eager attention in that layer for that call); see the module docstring. A
    sample without instruction tokens (e.g. the ``plain`` template) gets zero IVA weights: it adds 0 to IVA.

    Returns:
        ``(loss, components)`` with scalar tensors ``ce``, ``iva``, ``kd``, ``tpa`` (attached to the graph),
        ``matches`` (IVA's vision pairs per sample), ``candidates`` ``[R, d]`` and ``terms``
        (:class:`~emkd.losses.normalisation.LossTerms`, the four sums and what each is divided by: what the trainer
        normalises over an optimizer step).
    """
    _check_step_options(iva_matching, normalisation, tpa)
    if batch["teacher"].get("instruction_mask") is None:
        raise ValueError("align_ti_step needs batch['teacher']['instruction_mask'] (IVA's instruction tokens)")
    options = TPAOptions(num_candidates=num_candidates, sampling=sampling, top_p=top_p, temperature=temperature,
                         vocab=vocab, implementation=implementation, teacher_attention_layer=iva_layer)
    if tpa:
        parts = tpa_losses(student_adapter, teacher_adapter, batch, options, generator=generator,
                           student_model=student_model)
    else:
        parts = _normal_losses(student_adapter, teacher_adapter, batch, options, student_model)
    iva_sum, matches = iva_total(
        parts.student, parts.teacher, _iva_weights(parts), iva_matching, temperature, vocab, implementation
    )
    terms = _loss_terms(parts, iva_sum, normalisation, num_candidates)
    values = terms.values()
    components = {**values, "matches": matches, "candidates": parts.candidates, "terms": terms}
    return combine(terms, values), components


def check_options(
    num_candidates: int = 4,
    sampling: str = "nucleus",
    top_p: float = 0.9,
    iva_matching: str = "auto",
    temperature: float = 1.0,
    vocab: str = "strict",
    implementation: str = "fused",
    normalisation: str = "token_sum",
    tpa: bool = True,
    **_: Any,
) -> None:
    """Check the values of :func:`align_ti_step`'s options without running it (the recipe's ``loss:`` mapping is
    checked when it loads); ``ValueError`` names the option (:class:`TPAOptions` checks TPA's)."""
    TPAOptions(num_candidates=num_candidates, sampling=sampling, top_p=top_p, temperature=temperature, vocab=vocab,
               implementation=implementation)
    _check_step_options(iva_matching, normalisation, tpa)


def _check_step_options(iva_matching: str, normalisation: str, tpa: bool) -> None:
    """The checks of :func:`align_ti_step`'s own options (beyond :class:`TPAOptions`'); ``ValueError`` names one."""
    check_choice("iva_matching", iva_matching, IVA_MATCHINGS)
    check_normalisation(normalisation)
    if not isinstance(tpa, bool):
        raise ValueError(f"tpa must be true or false, got {tpa!r}")


__all__ = [
    "NORMALISATIONS",
    "SAMPLINGS",
    "TPAOptions",
    "TPAResult",
    "TPATotals",
    "align_ti_step",
    "augmented_hidden",
    "augmented_pass",
    "build_tpa_batch",
    "check_options",
    "check_tpa_support",
    "response_layout",
    "sample_candidates",
    "tpa_losses",
]

"""Does the matching match? How often a student vision token is paired with a teacher token from its own pooling window.

The efficient student (:mod:`emkd.models.student`, ``compressor="pool"``) average-pools the ``g x g`` patch grid of
its vision tower to ``p x p`` with ``adaptive_avg_pool2d`` (``g = image_size // patch_size``, ``p = pool_size``); a
vanilla teacher with the same tower geometry (``compressor="none"``) keeps all ``g x g`` patch tokens. Both lists
are in raster order, so student token ``k = i*p + j`` is computed from the teacher-grid positions ``r*g + c`` of its
*pooling window*, adaptive pooling's rule on each axis::

    floor(i*g / p) <= r < ceil((i+1)*g / p),    floor(j*g / p) <= c < ceil((j+1)*g / p)

(windows overlap when ``p`` does not divide ``g``). A student token and a teacher token of its window look at the same
image region, so a matching that follows the image pairs them; EM-KD's Hungarian matching on vision logits (SPEC §2)
knows nothing of positions, and this module measures whether it finds them anyway.

``match_in_window`` of one sample is the mean over its ``M`` pairs of the fraction of the pair's teacher tokens that
lie in the student token's window: 1 or 0 for a token-to-token pair (``hungarian_logits``, ``hungarian_hidden``,
``identity``); for ``avgpool``, which pairs a student token with the mean of a segment of teacher tokens (1D adaptive
pooling of the raster sequence, SPEC §2), the fraction of that segment inside the window. Were the student the longer
side, its segments would be averaged the same way (:func:`window_hit_rate`). A batch's value is the mean over the
samples whose vision token counts are exactly ``(p*p, g*g)``, one single-tile image each; the others (text-only
samples, several images, AnyRes tiles) are skipped and counted (:func:`batch_window_hits`).

Random baseline. Under a uniformly random one-to-one matching of ``Ns`` student and ``Nt`` teacher tokens
(``M = min(Ns, Nt)`` pairs), every ``(s, t)`` is a pair with probability ``M / (Ns*Nt)`` (for ``Ns <= Nt`` every
student token is matched, to a teacher token uniform over ``Nt``; symmetrically for ``Ns > Nt``). The expected
number of pairs inside windows is ``M * |W| / (Ns*Nt)``, with ``|W|`` the number of (student token, window token)
incidences, so the expected fraction is the density of the window matrix, ``|W| / (Ns*Nt)``
(:func:`random_hit_rate`). On the grid the windows are products of 1D segments of lengths
``h_i = ceil((i+1)*g/p) - floor(i*g/p)``, so ``|W| = (sum_i h_i)**2`` and::

    random = (sum_i h_i / (p*g))**2,

which is ``1/p**2`` when ``p`` divides ``g`` (``sum_i h_i = g``) and more when windows overlap: SigLIP at 384 px
(``g = 27``) pooled to ``p = 12`` has ``h_i = 3`` for every ``i``, so ``(36/324)**2 = 1/81`` instead of ``1/144``.
The ceiling is 1 for every ``p <= g``: the window starts ``floor(i*g/p)`` are distinct, so the tokens at the windows'
top-left corners form a one-to-one matching entirely inside the windows. ``avgpool`` is no random matching: its
value is a constant of the geometry (pooling the raster sequence mixes whole grid rows), 1/9 for 27 -> 12.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from emkd.matching.pairing import AUTO_MATCHINGS, resolve_matching
from emkd.models.student_side import EfficientMLLMSide

logger = logging.getLogger(__name__)

# image-processor settings that decide where a pixel of the original image lands in the tower's square view
_LAYOUT_ATTRIBUTES = ("do_resize", "size", "do_center_crop", "crop_size", "do_pad", "pad_size")


# ---- geometry ---------------------------------------------------------------------------------------------------
def adaptive_segments(length: int, out_length: int) -> torch.Tensor:
    """Which inputs each output of 1D adaptive average pooling averages: ``[out_length, length]`` bool.

    Output ``i`` averages inputs ``floor(i*length/out_length) <= x < ceil((i+1)*length/out_length)``, the rule of
    ``torch.nn.functional.adaptive_avg_pool1d`` (and of ``adaptive_avg_pool2d`` on each axis), for any two positive
    lengths.
    """
    if length < 1 or out_length < 1:
        raise ValueError(f"adaptive_segments needs positive lengths, got length={length}, out_length={out_length}")
    i = torch.arange(out_length)
    start = (i * length) // out_length  # (out_length,)
    end = -(-(i + 1) * length // out_length)  # (out_length,), ceil division
    x = torch.arange(length)
    return (x[None, :] >= start[:, None]) & (x[None, :] < end[:, None])  # (out_length, length)


def pooling_windows(student_grid: int, teacher_grid: int) -> torch.Tensor:
    """The pooling window of every student token: ``[p*p, g*g]`` bool, ``p = student_grid``, ``g = teacher_grid``.

    Row ``i*p + j`` marks the teacher tokens ``r*g + c`` (raster order) that ``adaptive_avg_pool2d`` averages into
    student token ``(i, j)`` of a ``p x p`` pooling of the ``g x g`` grid (module docstring).
    """
    p, g = student_grid, teacher_grid
    rows = adaptive_segments(g, p)  # (p, g): the same segments serve rows and columns
    windows = rows[:, None, :, None] & rows[None, :, None, :]  # (p, p, g, g) = [i, j, r, c]
    return windows.reshape(p * p, g * g)


def avgpool_pairing(n_student: int, n_teacher: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs ``matching="avgpool"`` makes (SPEC §2): the longer side pooled down to the shorter length.

    Returns ``(student, teacher)``: the shorter side as token indices ``[M]`` (``arange(M)``), the longer side as
    segments ``[M, N_longer]`` bool (pair ``m`` averages the marked tokens), ``M = min(n_student, n_teacher)``; both
    sides as indices when the counts are equal (pooling to the same length changes nothing).
    """
    m = min(n_student, n_teacher)
    if m < 1:
        raise ValueError(f"avgpool_pairing needs tokens on both sides, got {n_student} student, {n_teacher} teacher")
    index = torch.arange(m)
    if n_student == n_teacher:
        return index, index.clone()
    if n_student < n_teacher:
        return index, adaptive_segments(n_teacher, m)  # (M,), (M, Nt)
    return adaptive_segments(n_student, m), index  # (M, Ns), (M,)


# ---- the measure ------------------------------------------------------------------------------------------------
def _checked_side(side: torch.Tensor, n: int, m: int | None, which: str) -> torch.Tensor:
    """One side of the pairs, checked, on the CPU: token indices ``[M]`` (long) or segments ``[M, n]`` (bool)."""
    side = side.detach().cpu()
    if side.dim() == 1 and not side.is_floating_point() and side.dtype != torch.bool:
        if m is not None and side.shape[0] != m:
            raise ValueError(f"{which} side has {side.shape[0]} pairs, the other side {m}")
        if side.numel() and not (0 <= int(side.min()) and int(side.max()) < n):
            raise ValueError(
                f"{which} token index out of range [0, {n}): min {int(side.min())}, max {int(side.max())}"
            )
        return side.long()
    if side.dim() == 2 and side.dtype == torch.bool:
        if side.shape[1] != n or (m is not None and side.shape[0] != m):
            raise ValueError(
                f"{which} segments must be [{'M' if m is None else m}, {n}] bool, got {tuple(side.shape)}"
            )
        empty = (~side.any(1)).nonzero()
        if empty.numel():
            raise ValueError(f"{which} segment {int(empty[0])} is empty")
        return side
    raise ValueError(
        f"{which} side of the pairs must be token indices [M] (integer) or segments [M, {n}] (bool), got "
        f"{side.dtype} of shape {tuple(side.shape)}"
    )


def window_hit_rate(pairs: tuple[torch.Tensor, torch.Tensor], windows: torch.Tensor) -> float:
    """Fraction of matched pairs whose teacher token lies in the student token's pooling window, averaged over pairs.

    Args:
        pairs: ``(student, teacher)`` for ``M >= 1`` pairs, each side either token indices ``[M]`` (integer; e.g.
            EM-KD's ``(idx_s, idx_t)``) or segments ``[M, N]`` (bool; pair ``m`` is the mean of the marked tokens, as
            ``avgpool`` pairs them: :func:`avgpool_pairing`).
        windows: ``[Ns, Nt]`` bool, ``windows[s, t]`` when teacher token ``t`` is in student token ``s``'s window
            (:func:`pooling_windows`).

    Returns:
        ``mean_m sum_{s, t} a_m[s] b_m[t] windows[s, t]``, with ``a_m`` / ``b_m`` pair ``m``'s uniform weights over its
        student / teacher tokens: for index pairs the fraction of pairs inside a window; for a teacher segment the
        fraction of its tokens inside the student token's window.
    """
    if windows.dim() != 2 or windows.dtype != torch.bool:
        raise ValueError(f"windows must be a [Ns, Nt] bool tensor, got {windows.dtype} of shape {tuple(windows.shape)}")
    windows = windows.cpu()
    ns, nt = windows.shape
    student = _checked_side(pairs[0], ns, None, "student")  # (M,) or (M, Ns)
    if student.shape[0] == 0:
        raise ValueError("window_hit_rate needs at least one pair, got none")
    teacher = _checked_side(pairs[1], nt, student.shape[0], "teacher")  # (M,) or (M, Nt)
    if student.dim() == 1 and teacher.dim() == 1:
        inside = windows[student, teacher].double()  # (M,)
    elif student.dim() == 1:  # a student token against a teacher segment
        inside = (windows[student] & teacher).sum(1).double() / teacher.sum(1)  # (M,)
    elif teacher.dim() == 1:  # a student segment against a teacher token
        inside = (windows[:, teacher].T & student).sum(1).double() / student.sum(1)  # (M,)
    else:
        inside = ((student.double() @ windows.double()) * teacher).sum(1) / (student.sum(1) * teacher.sum(1))
    return float(inside.mean())


def random_hit_rate(windows: torch.Tensor) -> float:
    """Expected :func:`window_hit_rate` of a uniformly random one-to-one matching: the density of ``windows``.

    ``windows`` is ``[Ns, Nt]`` bool (any counts); the derivation is in the module docstring. For the ``p x p``
    pooling of a ``g x g`` grid this is ``(sum_i h_i / (p*g))**2``, ``1/p**2`` when ``p`` divides ``g``.
    """
    if windows.dim() != 2 or windows.dtype != torch.bool or windows.numel() == 0:
        raise ValueError(f"windows must be a non-empty [Ns, Nt] bool tensor, got {windows.dtype} of shape "
                         f"{tuple(windows.shape)}")
    return float(windows.double().mean())


@dataclass
class WindowHits:
    """:func:`batch_window_hits` of one or more batches: ``hits`` sums the per-sample hit rates of the ``samples``
    measured; ``skipped`` counts the samples whose token counts were not the windows' (text-only, AnyRes, several
    images). Add two with ``+`` (micro-batches of an optimizer step, steps of a logging window)."""

    hits: float = 0.0
    samples: int = 0
    skipped: int = 0

    @property
    def rate(self) -> float | None:
        """Mean hit rate over the measured samples; ``None`` when there were none."""
        return self.hits / self.samples if self.samples else None

    def __add__(self, other: WindowHits) -> WindowHits:
        return WindowHits(self.hits + other.hits, self.samples + other.samples, self.skipped + other.skipped)

    def all_reduce(self, device: torch.device | str = "cpu") -> WindowHits:
        """The sums over every process of the default process group (itself when there is none).

        Every process must call it at the same point, with or without samples of its own; ``device`` is where the
        collective runs (the trainer's device: NCCL needs a GPU tensor).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return WindowHits(self.hits, self.samples, self.skipped)
        totals = torch.tensor([self.hits, self.samples, self.skipped], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        hits, samples, skipped = totals.tolist()
        return WindowHits(hits, int(samples), int(skipped))


def _resolve(matching: str, ns: int, nt: int) -> str:
    if matching not in AUTO_MATCHINGS:
        raise ValueError(f"matching must be one of {AUTO_MATCHINGS}, got {matching!r}")
    return resolve_matching(matching, ns, nt)


def _counts(counts: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(n) for n in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]


def batch_window_hits(
    matches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    student_counts: Sequence[int] | torch.Tensor,
    teacher_counts: Sequence[int] | torch.Tensor,
    windows: torch.Tensor,
    matching: str | Sequence[str] = "hungarian_logits",
) -> WindowHits:
    """The hit rate of every sample of a batch whose vision token counts are the windows' ``[Ns, Nt]``.

    Args:
        matches: per sample ``(idx_s, idx_t)`` as the losses return them (``EMKDOutput.matches``,
            ``LlavaKDOutput.matches``, Align-TI's IVA ``matches``; empty tensors for a sample without pairs).
        student_counts, teacher_counts: ``[B]`` vision tokens per sample of each side (``vision_mask.sum(1)``).
        windows: ``[Ns, Nt]`` from :func:`pooling_windows` (or :func:`pooling_geometry`).
        matching: the loss's ``matching`` (one name, or one per sample): ``hungarian_logits``, ``hungarian_hidden``
            and ``identity`` return token indices; ``avgpool`` returns ``arange(M)`` on both sides, positions in the
            pooled sequences, so its pairs are rebuilt from the counts (:func:`avgpool_pairing`); ``auto`` is
            LLaVA-KD's and IVA's rule (``identity`` for equal counts, else ``hungarian_logits``).

    Returns:
        :class:`WindowHits` with the per-sample rates summed over the measured samples and the others counted.

    Raises:
        ValueError: lengths that disagree, or a measured sample whose pairs are not a full matching of its tokens
            (naming the sample).
    """
    ns_all, nt_all = _counts(student_counts), _counts(teacher_counts)
    names = [matching] * len(matches) if isinstance(matching, str) else list(matching)
    if not len(matches) == len(ns_all) == len(nt_all) == len(names):
        raise ValueError(
            f"batch_window_hits: {len(matches)} matches, {len(ns_all)} student counts, {len(nt_all)} teacher counts "
            f"and {len(names)} matchings; expected one of each per sample"
        )
    if windows.dim() != 2 or windows.dtype != torch.bool:
        raise ValueError(f"windows must be a [Ns, Nt] bool tensor, got {windows.dtype} of shape {tuple(windows.shape)}")
    shape = tuple(windows.shape)
    out = WindowHits()
    indexed: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for b, ((idx_s, idx_t), ns, nt, name) in enumerate(zip(matches, ns_all, nt_all, names)):
        if (ns, nt) != shape:
            out.skipped += 1
            continue
        name = _resolve(name, ns, nt)
        m = min(ns, nt)
        if idx_s.numel() != m or idx_t.numel() != m:
            raise ValueError(
                f"sample {b}: matching {name!r} of {ns} student and {nt} teacher vision tokens should give {m} pairs, "
                f"got idx_s {tuple(idx_s.shape)} and idx_t {tuple(idx_t.shape)}"
            )
        if name != "avgpool" and idx_s.dim() == 1 and idx_t.dim() == 1 and not idx_s.is_floating_point() \
                and not idx_t.is_floating_point() and idx_s.dtype != torch.bool and idx_t.dtype != torch.bool:
            indexed.append((b, idx_s, idx_t))  # measured together below
            continue
        pairs = avgpool_pairing(ns, nt) if name == "avgpool" else (idx_s, idx_t)
        out.hits += _sample_hit_rate(b, pairs, windows)
        out.samples += 1
    if indexed:
        # token-index pairs of equal length (the windows fix Ns and Nt): one lookup for all of them
        s = torch.stack([idx_s.detach().cpu().long() for _, idx_s, _ in indexed])  # (n, M)
        t = torch.stack([idx_t.detach().cpu().long() for _, _, idx_t in indexed])  # (n, M)
        ns, nt = shape
        if s.numel() and not (int(s.min()) >= 0 and int(s.max()) < ns and int(t.min()) >= 0 and int(t.max()) < nt):
            for b, idx_s, idx_t in indexed:  # the first sample out of range raises, naming itself
                _sample_hit_rate(b, (idx_s, idx_t), windows)
        rates = windows.cpu()[s, t].double().mean(1)  # (n,)
        out.hits += sum(rates.tolist())
        out.samples += len(indexed)
    return out


def _sample_hit_rate(b: int, pairs: tuple[torch.Tensor, torch.Tensor], windows: torch.Tensor) -> float:
    """:func:`window_hit_rate` of sample ``b``; its errors name the sample."""
    try:
        return window_hit_rate(pairs, windows)
    except ValueError as e:
        raise ValueError(f"sample {b}: {e}") from e


# ---- geometry of a student / teacher pair ----------------------------------------------------------------------
def _view_layout(image_processor: Any) -> tuple:
    """The image-processor settings that place the original image's pixels in the tower's square view."""
    def plain(value: Any) -> Any:
        return tuple(sorted(value.items())) if isinstance(value, dict) else value

    return tuple(plain(getattr(image_processor, name, None)) for name in _LAYOUT_ATTRIBUTES)


def _not_a_pool(student_side: Any, teacher_side: Any) -> str | None:
    """Why the student's tokens are not pools of the teacher's patch grid, or ``None`` when they are."""
    for role, side in (("student", student_side), ("teacher", teacher_side)):
        if not isinstance(side, EfficientMLLMSide):
            return (f"the {role}'s vision side is {type(side).__name__}, not this project's EfficientMLLMSide, whose "
                    "config gives the patch grid")
    s, t = student_side.config, teacher_side.config
    if s.compressor != "pool":
        return f"the student's compressor is {s.compressor!r}, not 'pool'"
    if t.compressor != "none":
        return f"the teacher's compressor is {t.compressor!r}, not 'none' (its tokens are not the patch grid)"
    if s.anyres or t.anyres:
        return "AnyRes is on: an image is several views, not one patch grid"
    s_tower = (s.tile_size, s.vision_config.patch_size)
    t_tower = (t.tile_size, t.vision_config.patch_size)
    if s_tower != t_tower:
        return f"the towers' (image_size, patch_size) differ: student {s_tower}, teacher {t_tower}"
    if _view_layout(student_side.image_processor) != _view_layout(teacher_side.image_processor):
        return "the image processors resize, crop or pad differently, so a patch covers another image region"
    return None


def pooling_geometry(student_adapter: Any, teacher_adapter: Any) -> torch.Tensor | None:
    """The student's pooling windows over the teacher's tokens, ``[p*p, g*g]`` bool, or ``None`` when the student's
    vision tokens are not pools of the teacher's patch grid.

    Read once per run from the adapters' vision sides (``adapter.side``; a teacher read from a cache,
    :class:`~emkd.cache.CachedTeacher`, carries the teacher's side too). The windows are those of
    :func:`pooling_windows` for ``p = pool_size`` and ``g = patch_grid`` when both sides are this project's
    :class:`~emkd.models.EfficientMLLMForCausalLM`. ``None``, with the reason logged at INFO, when:

    * either side is not an :class:`~emkd.models.EfficientMLLMSide`: the Hugging Face teachers
      (:mod:`emkd.models.teachers`) lay their tokens out by their own rules (a CLS token or a dropped first patch,
      AnyRes unpadding and newline tokens, Qwen2-VL's native resolution and 2 x 2 merges), which are not read here;
    * the student's ``compressor`` is not ``"pool"``, or the teacher's is not ``"none"`` (a pooled teacher's tokens
      are not the patch grid);
    * either side uses AnyRes: an image is a base view plus tiles, never one ``p*p`` / ``g*g`` grid (such samples
      would be skipped by :func:`batch_window_hits` anyway);
    * the towers' ``image_size`` or ``patch_size`` differ, so patch ``(r, c)`` covers another image region (even when
      the grid sides agree: 384/14 and 378/14 both give 27);
    * the image processors resize, centre-crop or pad differently (their ``do_resize``, ``size``, ``do_center_crop``,
      ``crop_size``, ``do_pad``, ``pad_size`` differ).
    """
    student_side = getattr(student_adapter, "side", None)
    teacher_side = getattr(teacher_adapter, "side", None)
    reason = _not_a_pool(student_side, teacher_side)
    if reason is not None:
        logger.info("match_in_window is not measured: %s", reason)
        return None
    config = student_side.config
    return pooling_windows(config.pool_size, config.patch_grid)


__all__ = [
    "WindowHits",
    "adaptive_segments",
    "avgpool_pairing",
    "batch_window_hits",
    "pooling_geometry",
    "pooling_windows",
    "random_hit_rate",
    "window_hit_rate",
]

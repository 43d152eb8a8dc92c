"""A teacher that reads its outputs from a cache: what training uses with ``teacher_cache: DIR``.

EM-KD, LLaVA-KD and the response-KD baselines read from the frozen teacher only its final hidden states (as the LM
head consumes them, SPEC §1) and its LM head, and the teacher gives every sample the same outputs in every epoch. A
cache holds exactly these (:mod:`emkd.cache.format`). Training from one loads no teacher model: :class:`CachedTeacher`
is a :class:`~emkd.models.DistillAdapter` that rebuilds, from the cache and the collated teacher side of a batch
(which the collator still renders: labels, masks, token ids), the :class:`~emkd.DistillInputs` the live teacher would
give (:func:`teacher_inputs`), checking per sample its number of real tokens, its token ids and its image-token
positions against the cache.

Align-TI cannot train from a cache: its TPA runs the teacher on candidates sampled from the student at every step.
"""

from __future__ import annotations

import os

import torch

from emkd.cache.fingerprint import ids_digest
from emkd.cache.format import CacheError
from emkd.cache.reader import TeacherCache
from emkd.data import PairDataset
from emkd.inputs import DistillInputs
from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide
from emkd.models.teachers import load_teacher_side


def sample_indices(side: dict[str, torch.Tensor]) -> list[int]:
    """The :class:`~emkd.data.PairDataset` indices of a collated side's samples (its ``index`` ``[B]``)."""
    if "index" not in side:
        raise ValueError(
            "the batch side has no 'index' (the samples' PairDataset indices); a cached teacher needs batches of "
            "PairCollator(..., with_index=True)"
        )
    return [int(i) for i in side["index"]]


def _check_sample(cache: TeacherCache, i: int, b: int, cached: dict[str, torch.Tensor], ids: torch.Tensor,
                  batch_ids: torch.Tensor, image_token_id: int | None) -> None:
    """Refuse cached sample ``i`` (batch row ``b``) when its real token ids ``ids`` ``[n]`` are not the cached ones."""
    n = ids.shape[0]
    if cached["hidden"].shape[0] != n:
        raise CacheError(
            f"teacher cache {cache.path}: sample {i} (batch row {b}) has cached hidden states of shape "
            f"{tuple(cached['hidden'].shape)} but {n} real tokens in the rendered teacher batch "
            f"(input_ids {tuple(batch_ids.shape)}); the cache was built from other data, template, "
            "max_length or teacher tokenizer"
        )
    if ids_digest(ids) != cache.index["samples"]["ids_sha256"][i]:
        raise CacheError(
            f"teacher cache {cache.path}: sample {i} (batch row {b}) has {n} tokens as cached, but its token "
            "ids differ from the cached ones; the cache was built from other data or another tokenizer"
        )
    vision = cached["vision"].to(ids.device)  # (n,)
    if image_token_id is not None and not torch.equal(vision, ids == image_token_id):
        raise CacheError(
            f"teacher cache {cache.path}: sample {i} (batch row {b}) has {int(vision.sum())} cached vision "
            f"positions, but its rendered ids have {int((ids == image_token_id).sum())} image tokens "
            f"(id {image_token_id}) at other positions"
        )


def teacher_inputs(
    cache: TeacherCache,
    side: dict[str, torch.Tensor],
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None = None,
    image_token_id: int | None = None,
) -> DistillInputs:
    """The teacher's :class:`~emkd.DistillInputs` for one collated teacher side, from the cache.

    Args:
        cache: the opened cache.
        side: the teacher side of a batch of :class:`~emkd.data.PairCollator` with ``with_index=True``:
            ``input_ids``, ``attention_mask``, ``labels``, ``instruction_mask`` ``[B, L]`` and ``index`` ``[B]``.
        head_weight, head_bias: the teacher's LM head ``[V, D]``, ``[V]`` (see :meth:`TeacherCache.head`); the hidden
            states are put on ``head_weight``'s device.
        image_token_id: the teacher's image token id; when given, each sample's cached vision positions must be
            exactly its ``input_ids == image_token_id`` positions.

    Returns:
        ``hidden`` ``[B, L, D]`` in the cache dtype, the cached states at every real position and zeros at
        padding; ``vision_mask`` from the cache; ``attention_mask``, ``labels``, ``instruction_mask`` from ``side``.

    Raises:
        CacheError: a sample whose number of real tokens, token ids or image-token positions differ from what was
            cached (the message names the sample's index and the shapes).
    """
    samples = sample_indices(side)
    device = head_weight.device
    attention = side["attention_mask"].to(device).bool()  # (B, L)
    input_ids = side["input_ids"].to(device)  # (B, L)
    B, L = attention.shape
    hidden = torch.zeros(B, L, cache.hidden_size, dtype=cache.dtype, device=device)  # (B, L, D)
    vision_mask = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    real_ids = input_ids[attention]  # (sum n,) every sample's real token ids, one after the other
    ids = real_ids.split(attention.sum(1).tolist())  # B x (n,)
    cached = [cache.sample(i) for i in samples]
    for b, i in enumerate(samples):  # counts and ids; the image-token positions once for the batch, below
        _check_sample(cache, i, b, cached[b], ids[b], input_ids, None)
    # the real positions in row-major order are the samples' cached positions one after the other
    vision = torch.cat([c["vision"] for c in cached]).to(device)  # (sum n,)
    if image_token_id is not None and not torch.equal(vision, real_ids == image_token_id):
        for b, i in enumerate(samples):  # the first sample that differs raises, naming itself
            _check_sample(cache, i, b, cached[b], ids[b], input_ids, image_token_id)
    hidden[attention] = torch.cat([c["hidden"] for c in cached]).to(device)
    vision_mask[attention] = vision
    instruction = side.get("instruction_mask")
    return DistillInputs(
        hidden=hidden,
        head_weight=head_weight,
        head_bias=head_bias,
        vision_mask=vision_mask,
        attention_mask=attention,
        labels=side["labels"].to(device),
        instruction_mask=None if instruction is None else instruction.to(device),
    )


class TeacherHead(torch.nn.Module):
    """The teacher's LM head read from a cache, frozen: ``weight`` ``[V, D]``, ``bias`` ``[V]`` or ``None``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` of hidden states ``[..., D]``."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class CachedTeacher(DistillAdapter):
    """A teacher whose outputs come from a :class:`~emkd.cache.reader.TeacherCache`.

    ``model`` is the teacher's LM head alone (:class:`TeacherHead`), which the trainer moves to its device and keeps
    frozen; ``side`` renders the teacher half of each batch (labels, masks, the ids that are checked against the
    cache). ``adapter(side)`` returns what the live teacher's adapter returns for the same batch (hidden states at
    real positions identical up to the cache dtype; zeros at padding), without logits.
    """

    needs_sample_index = True  # the cache is indexed by the samples' PairDataset indices

    def __init__(self, cache: TeacherCache, side: VisionSide) -> None:
        self.cache = cache
        self.side = side
        weight, bias = cache.head()
        self.model = TeacherHead(weight, bias)

    def __call__(self, batch: dict[str, torch.Tensor], attention_layer: int | None = None) -> AdapterOutput:
        if attention_layer is not None:
            raise NotImplementedError(
                f"teacher cache {self.cache.path} holds no attention maps: Align-TI's IVA and TPA need the teacher "
                "to run (TPA on candidates sampled at every step); train align_ti with the live teacher"
            )
        inputs = teacher_inputs(self.cache, batch, self.model.weight, self.model.bias, self.side.image_token_id)
        return AdapterOutput(inputs=inputs)

    def check_dataset(self, dataset: PairDataset) -> None:
        """Raise :class:`~emkd.cache.format.CacheError` when ``dataset`` is not the data the cache was built from
        (:meth:`TeacherCache.check_dataset`)."""
        self.cache.check_dataset(dataset)


def load_cached_teacher(cache_dir: str | os.PathLike, teacher_dir: str | os.PathLike | None = None) -> CachedTeacher:
    """Open a cache and the teacher's vision side (config, tokenizer, image processor; no weights).

    Args:
        cache_dir: a directory written by :func:`~emkd.cache.writer.cache_teacher`.
        teacher_dir: the teacher checkpoint (``None``: the directory recorded in the cache); its ``config.json`` and
            weights must be the ones the cache was built with.
    """
    cache = TeacherCache(cache_dir)
    teacher_dir = cache.index["teacher"]["dir"] if teacher_dir is None else teacher_dir
    cache.check_teacher(teacher_dir)
    return CachedTeacher(cache, load_teacher_side(teacher_dir))


__all__ = ["CachedTeacher", "TeacherHead", "load_cached_teacher", "sample_indices", "teacher_inputs"]

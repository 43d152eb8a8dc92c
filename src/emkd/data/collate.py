"""Batches of a distillation run: :class:`PairCollator` right-pads each side of a list of
:class:`~emkd.data.PairDataset` samples to a batch."""

from __future__ import annotations

from typing import Any

import torch

from emkd.inputs import IGNORE_INDEX
from emkd.models.base import VisionSide


class PairCollator:
    """Batch samples of :class:`~emkd.data.PairDataset`: right-pad each side to its longest sequence.

    Args:
        student_side, teacher_side: the sides whose ``collate_image_inputs`` batch the image inputs.
        pad_token_id: the id put in padded ``input_ids`` (``None``: the teacher tokenizer's ``pad_token_id``).
        with_index: also give each side ``index`` ``[B]`` long, the samples' :class:`~emkd.data.PairDataset`
            indices (what a teacher cache is looked up by; see :mod:`emkd.cache`). Every item then needs
            ``"index"``.

    Returns (when called on a list of samples): ``{"student": side, "teacher": side}``, each side with
    ``input_ids`` ``[B, L]`` long (padded with ``pad_token_id``), ``attention_mask`` ``[B, L]`` long (0 on padding),
    ``labels`` ``[B, L]`` long (``-100`` on padding), ``instruction_mask`` ``[B, L]`` bool (False on padding), and the
    side's collated image inputs. ``L`` differs between the two sides.
    """

    TEXT_KEYS = ("input_ids", "attention_mask", "labels", "instruction_mask")

    def __init__(
        self,
        student_side: VisionSide,
        teacher_side: VisionSide,
        pad_token_id: int | None = None,
        with_index: bool = False,
    ):
        if pad_token_id is None:
            pad_token_id = getattr(teacher_side.tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                raise ValueError("pad_token_id is None and the teacher tokenizer has no pad_token_id; pass one")
        self.student_side = student_side
        self.teacher_side = teacher_side
        self.pad_token_id = int(pad_token_id)
        self.with_index = with_index

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        batch = {
            "student": self._collate_side([it["student"] for it in items], self.student_side, "student"),
            "teacher": self._collate_side([it["teacher"] for it in items], self.teacher_side, "teacher"),
        }
        if self.with_index:
            missing = [b for b, it in enumerate(items) if "index" not in it]
            if missing:
                raise ValueError(
                    f"PairCollator(with_index=True): items {missing} of the batch have no 'index' (the PairDataset "
                    "index of the sample)"
                )
            index = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)  # (B,)
            for side in batch.values():
                side["index"] = index.clone()
        return batch

    def _collate_side(self, samples: list[dict[str, Any]], side: VisionSide, name: str) -> dict[str, torch.Tensor]:
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "instruction_mask": False}
        length = max(s["input_ids"].shape[0] for s in samples)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pads.items():
            first = samples[0][key]
            out = torch.full((len(samples), length), pad, dtype=first.dtype)  # (B, L)
            for b, s in enumerate(samples):
                out[b, : s[key].shape[0]] = s[key]
            batch[key] = out
        images = side.collate_image_inputs([s["image_inputs"] for s in samples])
        clash = set(images) & (set(batch) | {"index"})
        if clash:
            raise ValueError(f"{name} side: collated image inputs use reserved keys {sorted(clash)}")
        batch.update(images)
        return batch

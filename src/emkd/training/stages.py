"""What each training stage trains (LLaVA's two phases and LLaVA-KD's three).

| stage | trainable | used by |
| --- | --- | --- |
| ``align`` | projector | phase 1 of LLaVA / EM-KD (caption alignment) |
| ``dpt`` | projector | LLaVA-KD distilled pre-training |
| ``instruct`` | projector + language model (+ vision tower if asked) | phase 2 (instruction tuning) |
| ``sft`` | projector + language model (+ vision tower if asked) | LLaVA-KD supervised fine-tuning |
| ``dft`` | projector + language model (+ vision tower if asked) | LLaVA-KD distilled fine-tuning |
"""

from __future__ import annotations

import torch

PROJECTOR_ONLY = ("align", "dpt")
FULL = ("instruct", "sft", "dft")


def apply_stage(model: torch.nn.Module, stage: str, train_vision_tower: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` of the student's components for ``stage``; return trainable parameter counts by part.

    The model must expose ``vision_tower``, ``projector`` and ``language_model`` (as the student class does).
    """
    if stage not in PROJECTOR_ONLY + FULL:
        raise ValueError(f"stage must be one of {PROJECTOR_ONLY + FULL}, got {stage!r}")
    for part in ("vision_tower", "projector", "language_model"):
        if not hasattr(model, part):
            raise ValueError(f"apply_stage needs model.{part}; {type(model).__name__} has none")
    trainable = {
        "vision_tower": stage in FULL and train_vision_tower,
        "projector": True,
        "language_model": stage in FULL,
    }
    counts = {}
    for part, flag in trainable.items():
        params = list(getattr(model, part).parameters())
        for p in params:
            p.requires_grad_(flag)
        counts[part] = sum(p.numel() for p in params) if flag else 0
    return counts

"""The registry of training methods: what one step computes from a student, a teacher and a collated batch.

A method runs the models through their adapters (:class:`emkd.models.DistillAdapter`), hands the tensors to a loss
of :mod:`emkd.losses`, and returns the total with every component for logging. The student's loss runs inside the
student's forward (the adapter's ``loss_fn``), where FSDP and ZeRO-3 hold its LM head whole. The teacher always runs in eval mode
under ``torch.no_grad``; the student runs through ``model`` when the trainer passes its wrapped model (DDP, FSDP,
DeepSpeed), so gradients are synchronised.

| key | loss |
| --- | --- |
| ``sft`` | cross-entropy on response tokens (no teacher) |
| ``kd`` | vanilla KD: ``CE + KL(p_t || p_s)`` (``KDLoss("forward", 1, 1)``) |
| ``rkl`` | MiniLLM-style token-level reverse KL: ``0.5 CE + 0.5 KL(p_s || p_t)`` |
| ``llava_kd`` | LLaVA-KD MDist + RDist (LLaVA-KD* with matching when token counts differ) |
| ``align_ti`` | Align-TI: ``CE + IVA + KD + TPA`` |
| ``emkd`` | EM-KD: ``alpha SUP + (1 - alpha) RLD + beta VSD + gamma VLAD`` |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from emkd.losses import EMKDLoss, KDLoss, LlavaKDLoss
from emkd.losses.head import head_divergences
from emkd.losses.response import mean_or_zero
from emkd.models.base import DistillAdapter


@dataclass
class StepOutput:
    loss: torch.Tensor
    components: dict[str, float]


class Method(ABC):
    """One training objective. ``loss_kwargs`` are the recipe's ``loss:`` mapping (the papers' values by default)."""

    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = True

    def __init__(self, **loss_kwargs: Any) -> None:
        self.loss_kwargs = loss_kwargs

    @abstractmethod
    def __call__(
        self,
        student: DistillAdapter,
        teacher: DistillAdapter | None,
        batch: dict[str, dict[str, torch.Tensor]],
        model: torch.nn.Module | None = None,
    ) -> StepOutput:
        """Compute the loss of one micro-batch ``{"student": {...}, "teacher": {...}}``."""

    @staticmethod
    def run_teacher(teacher: DistillAdapter, side: dict[str, torch.Tensor], **kwargs: Any):
        with torch.no_grad():
            return teacher(side, **kwargs)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` under its exact ``name``; a second class with the same name is an error."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **loss_kwargs: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](**loss_kwargs)


@register_method
class SFT(Method):
    name = "sft"
    needs_teacher = False

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        unknown = set(self.loss_kwargs) - {"implementation", "chunk_size"}
        if unknown:
            raise ValueError(f"method 'sft' takes only implementation and chunk_size, got {sorted(unknown)}")

        def loss_fn(inputs):
            rows = head_divergences(inputs, inputs.response_hidden(), None, None, ("ce",),
                                    targets=inputs.response_targets, **self.loss_kwargs)["ce"]  # (R,)
            return mean_or_zero(rows, inputs.hidden)

        ce = student(batch["student"], model=model, loss_fn=loss_fn).loss_output
        return StepOutput(ce, {"loss": float(ce.detach()), "ce": float(ce.detach())})


class _LossMethod(Method):
    """A method that is one loss module applied to the two sides' DistillInputs."""

    def build_loss(self) -> torch.nn.Module:
        raise NotImplementedError

    def __init__(self, **loss_kwargs: Any) -> None:
        super().__init__(**loss_kwargs)
        self.loss_fn = self.build_loss()

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        if teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        t = self.run_teacher(teacher, batch["teacher"]).inputs
        out = student(batch["student"], model=model, loss_fn=lambda s: self.loss_fn(s, t)).loss_output
        return StepOutput(out.loss, out.components())


@register_method
class KD(_LossMethod):
    name = "kd"

    def build_loss(self):
        return KDLoss(**{"divergence": "forward", "ce_weight": 1.0, "kd_weight": 1.0, **self.loss_kwargs})


@register_method
class RKL(_LossMethod):
    name = "rkl"

    def build_loss(self):
        return KDLoss(**{"divergence": "reverse", "ce_weight": 0.5, "kd_weight": 0.5, **self.loss_kwargs})


@register_method
class LlavaKD(_LossMethod):
    name = "llava_kd"

    def build_loss(self):
        return LlavaKDLoss(**self.loss_kwargs)


@register_method
class EMKD(_LossMethod):
    name = "emkd"

    def build_loss(self):
        return EMKDLoss(**self.loss_kwargs)


@register_method
class AlignTI(Method):
    """Align-TI (``CE + IVA + KD + TPA``). ``loss_kwargs``: ``iva_layer`` (teacher layer of IVA's weights, set by
    the trainer from ``irs_layer`` / ``irs_file``), ``num_candidates`` (4), ``sampling`` (``nucleus``), ``top_p``
    (0.9), ``iva_matching`` (``auto``), ``temperature`` (1), ``vocab`` (``strict``), ``implementation``
    (``fused``)."""

    name = "align_ti"

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        from emkd.training.align_ti import align_ti_step

        if teacher is None:
            raise ValueError("method 'align_ti' needs a teacher")
        if "iva_layer" not in self.loss_kwargs:
            raise ValueError("method 'align_ti' needs iva_layer (set irs_layer= or irs_file= in the recipe)")
        loss, parts = align_ti_step(student, teacher, batch, student_model=model, **self.loss_kwargs)
        components = {k: float(parts[k].detach()) for k in ("ce", "iva", "kd", "tpa")}
        components["loss"] = float(loss.detach())
        return StepOutput(loss, components)

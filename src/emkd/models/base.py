"""The two interfaces between models, data and losses.

* :class:`VisionSide` says how one model sees images: which token id stands for an image token, how many of them one
  image expands to, and which tensors the model needs for a sample's images. The data pipeline renders every sample
  once per side with it, so the text is tokenized once, identically, and only the image tokens differ.
* :class:`DistillAdapter` runs one model on its side of a collated batch and returns what a loss needs
  (:class:`emkd.DistillInputs`, SPEC §1), plus, on request, the head-averaged attention of one layer (Align-TI).
  What Align-TI needs beyond that is part of the interface too: a forward under the ribbon mask and position ids
  (:meth:`DistillAdapter.augmented_forward`) and attention recording around any forward
  (:meth:`DistillAdapter.recording_attention`). An adapter that cannot do one of them raises a one-line
  ``NotImplementedError`` naming itself and what it cannot do. What an adapter needs from the data is part of the
  interface as well: whether batches carry the samples' indices (:attr:`DistillAdapter.needs_sample_index`) and a
  check of the data set before training (:meth:`DistillAdapter.check_dataset`); a teacher read from a cache needs
  both, a model that runs on the batch neither.

The student (:mod:`emkd.models.student`) and every supported teacher (:mod:`emkd.models.teachers`) implement both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from emkd.inputs import DistillInputs
from emkd.models.attention import AttentionRecord


class VisionSide(ABC):
    """How one model turns images into tokens.

    Attributes:
        tokenizer: the model's Hugging Face tokenizer (teacher and student must tokenize text identically).
        image_token_id: the id that marks an image token (a projector output) in ``input_ids``.
        image_wrapper: text placed before and after each image's tokens (e.g. Qwen2-VL's
            ``("<|vision_start|>", "<|vision_end|>")``); ``("", "")`` when there is none. The pair's renderer uses
            the teacher's wrapper on both sides so that the text tokens stay identical.
    """

    tokenizer: Any
    image_token_id: int
    image_wrapper: tuple[str, str] = ("", "")

    @abstractmethod
    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """Model inputs for one sample's images (PIL images, in order), e.g. ``{"pixel_values": [n, 3, H, W]}``."""

    @abstractmethod
    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        """How many image tokens image ``index`` of a sample expands to, given that sample's ``image_inputs``."""

    @abstractmethod
    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch the ``image_inputs`` of several samples (samples without images give ``{}``)."""


@dataclass
class AdapterOutput:
    """What a model shows the loss for one batch, plus the optional attention of one layer ``[B, L, L]``, and what
    a ``loss_fn`` run inside the forward returned (``loss_output``)."""

    inputs: DistillInputs
    attention: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss_output: Any = None


class DistillAdapter(ABC):
    """Runs one model on its side of a collated batch.

    A side of a batch is a dict with ``input_ids``, ``attention_mask``, ``labels`` and ``instruction_mask``
    (all ``[B, L]``) plus the collated image inputs of :meth:`VisionSide.collate_image_inputs`.

    Attributes:
        model: the model (for a teacher: frozen).
        side: its :class:`VisionSide`.
        image_keys: the keys of a batch side that hold image inputs the model's forward takes; the other keys
            (``labels``, ``instruction_mask``, Align-TI's bookkeeping) stay out of it.
        needs_sample_index: the adapter reads each sample's :class:`~emkd.data.PairDataset` index (``index``
            ``[B]``, :class:`~emkd.data.PairCollator` with ``with_index=True``); a model that runs on the batch
            does not (the default), a teacher that reads its outputs from a cache does.
    """

    model: torch.nn.Module
    side: VisionSide
    image_keys: tuple[str, ...] = ()
    needs_sample_index: bool = False

    @abstractmethod
    def __call__(self, batch: dict[str, torch.Tensor], attention_layer: int | None = None) -> AdapterOutput:
        """Forward the model and return :class:`AdapterOutput`; ``hidden`` is the final-norm output the LM head
        consumes and ``vision_mask`` marks exactly the positions the model filled with image features."""

    @property
    def num_layers(self) -> int:
        """Number of decoder layers (for Align-TI's IRS over layers)."""
        raise self.unsupported("num_layers (a count of decoder layers)")

    def check_dataset(self, dataset: Any) -> None:
        """Return when this adapter can run on batches of ``dataset`` (a :class:`~emkd.data.PairDataset`); raise
        when it cannot, before training starts. A model that runs on the batch accepts any data set (the default);
        a cached teacher refuses data the cache was not built from."""

    def images_of(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``batch`` under :attr:`image_keys`, unchanged."""
        return {key: batch[key] for key in self.image_keys if key in batch}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments the model's ``forward`` and ``generate`` take for a batch side: ``input_ids`` and
        ``attention_mask`` ``[B, L]`` and the entries under :attr:`image_keys`, on the model's device, floating image
        inputs in the model's dtype. An adapter whose model needs more (Qwen2-VL's ``mm_token_type_ids``) adds it."""
        device, dtype = self.model.device, self.model.dtype
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        for key, value in self.images_of(batch).items():
            value = value.to(device)
            inputs[key] = value.to(dtype) if value.is_floating_point() else value
        return inputs

    def recording_attention(self, layer: int) -> AbstractContextManager[AttentionRecord]:
        """A context manager that records the head-averaged attention probabilities ``[B, L, L]`` (float32) of
        decoder layer ``layer`` (negative counts from the end) during the forwards run inside it, as
        ``record.attention`` (:func:`emkd.models.attention.recorded_attention`: eager attention in that layer for the
        block, the previous implementation restored however it exits). Align-TI's IRS (Eq. 3) and IVA weights (Eq. 4).

        Raises:
            NotImplementedError: this adapter cannot record attention (the default).
        """
        raise self.unsupported("recording attention probabilities (Align-TI's IRS and IVA)")

    def check_augmented_forward(self) -> None:
        """Return when :meth:`augmented_forward` can run this model; raise ``NotImplementedError`` (one line,
        naming the adapter and the reason) when it cannot, before any model runs (the default)."""
        raise self.unsupported("the augmented forward of Align-TI's TPA (an additive 4D mask with position ids)")

    def augmented_forward(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, D]`` of the model on an augmented batch (Align-TI Fig. 9; SPEC §6).

        Args:
            batch: :func:`emkd.training.align_ti.build_tpa_batch`'s output: ``input_ids`` ``[B, T]``,
                ``attention_mask`` ``[B, 1, T, T]`` additive float mask (0 allowed, ``finfo.min`` masked; cast to the
                model's dtype here), ``position_ids`` ``[B, T]`` (the ribbon's), the image inputs under
                :attr:`image_keys`, and bookkeeping the forward ignores.
            model: runs the forward instead of :attr:`model` when given (a DDP wrapper). Gradients flow as the
                caller's autograd mode says.

        Raises:
            NotImplementedError: :meth:`check_augmented_forward` refuses this model.
        """
        self.check_augmented_forward()
        raise self.unsupported("the augmented forward of Align-TI's TPA")

    def unsupported(self, what: str) -> NotImplementedError:
        """The one-line error an adapter raises for a capability it lacks: ``"<class> does not support <what>"``."""
        return NotImplementedError(f"{type(self).__name__} does not support {what}")


def tokenizer_identity(tokenizer: Any) -> tuple[str, str]:
    """``(class name, pre-tokenizer)`` of a Hugging Face tokenizer; the pre-tokenizer as the ``tokenizers``
    library prints it (``"none"`` for a slow tokenizer or none at all)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None) if backend is not None else None
    return type(tokenizer).__name__, "none" if pre is None else str(pre)


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_tokenization(student_tokenizer: Any, teacher_tokenizer: Any) -> None:
    """Refuse a pair whose tokenizers disagree on a probe conversation (ids must be identical).

    Raises:
        ValueError: naming the first position where the ids differ and, when the two tokenizers are of different
            classes or pre-tokenizers (the same ``tokenizer.json`` loads as another class next to another
            ``config.json``), both classes and pre-tokenizers.
    """
    probe = [
        {"role": "user", "content": "Describe the image: what colour is the 3rd shape from the left?"},
        {"role": "assistant", "content": "It is a dark-blue triangle, 12 px wide."},
    ]
    texts = []
    for tok in (student_tokenizer, teacher_tokenizer):
        if getattr(tok, "chat_template", None):
            texts.append(tok.apply_chat_template(probe, tokenize=False))
        else:
            texts.append("\n".join(m["content"] for m in probe))
    ids_s = student_tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    ids_t = teacher_tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    if ids_s != ids_t or texts[0] != texts[1]:
        pos = next((i for i, (a, b) in enumerate(zip(ids_s, ids_t)) if a != b), min(len(ids_s), len(ids_t)))
        raise ValueError(
            "student and teacher tokenizers disagree on a probe conversation: "
            f"chat templates {'agree' if texts[0] == texts[1] else 'differ'}; ids differ from position {pos} "
            f"(student {ids_s[pos:pos + 5]}..., teacher {ids_t[pos:pos + 5]}...). Distillation needs identical text "
            "tokens; use tokenizers of the same family." + _identity_difference(student_tokenizer, teacher_tokenizer)
        )


def _identity_difference(student_tokenizer: Any, teacher_tokenizer: Any) -> str:
    """A sentence naming both tokenizers' classes and pre-tokenizers when they differ, else ``""``."""
    (s_class, s_pre), (t_class, t_pre) = tokenizer_identity(student_tokenizer), tokenizer_identity(teacher_tokenizer)
    if (s_class, s_pre) == (t_class, t_pre):
        return ""
    return (
        f" The tokenizers differ: the student's is {s_class} with pre-tokenizer {_short(s_pre)}, the teacher's is "
        f"{t_class} with pre-tokenizer {_short(t_pre)}. The same tokenizer.json can load as another class (which "
        "replaces its pre-tokenizer) next to another config.json: give the student the teacher's tokenizer files "
        "unchanged (emkd init-student --from-teacher copies them), or set tokenizer_class in tokenizer_config.json."
    )

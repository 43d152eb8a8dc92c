"""How the efficient student sees images (:class:`EfficientMLLMSide`) and what it shows a loss
(:class:`EfficientMLLMAdapter`), plus :func:`load_student` for a local student directory.

The side turns a sample's PIL images into ``{"pixel_values": [n, 3, S, S]}`` with the checkpoint's Hugging Face image
processor (``SiglipImageProcessor``/``CLIPImageProcessor``; with transformers 5 and no torchvision their ``...Pil``
variants, which :func:`load_student` asks for explicitly). With AnyRes it first lays each image out like LLaVA-NeXT:
resize to fit the best resolution of ``image_grid_pinpoints`` keeping the aspect ratio, pad centred with black,
cut into tiles of the tower's image size in raster order, and put the whole image (resized to one tile by the
processor) in front. A sample then gives ``pixel_values [n, 1 + T_max, 3, S, S]`` (tiles zero-padded to the sample's
largest count; the batch collate pads again) and ``image_sizes [n, 2]`` = original ``(height, width)``.

A student directory holds the model, tokenizer and image processor, all written by ``save_pretrained`` (see
:func:`emkd.models.tiny.save_tiny_student`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from emkd.inputs import DistillInputs
from emkd.models.attention import AttentionRecord, cast_additive_mask, recorded_attention
from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide
from emkd.models.student import (
    IMAGE_TOKEN,
    EfficientMLLMConfig,
    EfficientMLLMForCausalLM,
    anyres_views,
    image_model_inputs,
    pad_views,
)

IMAGE_KEYS = ("pixel_values", "image_sizes")


def processor_output_size(image_processor: Any) -> tuple[int, int]:
    """``(height, width)`` of the images a Hugging Face image processor returns (crop size if it centre-crops)."""
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if getattr(image_processor, "do_center_crop", False) and "height" in crop:
        return int(crop["height"]), int(crop["width"])
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    raise ValueError(
        f"cannot tell the output size of {type(image_processor).__name__} (size={size}, crop_size={crop}); give it "
        "size={'height': S, 'width': S} or a centre crop"
    )


class EfficientMLLMSide(VisionSide):
    """The student's :class:`~emkd.models.base.VisionSide`.

    Args:
        tokenizer: the student's tokenizer; its ``<image>`` id must be ``config.image_token_id``.
        image_processor: a Hugging Face image processor whose output size is the tower's ``image_size``.
        config: the student's :class:`~emkd.models.student.EfficientMLLMConfig`.
    """

    image_wrapper: tuple[str, str] = ("", "")

    def __init__(self, tokenizer: Any, image_processor: Any, config: EfficientMLLMConfig) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        if config.image_token_id is None:
            raise ValueError("EfficientMLLMConfig.image_token_id is None; set it to the tokenizer's '<image>' id")
        self.image_token_id = int(config.image_token_id)
        token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token_id != self.image_token_id:
            raise ValueError(
                f"tokenizer maps {IMAGE_TOKEN!r} to id {token_id}, but config.image_token_id={self.image_token_id}"
            )
        S = config.tile_size
        if processor_output_size(image_processor) != (S, S):
            raise ValueError(
                f"image processor outputs {processor_output_size(image_processor)} images, the vision tower reads "
                f"{(S, S)}"
            )

    # ---- images -> tensors --------------------------------------------------------------------------------------
    def anyres_views(self, image: Image.Image) -> list[Image.Image]:
        """LLaVA-NeXT layout of one image: ``[whole image] + rows x cols tiles`` (raster order), all PIL
        (:func:`emkd.models.student.anyres_views`)."""
        return anyres_views(image, self.config)

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        """``{"pixel_values": [n, 3, S, S]}``; AnyRes: ``{"pixel_values": [n, 1 + T_max, 3, S, S],
        "image_sizes": [n, 2]}``; ``{}`` for a sample without images (:func:`emkd.models.student.image_model_inputs`,
        which the checkpoint's own ``EfficientMLLMProcessor`` uses too)."""
        return image_model_inputs(images, self.image_processor, self.config)

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        """Image tokens of image ``index``: ``tokens_per_tile`` times its views (1, or 1 + tiles with AnyRes)."""
        if not self.config.anyres:
            return self.config.num_image_tokens()
        h, w = (int(x) for x in image_inputs["image_sizes"][index])
        return self.config.num_image_tokens((h, w))

    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Concatenate the samples' images in order (AnyRes: zero-pad the view axis to the batch's largest)."""
        items = [it for it in items if it]
        if not items:
            return {}
        if not self.config.anyres:
            return {"pixel_values": torch.cat([it["pixel_values"] for it in items])}
        pixels = pad_views([v for it in items for v in it["pixel_values"]])
        return {"pixel_values": pixels, "image_sizes": torch.cat([it["image_sizes"] for it in items])}


# ---- adapter ----------------------------------------------------------------------------------------------------
class EfficientMLLMAdapter(DistillAdapter):
    """Runs the student on its side of a collated batch and returns :class:`~emkd.models.base.AdapterOutput`.

    Args:
        model: the student.
        side: its :class:`EfficientMLLMSide`.
        return_logits: also return the full ``[B, L, V]`` logits (``AdapterOutput.logits``). The losses only need
            ``hidden`` and the head; pass ``False`` at real vocabulary sizes to skip the ``B x L x V`` tensor.
    """

    image_keys = IMAGE_KEYS

    def __init__(self, model: EfficientMLLMForCausalLM, side: EfficientMLLMSide, return_logits: bool = True) -> None:
        self.model = model
        self.side = side
        self.return_logits = return_logits

    @property
    def num_layers(self) -> int:
        return len(self.model.get_decoder().layers)

    def __call__(
        self,
        batch: dict[str, torch.Tensor],
        attention_layer: int | None = None,
        model: torch.nn.Module | None = None,
        loss_fn: Callable[[DistillInputs], Any] | None = None,
    ) -> AdapterOutput:
        """Forward the student; ``attention_layer`` asks for that decoder layer's head-averaged attention
        (:meth:`recording_attention`).

        ``model`` runs the forward instead of ``self.model`` when given: a trainer passes its wrapped model
        (DDP, FSDP, DeepSpeed) so that gradients are synchronised.

        ``loss_fn`` is called with the student's :class:`~emkd.DistillInputs` *inside* the model's forward, where
        the LM head is whole even when FSDP or ZeRO-3 shard it, and its result is returned as ``loss_output``.
        Without sharding, calling the loss on ``inputs`` afterwards is the same computation.
        """
        runner = self.model if model is None else model
        kwargs = dict(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            return_logits=self.return_logits,
            **self.images_of(batch),
        )
        if loss_fn is not None:
            kwargs["head_fn"] = lambda hidden, vision, head: loss_fn(self._inputs(batch, hidden, vision, head))
        attention = None
        if attention_layer is None:
            out = runner(**kwargs)
        else:
            with self.recording_attention(attention_layer) as record:
                out = runner(**kwargs)
            attention = record.attention  # (B, L, L)
        inputs = self._inputs(batch, out.hidden, out.vision_mask, self.model.get_output_embeddings())
        return AdapterOutput(inputs=inputs, attention=attention, logits=out.logits, loss_output=out.head_fn_output)

    @staticmethod
    def _inputs(
        batch: dict[str, torch.Tensor], hidden: torch.Tensor, vision_mask: torch.Tensor, head: torch.nn.Module
    ) -> DistillInputs:
        """The student's :class:`~emkd.DistillInputs` for ``batch``: the forward's final-norm ``hidden`` ``[B, L, D]``,
        the positions it filled with image features ``vision_mask`` ``[B, L]``, and the LM head."""
        return DistillInputs(
            hidden=hidden,
            head_weight=head.weight,
            vision_mask=vision_mask,
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            head_bias=head.bias,
            instruction_mask=batch.get("instruction_mask"),
        )

    def recording_attention(self, layer: int) -> AbstractContextManager[AttentionRecord]:
        """:func:`emkd.models.attention.recorded_attention` of the student's language model (its vision tower keeps
        its own implementation)."""
        return recorded_attention(self.model, layer)

    def check_augmented_forward(self) -> None:
        """The student class takes an additive 4D mask and 1D position ids: always supported."""

    def augmented_forward(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """See :meth:`~emkd.models.base.DistillAdapter.augmented_forward`; the mask is cast to the dtype of the
        input embeddings."""
        runner = self.model if model is None else model
        dtype = self.model.get_input_embeddings().weight.dtype
        device = batch["input_ids"].device
        out = runner(
            input_ids=batch["input_ids"],
            attention_mask=cast_additive_mask(batch["attention_mask"], dtype, device),
            position_ids=batch["position_ids"],
            use_cache=False,
            return_logits=False,
            **self.images_of(batch),
        )
        return out.hidden  # (B, T, D)


def load_student(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    image_processor_backend: str = "pil",
) -> tuple[EfficientMLLMForCausalLM, EfficientMLLMSide]:
    """Load ``(model, side)`` from a local directory holding the model, tokenizer and image processor.

    ``image_processor_backend="pil"`` asks transformers for the ``...Pil`` image processor, which needs no
    torchvision and is the one the tiny checkpoints are tested with.
    """
    side = load_student_side(path, image_processor_backend=image_processor_backend)
    model = EfficientMLLMForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
    if device is not None:
        model = model.to(device)
    return model, EfficientMLLMSide(side.tokenizer, side.image_processor, model.config)


def load_student_side(path: str | Path, *, image_processor_backend: str = "pil") -> EfficientMLLMSide:
    """The :class:`EfficientMLLMSide` of a local student directory (config, tokenizer, image processor), without
    loading the weights: enough to render data for this model."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_student: no config.json in {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, backend=image_processor_backend)
    return EfficientMLLMSide(tokenizer, image_processor, EfficientMLLMConfig.from_pretrained(path))


__all__ = [
    "EfficientMLLMAdapter",
    "EfficientMLLMSide",
    "load_student",
    "load_student_side",
    "processor_output_size",
]

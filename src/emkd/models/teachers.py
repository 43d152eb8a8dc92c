"""Teachers from Hugging Face checkpoints, behind the :class:`~emkd.models.base.DistillAdapter` interface.

A teacher is a vanilla multimodal LLM with many vision tokens. :func:`load_teacher` reads the ``architectures``
field of a local checkpoint's ``config.json``, looks it up (exact key) in :data:`TEACHER_REGISTRY`, and returns an
adapter whose model is frozen (``eval()``, ``requires_grad=False``) and whose :class:`VisionSide` counts image
tokens exactly as the model will produce them:

==========================================  ========================================================================
architecture                                image tokens per image
==========================================  ========================================================================
``LlavaForConditionalGeneration``           ``(H/p)·(W/p)`` patches (+1 CLS for a CLIP tower, −1 for the
                                            ``default`` feature strategy, which drops it)
``LlavaNextForConditionalGeneration``       AnyRes: base tile + unpadded tile grid + one newline per feature row,
                                            counted by ``LlavaNextProcessor._get_number_of_features``
``LlavaOnevisionForConditionalGeneration``  AnyRes with ``anyres_max_N`` down-sampling, counted by
                                            ``LlavaOnevisionProcessor._get_number_of_features``; an image of a
                                            multi-image sample is one tile + one newline
``Qwen2VLForConditionalGeneration``         ``grid_thw.prod() // merge_size**2``, wrapped in
``Qwen2_5_VLForConditionalGeneration``      ``<|vision_start|> … <|vision_end|>``
==========================================  ========================================================================

The counts come from the model's own config (patch size, feature strategy, grid pinpoints, merge size); the image
processor saved in the checkpoint only resizes and tiles, and it is checked against the model config where they
could disagree. ``"EfficientMLLMForCausalLM"`` (this project's student architecture, e.g. a distilled student used
as the teacher of a smaller one) is loaded through :func:`emkd.models.student_side.load_student`.

Attention for Align-TI. ``adapter(batch, attention_layer=l)`` returns the head-averaged attention of decoder layer
``l`` (``[B, L, L]``), and ``adapter.recording_attention(l)`` records it around any forward (Align-TI's augmented
pass). Both go through :mod:`emkd.models.attention`: a forward hook on that one layer's attention module, which runs
eager attention for that call only (the other layers keep SDPA when the teacher runs it); the other calls keep the
implementation the teacher was loaded with
(``load_teacher(path, attn_implementation=...)``). ``adapter.augmented_forward`` runs the TPA batch (additive 4D
mask, ribbon position ids) on LLaVA-family teachers and refuses Qwen2-VL / Qwen2.5-VL, whose 3D M-RoPE position ids
are computed from the token layout (:data:`MROPE_MODEL_TYPES`); Align-TI trains them with the loss option
``tpa: false`` (``CE + IVA + KD`` from normal passes, IVA's weights from a normal recording pass).

Hidden states. ``hidden`` is ``outputs.hidden_states[-1]``, which ``transformers`` ties to the decoder's
``last_hidden_state`` — the output of the final norm, exactly what the LM head consumes (the tests check
``hidden @ head_weight.T == logits``). Only that one hidden state is kept (``output_hidden_states=[-1]``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoImageProcessor, AutoTokenizer

from emkd.inputs import DistillInputs
from emkd.models.attention import AttentionRecord, cast_additive_mask, recorded_attention
from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide

#: model types whose position ids are 3D (M-RoPE): they cannot take Align-TI's ribbon position ids
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

# Extra tokens a vision tower puts before its patch tokens (CLIP's CLS); the ``default`` strategy removes one.
EXTRA_VISION_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


def _extra_vision_tokens(vision_config: Any) -> int:
    model_type = getattr(vision_config, "model_type", None)
    if model_type not in EXTRA_VISION_TOKENS:
        raise ValueError(
            f"unknown vision tower {model_type!r}: cannot tell how many non-patch tokens (CLS) it adds; known towers: "
            f"{sorted(EXTRA_VISION_TOKENS)}"
        )
    return EXTRA_VISION_TOKENS[model_type]


def _pad_tiles(pixel_values: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[n_i, P_i, 3, H, W]`` tile stacks into ``[sum n_i, max P_i, 3, H, W]`` with zero tiles.

    LLaVA-NeXT and OneVision recompute each image's tile count from ``image_sizes`` and drop the padding tiles.
    """
    most = max(p.shape[1] for p in pixel_values)
    padded = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixel_values]
    return torch.cat(padded, dim=0)


# ---- vision sides ---------------------------------------------------------------------------------------------


class _HFVisionSide(VisionSide):
    """Shared by the Hugging Face teachers: a tokenizer and image processor from the checkpoint directory."""

    def __init__(self, path: str | Path, config: Any, tokenizer: Any = None, image_processor: Any = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        self.image_processor = (
            image_processor if image_processor is not None else AutoImageProcessor.from_pretrained(path)
        )
        self.image_token_id = int(config.image_token_id)

    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item]
        if not items:
            return {}
        return {key: torch.cat([item[key] for item in items], dim=0) for key in items[0]}


class LlavaSide(_HFVisionSide):
    """LLaVA-1.5: every image becomes one fixed-size tile; ``pixel_values`` is ``[n, 3, H, W]``."""

    def __init__(self, path: str | Path, config: Any, **kwargs: Any) -> None:
        super().__init__(path, config, **kwargs)
        self.patch_size = int(config.vision_config.patch_size)
        self.extra_tokens = _extra_vision_tokens(config.vision_config)
        self.drop_first = config.vision_feature_select_strategy == "default"

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}  # [n, 3, H, W]

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        # LlavaProcessor.replace_image_token's count, with the CLS and strategy taken from the model config
        height, width = image_inputs["pixel_values"][index].shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.extra_tokens
        return int(count - self.drop_first)


class LlavaNextSide(_HFVisionSide):
    """LLaVA-NeXT AnyRes: ``pixel_values`` ``[n, tiles, 3, H, W]`` (base tile first) and ``image_sizes`` ``[n, 2]``."""

    def __init__(self, path: str | Path, config: Any, **kwargs: Any) -> None:
        super().__init__(path, config, **kwargs)
        _check_pinpoints(self.image_processor, config)
        self.drop_first = config.vision_feature_select_strategy == "default"
        self.counter = _NextTokenCounter(
            self.image_processor,
            patch_size=int(config.vision_config.patch_size),
            num_additional_image_tokens=_extra_vision_tokens(config.vision_config),
        )

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        orig_height, orig_width = (int(x) for x in image_inputs["image_sizes"][index])
        height, width = image_inputs["pixel_values"].shape[-2:]
        count = self.counter._get_number_of_features(orig_height, orig_width, height, width)
        return int(count - self.drop_first)

    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        items = [item for item in items if item]
        if not items:
            return {}
        return {
            "pixel_values": _pad_tiles([item["pixel_values"] for item in items]),  # [N, max tiles, 3, H, W]
            "image_sizes": torch.cat([item["image_sizes"] for item in items]),  # [N, 2]
        }


class LlavaOnevisionSide(LlavaNextSide):
    """LLaVA-OneVision: LLaVA-NeXT's AnyRes for a single-image sample; one tile per image in a multi-image sample.

    ``image_inputs`` adds ``batch_num_images`` ``[1]`` (images in the sample), which the model uses to tell the two
    cases apart; collation concatenates it, one entry per sample.
    """

    def __init__(self, path: str | Path, config: Any, **kwargs: Any) -> None:
        _HFVisionSide.__init__(self, path, config, **kwargs)
        _check_pinpoints(self.image_processor, config)
        self.drop_first = config.vision_feature_select_strategy == "default"
        vision = config.vision_config
        self.counter = _OnevisionTokenCounter(
            self.image_processor,
            num_image_tokens=(vision.image_size // vision.patch_size) ** 2,  # patch tokens of one tile
            vision_aspect_ratio=config.vision_aspect_ratio,
        )

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.image_processor(images=[list(images)], return_tensors="pt")  # one sample -> batch_num_images [n]
        return {
            "pixel_values": out["pixel_values"],
            "image_sizes": out["image_sizes"],
            "batch_num_images": torch.as_tensor(out["batch_num_images"]).reshape(-1),
        }

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        # LlavaOnevisionProcessor.replace_image_token for a one-sample image_inputs
        if int(image_inputs["batch_num_images"][0]) != 1:
            return int(self.counter.num_image_tokens + 1 - self.drop_first)  # base tile + newline
        return super().num_image_tokens(image_inputs, index)

    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = super().collate_image_inputs(items)
        if out:
            out["batch_num_images"] = torch.cat([item["batch_num_images"] for item in items if item])
        return out


class Qwen2VLSide(_HFVisionSide):
    """Qwen2-VL / Qwen2.5-VL at native resolution: ``pixel_values`` ``[patches, C·T·p·p]``, ``image_grid_thw``
    ``[n, 3]``.

    Each image is wrapped in ``<|vision_start|> … <|vision_end|>``: besides being the model's format, the wrapper
    keeps two images' tokens apart, which the 3D position ids (computed per run of image tokens) rely on.
    """

    def __init__(self, path: str | Path, config: Any, **kwargs: Any) -> None:
        super().__init__(path, config, **kwargs)
        vision = config.vision_config
        for name, model_value in (
            ("merge_size", vision.spatial_merge_size),
            ("patch_size", vision.patch_size),
            ("temporal_patch_size", vision.temporal_patch_size),
        ):
            processor_value = getattr(self.image_processor, name)
            if processor_value != model_value:
                raise ValueError(
                    f"{path}: image processor {name}={processor_value} but the model's vision_config has "
                    f"{model_value}; the checkpoint's preprocessor_config.json does not match its config.json"
                )
        self.merge_size = int(vision.spatial_merge_size)
        self.image_wrapper = (
            self.tokenizer.convert_ids_to_tokens(int(config.vision_start_token_id)),
            self.tokenizer.convert_ids_to_tokens(int(config.vision_end_token_id)),
        )

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        if not images:
            return {}
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        return int(image_inputs["image_grid_thw"][index].prod()) // self.merge_size**2


class _NextTokenCounter:
    """``LlavaNextProcessor``'s own AnyRes token count (its methods, borrowed), without building the processor."""

    _get_number_of_features = transformers.LlavaNextProcessor._get_number_of_features
    _get_unpadded_features = transformers.LlavaNextProcessor._get_unpadded_features

    def __init__(self, image_processor: Any, patch_size: int, num_additional_image_tokens: int) -> None:
        self.image_processor = image_processor  # the methods read image_processor.image_grid_pinpoints
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens


class _OnevisionTokenCounter:
    """``LlavaOnevisionProcessor``'s own AnyRes token count (its methods, borrowed).

    The processor itself cannot be built here: its constructor requires a video processor, and video processors
    need ``torchvision``.
    """

    _get_number_of_features = transformers.LlavaOnevisionProcessor._get_number_of_features
    _get_unpadded_features = transformers.LlavaOnevisionProcessor._get_unpadded_features

    def __init__(self, image_processor: Any, num_image_tokens: int, vision_aspect_ratio: str) -> None:
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = vision_aspect_ratio


def _check_pinpoints(image_processor: Any, config: Any) -> None:
    processor_points = [list(p) for p in image_processor.image_grid_pinpoints]
    model_points = [list(p) for p in config.image_grid_pinpoints]
    if processor_points != model_points:
        raise ValueError(
            f"the image processor tiles with image_grid_pinpoints={processor_points} but the model unpads with "
            f"{model_points}; the checkpoint's preprocessor_config.json does not match its config.json"
        )


# ---- adapter ----------------------------------------------------------------------------------------------------


class HFTeacherAdapter(DistillAdapter):
    """Runs a Hugging Face multimodal LLM on its side of a batch and shows the loss what it produced.

    Args:
        model: a frozen ``*ForConditionalGeneration`` model.
        side: its :class:`VisionSide`.
        mm_token_type_ids: pass ``mm_token_type_ids`` (image tokens = 1), which Qwen2-VL's 3D positions need.
        return_logits: also return the model's ``[B, L, V]`` logits (``AdapterOutput.logits``). The losses only need
            ``hidden`` and the head; set ``adapter.return_logits = False`` at real vocabulary sizes, and the model
            computes the logits of the last position only (``logits_to_keep=1``) and none are returned.
    """

    # image inputs any of the sides produces; other keys of the batch (labels, instruction_mask) stay out of forward
    image_keys = ("pixel_values", "image_sizes", "batch_num_images", "image_grid_thw")

    def __init__(
        self, model: torch.nn.Module, side: VisionSide, mm_token_type_ids: bool = False, return_logits: bool = True
    ) -> None:
        self.model = model
        self.side = side
        self.mm_token_type_ids = mm_token_type_ids
        self.return_logits = return_logits

    @property
    def num_layers(self) -> int:
        return len(self.model.get_decoder().layers)

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`DistillAdapter.model_inputs`, plus ``mm_token_type_ids`` ``[B, L]`` when the model needs them."""
        inputs = super().model_inputs(batch)
        if self.mm_token_type_ids:
            # 0 = text, 1 = image (M-RoPE groups runs of image tokens and gives them 3D positions)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.side.image_token_id).int()
        return inputs

    def __call__(self, batch: dict[str, torch.Tensor], attention_layer: int | None = None) -> AdapterOutput:
        """Forward the teacher (no gradient) on a batch side.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``labels``, optional ``instruction_mask`` (``[B, L]``), and the
                collated image inputs of :meth:`VisionSide.collate_image_inputs`.
            attention_layer: decoder layer whose head-averaged attention ``[B, L, L]`` to return (that layer runs
                eager attention for this call, see :meth:`recording_attention`).
        """
        inputs = self.model_inputs(batch)
        # keep only the last hidden state (the final-norm output); all logits unless the caller opted out
        forward = dict(output_hidden_states=[-1], use_cache=False, return_dict=True,
                       logits_to_keep=0 if self.return_logits else 1)
        if attention_layer is None:
            with torch.no_grad():
                out = self.model(**inputs, **forward)
            attention = None
        else:
            with torch.no_grad(), self.recording_attention(attention_layer) as record:
                out = self.model(**inputs, **forward)
            attention = record.attention  # [B, L, L]

        input_ids = inputs["input_ids"]
        head = self.model.get_output_embeddings()
        instruction_mask = batch.get("instruction_mask")
        distill = DistillInputs(
            hidden=out.hidden_states[-1],  # [B, L, D], final-norm output (tied to last_hidden_state)
            head_weight=head.weight,  # [V, D]
            head_bias=getattr(head, "bias", None),
            vision_mask=input_ids == self.side.image_token_id,  # [B, L]
            attention_mask=inputs["attention_mask"],
            labels=batch["labels"].to(input_ids.device),
            instruction_mask=None if instruction_mask is None else instruction_mask.to(input_ids.device),
        )
        return AdapterOutput(inputs=distill, attention=attention, logits=out.logits if self.return_logits else None)

    def recording_attention(self, layer: int) -> AbstractContextManager[AttentionRecord]:
        """:func:`emkd.models.attention.recorded_attention` of the teacher's language model (its vision tower keeps
        its own implementation)."""
        return recorded_attention(self.model, layer)

    def check_augmented_forward(self) -> None:
        """LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision (Qwen2 language models take a custom 4D mask and 1D position ids,
        in both "sdpa" and "eager") are supported; M-RoPE models raise ``NotImplementedError``."""
        model_type = getattr(self.model.config, "model_type", None)
        if model_type in MROPE_MODEL_TYPES or self.mm_token_type_ids:
            raise NotImplementedError(
                f"Align-TI's TPA is not supported for {type(self.model).__name__} (model_type {model_type!r}): its 3D "
                "M-RoPE position ids are computed from the token layout and cannot take the ribbon position ids. Use a "
                "LLaVA-family teacher, or train without TPA: set tpa: false under the recipe's loss: (Align-TI's "
                "CE + IVA + KD from normal passes)."
            )

    def augmented_forward(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """See :meth:`~emkd.models.base.DistillAdapter.augmented_forward`; inputs go through :meth:`model_inputs`
        (device, pixels in the model's dtype), the mask is cast to the model's dtype, and the model computes the
        logits of the last position only."""
        self.check_augmented_forward()
        inputs = self.model_inputs({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        device = inputs["input_ids"].device
        inputs["attention_mask"] = cast_additive_mask(batch["attention_mask"], self.model.dtype, device)
        inputs["position_ids"] = batch["position_ids"].to(device)
        runner = self.model if model is None else model
        out = runner(**inputs, output_hidden_states=[-1], use_cache=False, return_dict=True, logits_to_keep=1)
        return out.hidden_states[-1]  # (B, T, D), the final-norm output


# ---- registry and loading ---------------------------------------------------------------------------------------

TeacherLoader = Callable[..., DistillAdapter]
SideLoader = Callable[[str | Path], VisionSide]
TEACHER_REGISTRY: dict[str, TeacherLoader] = {}
TEACHER_SIDES: dict[str, SideLoader] = {}


def register_teacher(architecture: str, loader: TeacherLoader, side_loader: SideLoader | None = None) -> None:
    """Register ``loader(path, dtype=None, attn_implementation=None) -> DistillAdapter`` for ``architecture``, and
    optionally ``side_loader(path) -> VisionSide``, which builds the teacher's side without its weights
    (:func:`load_teacher_side`).

    Raises:
        ValueError: if ``architecture`` is already registered.
    """
    if architecture in TEACHER_REGISTRY:
        raise ValueError(f"teacher architecture {architecture!r} is already registered")
    TEACHER_REGISTRY[architecture] = loader
    if side_loader is not None:
        TEACHER_SIDES[architecture] = side_loader


def _hf_loader(model_class: str, side_class: type[_HFVisionSide], mm_token_type_ids: bool = False) -> TeacherLoader:
    def load(path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None):
        kwargs: dict[str, Any] = {}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = getattr(transformers, model_class).from_pretrained(path, **kwargs)
        return HFTeacherAdapter(model, side_class(path, model.config), mm_token_type_ids=mm_token_type_ids)

    load.__name__ = f"load_{model_class}"
    return load


def _hf_side_loader(side_class: type[_HFVisionSide]) -> SideLoader:
    def load_side(path: str | Path) -> VisionSide:
        return side_class(path, transformers.AutoConfig.from_pretrained(path))

    load_side.__name__ = f"load_{side_class.__name__}"
    return load_side


def _load_student_as_teacher(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> DistillAdapter:
    """This project's own architecture as a teacher (e.g. a distilled student teaching a smaller one)."""
    # imported here, not at the top: the student modules are a separate component that may import this one
    from emkd.models.student_side import EfficientMLLMAdapter, load_student

    model, side = load_student(path, dtype=dtype)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return EfficientMLLMAdapter(model, side)


def _load_student_side_as_teacher(path: str | Path) -> VisionSide:
    from emkd.models.student_side import load_student_side

    return load_student_side(path)


register_teacher(
    "LlavaForConditionalGeneration",
    _hf_loader("LlavaForConditionalGeneration", LlavaSide),
    _hf_side_loader(LlavaSide),
)
register_teacher(
    "LlavaNextForConditionalGeneration",
    _hf_loader("LlavaNextForConditionalGeneration", LlavaNextSide),
    _hf_side_loader(LlavaNextSide),
)
register_teacher(
    "LlavaOnevisionForConditionalGeneration",
    _hf_loader("LlavaOnevisionForConditionalGeneration", LlavaOnevisionSide),
    _hf_side_loader(LlavaOnevisionSide),
)
register_teacher(
    "Qwen2VLForConditionalGeneration",
    _hf_loader("Qwen2VLForConditionalGeneration", Qwen2VLSide, mm_token_type_ids=True),
    _hf_side_loader(Qwen2VLSide),
)
register_teacher(
    "Qwen2_5_VLForConditionalGeneration",
    _hf_loader("Qwen2_5_VLForConditionalGeneration", Qwen2VLSide, mm_token_type_ids=True),
    _hf_side_loader(Qwen2VLSide),
)
register_teacher("EfficientMLLMForCausalLM", _load_student_as_teacher, _load_student_side_as_teacher)


def checkpoint_architecture(path: str | Path) -> str:
    """The single entry of ``architectures`` in ``path/config.json``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; load_teacher takes a local checkpoint directory")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"{config_file}: expected exactly one entry in 'architectures', found {architectures}")
    return architectures[0]


def load_teacher(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str | None = None
) -> DistillAdapter:
    """Load a frozen teacher from a local checkpoint directory.

    Args:
        path: a directory with ``config.json``, weights, tokenizer and image processor (never a hub id).
        dtype: load the weights in this dtype (default: as ``transformers`` decides, i.e. the checkpoint's).
        attn_implementation: passed to ``from_pretrained``; ``"eager"`` is needed for ``attention_layer``.

    Returns:
        The adapter, its model in ``eval()`` mode with every parameter's ``requires_grad`` False.

    Raises:
        ValueError: the checkpoint's architecture is not in :data:`TEACHER_REGISTRY` (the message lists them).
    """
    architecture = checkpoint_architecture(path)
    if architecture not in TEACHER_REGISTRY:
        raise ValueError(
            f"{Path(path) / 'config.json'}: unsupported teacher architecture {architecture!r}; supported: "
            f"{', '.join(sorted(TEACHER_REGISTRY))}"
        )
    adapter = TEACHER_REGISTRY[architecture](path, dtype=dtype, attn_implementation=attn_implementation)
    adapter.model.eval()
    adapter.model.requires_grad_(False)
    return adapter


def load_teacher_side(path: str | Path) -> VisionSide:
    """The :class:`VisionSide` of a local teacher checkpoint, built from its config, tokenizer and image processor
    without loading the weights: enough to render data for the teacher (e.g. when its outputs come from a cache).

    Raises:
        ValueError: the checkpoint's architecture has no side loader in :data:`TEACHER_SIDES`.
    """
    architecture = checkpoint_architecture(path)
    if architecture not in TEACHER_SIDES:
        raise ValueError(
            f"{Path(path) / 'config.json'}: no vision side registered for teacher architecture {architecture!r}; "
            f"registered: {', '.join(sorted(TEACHER_SIDES))}"
        )
    return TEACHER_SIDES[architecture](path)

"""Tiny random-weight teacher checkpoints of every supported Hugging Face architecture, for tests and the demo.

Each builder uses the real configuration and model classes of ``transformers`` (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL) at toy sizes — hidden size 32, one or two layers, 32-pixel tiles cut into
8-pixel patches — and saves them with ``save_pretrained`` next to the tokenizer and a matching image processor, so
that :func:`emkd.models.teachers.load_teacher` takes exactly the path it takes for a downloaded checkpoint. The
vocabulary is the given tokenizer's (``len(tokenizer)``) and the image token is the tokenizer's ``"<image>"``
(``"<|image_pad|>"`` for the Qwen2-VL family). Every checkpoint is under 0.5 MB.

The LLaVA-1.5 and LLaVA-NeXT checkpoints also carry their Hugging Face processor (``processor_config.json``), an
independent count of image tokens for the tests. The OneVision and Qwen2-VL processors are not saved: they require a
video processor, and video processors require ``torchvision``.

The sizes are chosen so that the token bookkeeping is real — CLS removal, AnyRes tiles with unpadding and newline
tokens, OneVision's down-sampling and multi-image path, Qwen2-VL's 2x2 patch merge and 3D positions — not for the
numbers the models compute.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    BaseImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipVisionConfig,
)

TILE = 32  # pixels per side of one vision-tower input
PATCH = 8  # pixels per side of one ViT patch -> (32 / 8)^2 = 16 patches per tile
TEXT_HIDDEN = 32
VISION_HIDDEN = 32
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # AnyRes grids: up to 2 x 2 tiles


# (model, image processor, Hugging Face processor or None)
Built = tuple[PreTrainedModel, BaseImageProcessor, ProcessorMixin | None]


def _text_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict:
    """Qwen2-style decoder: 2 layers, 4 heads of 8 dims (2 KV heads), untied head, the tokenizer's vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )


def _vision_kwargs() -> dict:
    return dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token; build it with emkd.models.build_tokenizer")
    return token_id


def _llava(tokenizer: PreTrainedTokenizerBase) -> Built:
    """LLaVA-1.5: CLIP tower (with CLS), ``default`` strategy drops the CLS -> 16 tokens per image."""
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(), projection_dim=VISION_HIDDEN),
        text_config=Qwen2Config(**_text_kwargs(tokenizer)),
        image_token_id=_token_id(tokenizer, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(TILE // PATCH) ** 2,
        tie_word_embeddings=False,
    )
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=tokenizer.chat_template,
    )
    return LlavaForConditionalGeneration(config), image_processor, processor


def _llava_next(tokenizer: PreTrainedTokenizerBase) -> Built:
    """LLaVA-NeXT: CLIP tower, AnyRes over ``PINPOINTS`` with unpadding and a newline token per feature row."""
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs(), projection_dim=VISION_HIDDEN),
        text_config=Qwen2Config(**_text_kwargs(tokenizer)),
        image_token_id=_token_id(tokenizer, "<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    return LlavaNextForConditionalGeneration(config), image_processor, processor


def _llava_onevision(tokenizer: PreTrainedTokenizerBase) -> Built:
    """LLaVA-OneVision: SigLIP tower (no CLS, ``full`` strategy), AnyRes with ``anyres_max_N`` down-sampling.

    ``anyres_max_2`` (real checkpoints use 9) makes a 2 x 2-tile image exceed the budget, so the tests exercise the
    down-sampling branch; a 1 x 2-tile image does not.
    """
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vision_kwargs()),
        text_config=Qwen2Config(**_text_kwargs(tokenizer)),
        image_token_id=_token_id(tokenizer, "<image>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_2",  # more than 1.1^2 x 2 tiles of features (2 x 16) is down-sampled
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
    )
    return LlavaOnevisionForConditionalGeneration(config), image_processor, None


def _qwen_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    return dict(
        image_token_id=_token_id(tokenizer, "<|image_pad|>"),
        video_token_id=_token_id(tokenizer, "<|video_pad|>"),
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
        vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
    )


def _qwen_text_config(tokenizer: PreTrainedTokenizerBase) -> dict:
    # head_dim 8 -> 4 rotary frequencies, split over (temporal, height, width) as 2 + 1 + 1
    return dict(_text_kwargs(tokenizer), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": [2, 1, 1]})


def _qwen_processor() -> Qwen2VLImageProcessorPil:
    """Patches of 8 px merged 2 x 2: every image is resized to multiples of 16 px, between 16x16 and 64x64 px."""
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64
    )


def _qwen2_vl(tokenizer: PreTrainedTokenizerBase) -> Built:
    """Qwen2-VL: native-resolution ViT, 2 x 2 patch merge, 3D (M-RoPE) positions."""
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=VISION_HIDDEN, hidden_size=TEXT_HIDDEN, num_heads=2, mlp_ratio=2,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2),
        text_config=_qwen_text_config(tokenizer),
        **_qwen_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return Qwen2VLForConditionalGeneration(config), _qwen_processor(), None


def _qwen2_5_vl(tokenizer: PreTrainedTokenizerBase) -> Built:
    """Qwen2.5-VL: as Qwen2-VL with windowed attention in the ViT (one full-attention block) and SwiGLU."""
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=64, num_heads=2,
                           out_hidden_size=TEXT_HIDDEN, patch_size=PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]),
        text_config=_qwen_text_config(tokenizer),
        **_qwen_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(), None


TINY_TEACHERS: dict[str, Callable[[PreTrainedTokenizerBase], Built]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
}


def save_tiny_teacher(
    kind: str, directory: str | Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> Path:
    """Build a tiny random-weight teacher of ``kind`` and save it, its tokenizer and image processor to ``directory``.

    Args:
        kind: one of ``"llava"``, ``"llava_next"``, ``"llava_onevision"``, ``"qwen2_vl"``, ``"qwen2_5_vl"``.
        directory: where to write ``config.json``, the weights, the tokenizer and ``preprocessor_config.json``.
        tokenizer: a tokenizer with the image special tokens (:func:`emkd.models.build_tokenizer`); the model's
            vocabulary is ``len(tokenizer)``.
        seed: seeds the random initialisation, so a kind and a seed always give the same weights.

    Returns:
        ``directory`` as a :class:`~pathlib.Path`, ready for :func:`emkd.models.teachers.load_teacher`.
    """
    if kind not in TINY_TEACHERS:
        raise ValueError(f"unknown tiny teacher kind {kind!r}; expected one of {sorted(TINY_TEACHERS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, image_processor, processor = TINY_TEACHERS[kind](tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    if processor is not None:
        processor.save_pretrained(directory)
    return directory

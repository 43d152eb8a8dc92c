"""Tiny random-weight checkpoints of the real classes, for tests and the demo.

A tiny student is an :class:`~emkd.models.student.EfficientMLLMForCausalLM` with a 2-layer SigLIP vision tower
(32 px images, 8 px patches: a 4 x 4 patch grid) and a 2-layer Qwen2 language model of hidden size 32-64 over the
vocabulary of a tokenizer from :func:`emkd.models.tokenizer.build_tokenizer`. Weights are drawn from a seed, so the
same arguments always give the same checkpoint, and the global RNG state is left untouched. The same builders make
a "vanilla" teacher of the same class with ``compressor="none"`` (every patch token) and a different hidden size.

Saved directories hold the model (safetensors), the tokenizer and a ``SiglipImageProcessor`` config, so that
:func:`emkd.models.student_side.load_student` reads them exactly as it reads a real checkpoint. Every tiny model stays
well under 2 MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Config, SiglipImageProcessorPil, SiglipVisionConfig

from emkd.models.student import EfficientMLLMConfig, EfficientMLLMForCausalLM
from emkd.models.student_side import IMAGE_TOKEN


def tiny_student_config(
    tokenizer: Any,
    *,
    pool_size: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    text_hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    compressor: str = "pool",
    anyres: bool = False,
    image_grid_pinpoints: list[list[int]] | None = None,
    tie_word_embeddings: bool = True,
    max_positions: int = 1024,
) -> EfficientMLLMConfig:
    """Config of a tiny student (SigLIP vision tower + Qwen2 LM) over ``tokenizer``'s vocabulary.

    ``compressor="none"`` gives the vanilla variant: ``(image_size // patch_size) ** 2`` tokens per view.
    """
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,  # the pooling head is unused by an MLLM
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return EfficientMLLMConfig(
        vision_config=vision,
        text_config=text,
        compressor=compressor,
        pool_size=pool_size,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=vision_feature_layer,
        anyres=anyres,
        image_grid_pinpoints=image_grid_pinpoints,
    )


def tiny_image_processor(image_size: int = 32) -> SiglipImageProcessorPil:
    """A SigLIP image processor (PIL backend, no torchvision needed) that outputs ``image_size`` square images."""
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def build_tiny_student(tokenizer: Any, seed: int = 0, **config_kwargs: Any) -> EfficientMLLMForCausalLM:
    """A tiny student with weights drawn from ``seed`` (global RNG state untouched), in eval mode.

    ``config_kwargs`` go to :func:`tiny_student_config`.
    """
    config = tiny_student_config(tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EfficientMLLMForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_tiny_student(directory: str | Path, tokenizer: Any, seed: int = 0, **config_kwargs: Any) -> Path:
    """Build a tiny student and save model, tokenizer and image processor into ``directory``; return its path.

    Raises:
        ValueError: if the saved weights reach 2 MB (a tiny checkpoint should never get that large).
    """
    directory = Path(directory)
    model = build_tiny_student(tokenizer, seed=seed, **config_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tiny_image_processor(model.config.tile_size).save_pretrained(directory)
    size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    if size >= 2 * 1024 * 1024:
        raise ValueError(f"tiny student in {directory} has {size} bytes of weights; keep tiny models under 2 MB")
    return directory


__all__ = ["build_tiny_student", "save_tiny_student", "tiny_image_processor", "tiny_student_config"]

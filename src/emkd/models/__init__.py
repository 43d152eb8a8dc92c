"""Models: the efficient student, teacher adapters, and offline tokenizers."""

from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide, check_same_tokenization
from emkd.models.tokenizer import build_tokenizer

__all__ = ["AdapterOutput", "DistillAdapter", "VisionSide", "build_tokenizer", "check_same_tokenization"]

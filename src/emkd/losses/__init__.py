"""Distillation losses. Pure functions of :class:`emkd.DistillInputs`; modules only hold hyperparameters."""

from emkd.losses.align_ti import (
    additive_attention_mask,
    instruction_relevance_score,
    instruction_vision_attention,
    iva_loss,
    iva_total,
    ribbon_attention_mask,
)
from emkd.losses.divergence import forward_kl, jsd, reverse_kl
from emkd.losses.emkd import EMKDLoss, EMKDOutput
from emkd.losses.fused import fused_head_divergences, fused_head_gram
from emkd.losses.head import head_divergences
from emkd.losses.kd import KDLoss, KDOutput
from emkd.losses.llava_kd import LlavaKDLoss, LlavaKDOutput
from emkd.losses.normalisation import LossTerms, Term
from emkd.losses.sft import SFTLoss, SFTOutput

__all__ = [
    "EMKDLoss",
    "EMKDOutput",
    "KDLoss",
    "KDOutput",
    "LlavaKDLoss",
    "LlavaKDOutput",
    "LossTerms",
    "SFTLoss",
    "SFTOutput",
    "Term",
    "additive_attention_mask",
    "forward_kl",
    "fused_head_divergences",
    "fused_head_gram",
    "head_divergences",
    "instruction_relevance_score",
    "instruction_vision_attention",
    "iva_loss",
    "iva_total",
    "jsd",
    "reverse_kl",
    "ribbon_attention_mask",
]

"""emkd: distill efficient multimodal LLMs (few vision tokens) from vanilla teachers (many vision tokens).

The public names are fixed in the method contract (SPEC): :class:`DistillInputs` is what a model shows a loss;
:func:`l1_cost` and :func:`hungarian_match` pair unbalanced vision tokens; :class:`EMKDLoss`, :class:`LlavaKDLoss`
and :class:`KDLoss` are the losses; :func:`ribbon_attention_mask` serves Align-TI's parallel TPA.
"""

from emkd.inputs import DistillInputs
from emkd.losses import EMKDLoss, KDLoss, LlavaKDLoss, ribbon_attention_mask
from emkd.matching import hungarian_match, l1_cost
from emkd import models  # noqa: F401  (registers the student's model_type "emkd_mllm" with the Auto classes)

__version__ = "0.1.0"

__all__ = [
    "DistillInputs",
    "EMKDLoss",
    "KDLoss",
    "LlavaKDLoss",
    "hungarian_match",
    "l1_cost",
    "ribbon_attention_mask",
]

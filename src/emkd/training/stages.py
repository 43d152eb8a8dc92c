"""What each training stage trains (LLaVA's two phases and LLaVA-KD's three), and at which learning rate.

| stage | trainable | used by |
| --- | --- | --- |
| ``align`` | projector | phase 1 of LLaVA / EM-KD (caption alignment) |
| ``dpt`` | projector | LLaVA-KD distilled pre-training |
| ``instruct`` | projector + language model (+ vision tower if asked) | phase 2 (instruction tuning) |
| ``sft`` | projector + language model (+ vision tower if asked) | LLaVA-KD supervised fine-tuning |
| ``dft`` | projector + language model (+ vision tower if asked) | LLaVA-KD distilled fine-tuning |

Each part trains at its own peak learning rate under the one schedule (:func:`param_groups`): the recipe's
``learning_rate`` for the language model, ``projector_lr`` and ``vision_tower_lr`` where set (LLaVA-OneVision trains
its tower at a fifth of the LLM's rate). A module the trainer adds to the student for a loss (EM-KD's ``vsd_projector``,
:mod:`emkd.training.trainer`) is a part of its own.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

PROJECTOR_ONLY = ("align", "dpt")
FULL = ("instruct", "sft", "dft")
# the student's parts, the language model first: its group comes first, and transformers logs the first group's rate
PARTS = ("language_model", "projector", "vision_tower")


def trained_parts(stage: str, train_vision_tower: bool = False) -> dict[str, bool]:
    """Whether ``stage`` trains each of :data:`PARTS`; ``train_vision_tower`` counts in the full stages only."""
    if stage not in PROJECTOR_ONLY + FULL:
        raise ValueError(f"stage must be one of {PROJECTOR_ONLY + FULL}, got {stage!r}")
    return {
        "vision_tower": stage in FULL and train_vision_tower,
        "projector": True,
        "language_model": stage in FULL,
    }


def apply_stage(model: torch.nn.Module, stage: str, train_vision_tower: bool = False) -> dict[str, int]:
    """Set ``requires_grad`` of the student's components for ``stage``; return trainable parameter counts by part.

    The model must expose ``vision_tower``, ``projector`` and ``language_model`` (as the student class does).
    """
    trainable = trained_parts(stage, train_vision_tower)
    for part in PARTS:
        if not hasattr(model, part):
            raise ValueError(f"apply_stage needs model.{part}; {type(model).__name__} has none")
    counts = {}
    for part, flag in trainable.items():
        params = list(getattr(model, part).parameters())
        for p in params:
            p.requires_grad_(flag)
        counts[part] = sum(p.numel() for p in params) if flag else 0
    return counts


def part_of(name: str, parts: Iterable[str]) -> str | None:
    """The part a parameter belongs to: the first component of its dotted ``name`` that is one of ``parts``.

    Wrappers only add components in front (FSDP's ``_fsdp_wrapped_module.vision_tower...``), and a part's own
    submodules come after it (``language_model.model.layers.0...``), so the first match is the part.
    """
    parts = set(parts)
    return next((c for c in name.split(".") if c in parts), None)


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    learning_rates: dict[str, float],
    weight_decay: float,
    decay_names: set[str],
) -> list[dict]:
    """Optimizer parameter groups of the trainable parameters: one per part and weight-decay flag.

    Args:
        named_parameters: ``model.named_parameters()`` of the model the optimizer updates.
        learning_rates: peak learning rate of each part, in the order the groups should come (the first part's
            first group is the one ``transformers`` logs as ``learning_rate``); every trainable parameter must
            belong to one of them (:func:`part_of`).
        weight_decay: AdamW's decay for the parameters in ``decay_names``; the others (biases, norms, as
            ``Trainer.get_decay_parameter_names`` says) get none.

    Returns:
        ``[{"params", "lr", "weight_decay", "name"}, ...]`` without empty groups; ``name`` is the part. A
        scheduler scales every group's ``lr`` by the same factor, so the parts keep their ratios all along.

    Raises:
        ValueError: a trainable parameter belongs to none of the parts (named, with the parts).
    """
    grouped: dict[tuple[str, bool], list[torch.nn.Parameter]] = {
        (part, decay): [] for part in learning_rates for decay in (True, False)
    }
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        part = part_of(name, learning_rates)
        if part is None:
            raise ValueError(f"trainable parameter {name} belongs to none of the parts {sorted(learning_rates)}: "
                             "it would get no learning rate")
        grouped[part, name in decay_names].append(param)
    return [
        {"params": params, "lr": learning_rates[part], "weight_decay": weight_decay if decay else 0.0, "name": part}
        for (part, decay), params in grouped.items()
        if params
    ]


def describe_groups(groups: list[dict]) -> list[str]:
    """One line per part: its trainable parameter count and peak learning rate (for the run's start)."""
    counts: dict[str, int] = {}
    rates: dict[str, float] = {}
    for group in groups:
        counts[group["name"]] = counts.get(group["name"], 0) + sum(p.numel() for p in group["params"])
        rates[group["name"]] = group["lr"]
    width = max((len(part) for part in counts), default=0)
    return [f"{part:<{width}}  {counts[part]:>13,} trainable  lr {rates[part]:g}" for part in counts]

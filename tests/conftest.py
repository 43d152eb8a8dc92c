"""Shared helpers for the loss tests: a builder of consistent (student, teacher) batches, and tensor plumbing.

A test describes a batch as one :class:`SampleSpec` per sample. Both sides see the same conversation, laid out as

    [prefix text][image: ns (student) or nt (teacher) tokens][suffix text][response][right padding]

so the K = prefix + suffix + response text tokens and the response targets are the same on both sides, while the
image tokens (and so the offsets of everything after them) differ. Padding positions get random hidden states, like
a real model's, so any loss that forgets a mask picks up garbage.

The helpers are plain functions, imported by the test modules (``from conftest import make_pair``).
"""

from __future__ import annotations

import pytest
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from emkd import DistillInputs

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SampleSpec:
    """Layout of one sample; every field counts tokens.

    Args:
        prefix: text tokens before the image (system prompt, start of the user turn); the image offset.
        ns: student image tokens.
        nt: teacher image tokens.
        suffix: text tokens after the image (the instruction; ``instruction_mask`` is set here).
        response: supervised response tokens (their labels are the response targets).
        pad: right padding added beyond this sample's real length (the longest sample sets ``L``).
    """

    prefix: int
    ns: int
    nt: int
    suffix: int
    response: int
    pad: int = 0


def _side(
    samples: Sequence[SampleSpec],
    counts: Sequence[int],
    dim: int,
    vocab: int,
    bias: bool,
    targets: Sequence[torch.Tensor],
    gen: torch.Generator,
    logit_scale: float,
) -> DistillInputs:
    real = [s.prefix + n + s.suffix + s.response for s, n in zip(samples, counts)]
    B = len(samples)
    L = max(r + s.pad for r, s in zip(real, samples))
    hidden = torch.randn(B, L, dim, generator=gen)  # (B, L, D), padding included
    vision = torch.zeros(B, L, dtype=torch.bool)
    instruction = torch.zeros(B, L, dtype=torch.bool)
    attention = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for b, (s, n) in enumerate(zip(samples, counts)):
        if s.response > 0 and s.prefix + n + s.suffix == 0:
            raise ValueError(f"sample {b}: a response needs at least one token before it, got {s}")
        vision[b, s.prefix : s.prefix + n] = True
        instruction[b, s.prefix + n : s.prefix + n + s.suffix] = True
        start = s.prefix + n + s.suffix  # first response token; position start - 1 predicts it
        labels[b, start : start + s.response] = targets[b]
        attention[b, : real[b]] = 1
    weight = torch.randn(vocab, dim, generator=gen) * (logit_scale / math.sqrt(dim))  # (V, D)
    head_bias = torch.randn(vocab, generator=gen) * 0.5 if bias else None  # (V,)
    return DistillInputs(
        hidden=hidden,
        head_weight=weight,
        vision_mask=vision,
        attention_mask=attention,
        labels=labels,
        head_bias=head_bias,
        instruction_mask=instruction,
    )


def make_pair(
    samples: Sequence[SampleSpec],
    *,
    ds: int = 12,
    dt: int = 16,
    vs: int = 37,
    vt: int | None = None,
    student_bias: bool = False,
    teacher_bias: bool = False,
    seed: int = 0,
    logit_scale: float = 2.5,
) -> tuple[DistillInputs, DistillInputs]:
    """A consistent ``(student, teacher)`` pair of float32 ``DistillInputs`` (no tensor requires grad).

    Response targets are drawn below ``min(vs, vt)`` so the pair also works with ``vocab="crop"``.
    """
    vt = vs if vt is None else vt
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randint(0, min(vs, vt), (s.response,), generator=gen) for s in samples]
    student = _side(samples, [s.ns for s in samples], ds, vs, student_bias, targets, gen, logit_scale)
    teacher = _side(samples, [s.nt for s in samples], dt, vt, teacher_bias, targets, gen, logit_scale)
    return student, teacher


def with_leaves(
    inputs: DistillInputs, dtype: torch.dtype | None = None, requires_grad: bool = True
) -> DistillInputs:
    """A copy whose ``hidden``, ``head_weight`` and ``head_bias`` are fresh leaf tensors (optionally cast)."""

    def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach().clone()
        if dtype is not None:
            t = t.to(dtype)
        return t.requires_grad_(requires_grad)

    return dataclasses.replace(
        inputs, hidden=leaf(inputs.hidden), head_weight=leaf(inputs.head_weight), head_bias=leaf(inputs.head_bias)
    )


def select(inputs: DistillInputs, index: Sequence[int]) -> DistillInputs:
    """The sub-batch of the given samples (same ``L``, same head)."""
    idx = torch.tensor(list(index), dtype=torch.long)
    return dataclasses.replace(
        inputs,
        hidden=inputs.hidden[idx],
        vision_mask=inputs.vision_mask[idx],
        attention_mask=inputs.attention_mask[idx],
        labels=inputs.labels[idx],
        instruction_mask=None if inputs.instruction_mask is None else inputs.instruction_mask[idx],
    )


def permute_vision(inputs: DistillInputs, perms: Sequence[Sequence[int]]) -> DistillInputs:
    """Reorder each sample's image tokens: new image token ``j`` of sample ``b`` is old image token ``perms[b][j]``."""
    hidden = inputs.hidden.detach().clone()
    for b, perm in enumerate(perms):
        pos = inputs.vision_mask[b].nonzero().squeeze(1)  # (N,)
        hidden[b, pos] = inputs.hidden[b, pos[torch.as_tensor(list(perm), dtype=torch.long)]].detach()
    return dataclasses.replace(inputs, hidden=hidden)


def padding_positions(inputs: DistillInputs) -> list[tuple[int, int]]:
    """``(b, i)`` of every padding position."""
    return [tuple(int(x) for x in bi) for bi in (~inputs.attention_mask.bool()).nonzero()]


def real_positions(inputs: DistillInputs) -> list[tuple[int, int]]:
    """``(b, i)`` of every real (non-padding) position."""
    return [tuple(int(x) for x in bi) for bi in inputs.attention_mask.bool().nonzero()]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the data-scan cache of the tests out of the user's ~/.cache."""
    import os

    old = os.environ.get("EMKD_CACHE")
    os.environ["EMKD_CACHE"] = str(tmp_path_factory.mktemp("emkd-cache"))
    yield
    if old is None:
        os.environ.pop("EMKD_CACHE", None)
    else:
        os.environ["EMKD_CACHE"] = old


class StopAt(TrainerCallback):
    """Stops training after step ``step`` (``0`` or ``None``: never), as an interruption would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.step and state.global_step >= self.step:
            control.should_training_stop = True
        return control


#: node ids of the Triton kernel checks this process leaves to a fresh interpreter process (tests/test_l1_triton.py)
TRITON_INTERPRETER_ITEMS = pytest.StashKey[list]()


@pytest.hookimpl(trylast=True)  # after -k / -m have selected
def pytest_collection_modifyitems(config, items):
    """The Triton kernel checks (tests of ``tests/test_l1_triton.py`` taking its ``interpreter`` fixture) need triton
    imported under ``TRITON_INTERPRET=1``. In a process where it was not, they are deselected here and
    ``test_kernel_checks_in_a_fresh_interpreter_process`` runs exactly them in a new process that sets it, and fails
    unless every one passes there."""
    checks = [item for item in items
              if item.path.name == "test_l1_triton.py" and "interpreter" in getattr(item, "fixturenames", ())]
    runner = any(item.name == "test_kernel_checks_in_a_fresh_interpreter_process" for item in items)
    if not checks or not runner:  # without the runner, a check run here fails and says why
        return
    from emkd.matching import _l1_triton

    if _l1_triton.language_interpreted():
        return
    config.stash[TRITON_INTERPRETER_ITEMS] = [item.nodeid for item in checks]
    items[:] = [item for item in items if item not in checks]
    config.hook.pytest_deselected(items=checks)

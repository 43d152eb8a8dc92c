"""The options the losses share are checked in one place (:func:`emkd.inputs.check_common_options`), with the same
message from every loss that takes them."""

from __future__ import annotations

import inspect
import re

import pytest

from emkd.inputs import check_choice, check_common_options
from emkd.losses import EMKDLoss, KDLoss, LlavaKDLoss, SFTLoss

LOSSES = [EMKDLoss, KDLoss, LlavaKDLoss, SFTLoss]
BAD = [
    ("vocab", "all", "vocab must be one of ('strict', 'crop'), got 'all'"),
    ("implementation", "fast", "implementation must be one of ('fused', 'naive'), got 'fast'"),
    ("temperature", 0.0, "temperature must be > 0, got 0.0"),
    ("temperature", -1, "temperature must be > 0, got -1"),
    ("chunk_size", 0, "chunk_size must be >= 1, got 0"),
]


CASES = [(loss, *bad) for loss in LOSSES for bad in BAD if bad[0] in inspect.signature(loss).parameters]


@pytest.mark.parametrize("loss, option, value, message", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}={c[2]}" for c in CASES])
def test_every_loss_refuses_a_bad_shared_option_alike(loss, option, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        loss(**{option: value})
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        check_common_options(**{option: value})


@pytest.mark.parametrize("loss", LOSSES, ids=lambda c: c.__name__)
def test_every_loss_takes_its_defaults_and_the_other_choices(loss):
    loss()
    options = inspect.signature(loss).parameters
    for option, value in (("vocab", "crop"), ("implementation", "naive"), ("temperature", 2.0), ("chunk_size", 1)):
        if option in options:
            assert getattr(loss(**{option: value}), option) == value


def test_check_choice_names_the_option_the_choices_and_the_value():
    check_choice("matching", "avgpool", ("avgpool", "identity"))
    with pytest.raises(ValueError, match=r"^matching must be one of \('avgpool', 'identity'\), got 'nearest'$"):
        check_choice("matching", "nearest", ("avgpool", "identity"))
    check_common_options()  # nothing given, nothing checked

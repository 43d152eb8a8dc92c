"""The assignment backend of the vision-token matching (SPEC §2), chosen from the loss and the recipe.

``EMKDLoss(assignment=...)`` and ``LlavaKDLoss(assignment=...)`` hand ``"auto" | "scipy" | "auction"`` to
``emkd.matching.hungarian_match``. On random costs the optimum is unique and the auction finds it, so both backends
give the same pairs, and so the same losses, through every Hungarian matching and both implementations. A value
outside the three is one line naming ``assignment`` and the allowed values, from the loss and from a recipe; a recipe
with ``loss.assignment=auction`` trains through the auction.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import emkd
from _workspace import build_workspace
from conftest import SampleSpec as S
from conftest import make_pair
from emkd.errors import UserError
from emkd.matching import BACKENDS, pair_batch
from emkd.matching import hungarian as hungarian_module
from emkd.training.config import load_recipe
from emkd.training.run import train

# unbalanced (Ns < Nt and Ns > Nt), balanced, text-only, and two samples of equal counts (one batched cost group)
SAMPLES = (S(2, 4, 9, 3, 4), S(1, 4, 9, 2, 3, pad=2), S(3, 0, 5, 2, 2), S(2, 5, 7, 3, 3), S(1, 6, 6, 4, 2),
           S(1, 7, 3, 2, 2))
LOSSES = {
    "emkd": (emkd.EMKDLoss, ("hungarian_logits", "hungarian_hidden")),
    "llava_kd": (emkd.LlavaKDLoss, ("auto", "hungarian_logits", "hungarian_hidden")),
}
CASES = [(name, m) for name, (_, matchings) in LOSSES.items() for m in matchings]


@pytest.fixture
def auction_calls(monkeypatch):
    """Count the calls of the auction solver behind ``hungarian_match`` (the backend did run)."""
    calls = []
    real = hungarian_module.auction_assign

    def counting(cost, *args, **kwargs):
        calls.append(tuple(cost.shape))
        return real(cost, *args, **kwargs)

    monkeypatch.setattr(hungarian_module, "auction_assign", counting)
    return calls


@pytest.mark.parametrize("implementation", ["fused", "naive"])
@pytest.mark.parametrize(("loss_name", "matching"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auction_and_scipy_give_the_same_matches_through_the_loss(loss_name, matching, implementation, seed,
                                                                  auction_calls):
    cls, _ = LOSSES[loss_name]
    student, teacher = make_pair(SAMPLES, ds=16, dt=16, student_bias=True, seed=seed)
    out = {}
    for assignment in BACKENDS:
        auction_calls.clear()
        loss_fn = cls(matching=matching, implementation=implementation, assignment=assignment)
        out[assignment] = loss_fn(student, teacher)
        assert bool(auction_calls) == (assignment == "auction"), (assignment, auction_calls)
    scipy = out["scipy"]
    for assignment in ("auction", "auto"):
        got = out[assignment]
        assert len(got.matches) == len(scipy.matches) == len(SAMPLES)
        for b, ((idx_s, idx_t), (ref_s, ref_t)) in enumerate(zip(got.matches, scipy.matches)):
            assert torch.equal(idx_s, ref_s) and torch.equal(idx_t, ref_t), (assignment, b)
        assert torch.equal(got.loss, scipy.loss), assignment  # the same pairs: the same numbers, bit for bit


def test_auction_solves_each_group_of_equal_counts_in_one_batch(auction_calls):
    student, teacher = make_pair(SAMPLES, seed=5)
    paired = pair_batch(student, teacher, "hungarian_logits", "fused", assignment="auction")
    reference = pair_batch(student, teacher, "hungarian_logits", "fused", assignment="scipy")
    # groups (4, 9) x2, (5, 7), (6, 6), (7, 3) solved transposed; the text-only sample is not solved
    assert sorted(auction_calls) == [(1, 3, 7), (1, 5, 7), (1, 6, 6), (2, 4, 9)]
    for p, q in zip(paired, reference):
        assert (p is None) == (q is None)
        if p is not None:
            assert torch.equal(p.idx_s, q.idx_s) and torch.equal(p.idx_t, q.idx_t)


@pytest.mark.parametrize("cls", [emkd.EMKDLoss, emkd.LlavaKDLoss])
@pytest.mark.parametrize("value", ["hungarian", "Auction", ""])
def test_invalid_assignment_names_the_allowed_values(cls, value):
    with pytest.raises(ValueError) as info:
        cls(assignment=value)
    assert str(info.value) == f"assignment must be one of ('scipy', 'auction', 'auto'), got {value!r}"


@pytest.mark.parametrize("method", ["emkd", "llava_kd"])
def test_invalid_assignment_in_a_recipe_is_one_line_naming_the_key(method):
    with pytest.raises(UserError) as info:
        load_recipe(None, [f"method={method}", "loss.assignment=hungarian"])
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith(f"loss options of method {method!r}: assignment must be one of "
                            "('scipy', 'auction', 'auto'), got 'hungarian'"), message
    with pytest.raises(UserError, match=r"loss\.assignment must be str, got 3$"):
        load_recipe(None, [f"method={method}", "loss.assignment=3"])
    config = load_recipe(None, [f"method={method}", "loss.assignment=auction"])
    assert config.loss == {"assignment": "auction"}


def test_assignment_from_a_yaml_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: emkd\nloss: {assignment: auction, matching: hungarian_hidden}\n")
    assert load_recipe(str(path), []).loss == {"assignment": "auction", "matching": "hungarian_hidden"}
    path.write_text("method: emkd\nloss: {assignment: hungarian}\n")
    with pytest.raises(UserError, match=rf"^{path}: loss options of method 'emkd': assignment must be one of "):
        load_recipe(str(path), [])


# ---- a recipe with loss.assignment=auction trains -------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("assignment") / "ws")


@pytest.mark.parametrize("method", ["emkd", "llava_kd"])
def test_a_recipe_with_auction_assignment_trains(ws, tmp_path, method, auction_calls):
    out = tmp_path / method
    config = load_recipe(None, [
        f"student={ws['student']}", f"teacher={ws['teacher']}", f"data.train={ws['train']}",
        f"data.images={ws['images']}", f"output_dir={out}", "batch_size=4", "learning_rate=0.003",
        "lr_scheduler=constant", "warmup_ratio=0", f"method={method}", "max_steps=2", "loss.assignment=auction",
    ])
    summary = train(config)
    assert summary["global_step"] == 2
    assert auction_calls, "the auction never ran"
    assert json.loads((out / "recipe.json").read_text())["loss"]["assignment"] == "auction"
    logs = [json.loads(line) for line in open(Path(out) / "log.jsonl")]
    steps = [r for r in logs if "objective" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["objective"])) for r in steps)

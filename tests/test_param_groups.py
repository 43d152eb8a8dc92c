"""Per-part learning rates: ``vision_tower_lr`` and ``projector_lr`` give the tower and the projector their own peak
rate under the one schedule; the optimizer's groups hold exactly the trainable parameters of each part, at its rate,
with weight decay on neither biases nor norms; a frozen tower neither trains nor accepts a rate."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import TrainerCallback

from _workspace import build_workspace, workspace_overrides
from emkd.errors import UserError
from emkd.training.config import load_recipe
from emkd.training.run import build_trainer, run_recipe, training_arguments
from emkd.training.stages import PARTS, param_groups, part_of

FAST = ["batch_size=4", "warmup_ratio=0"]
RATES = ["learning_rate=0.003", "projector_lr=0.002", "vision_tower_lr=0.0006"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("groups") / "ws")


def recipe(ws, out, *extra):
    return load_recipe(None, workspace_overrides(ws, out, "method=sft", *FAST, *extra))


def by_identity(model) -> dict[int, str]:
    return {id(p): part for part in PARTS for p in getattr(model, part).parameters()}


def test_groups_hold_each_parts_trainable_parameters_at_its_rate(ws, tmp_path, capsys):
    trainer = build_trainer(recipe(ws, tmp_path, "train_vision_tower=true", "weight_decay=0.1", *RATES))
    optimizer = trainer.create_optimizer()
    model = trainer.model
    part = by_identity(model)
    decay = set(trainer.get_decay_parameter_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {"language_model": 0.003, "projector": 0.002, "vision_tower": 0.0006}

    assert optimizer.param_groups[0]["name"] == "language_model"  # the rate transformers logs
    seen = []
    for group in optimizer.param_groups:
        assert group["lr"] == rates[group["name"]]
        for p in group["params"]:
            assert part[id(p)] == group["name"], names[id(p)]
            assert group["weight_decay"] == (0.1 if names[id(p)] in decay else 0.0), names[id(p)]
            seen.append(id(p))
    assert len(seen) == len(set(seen))  # no parameter in two groups
    assert set(seen) == {id(p) for p in model.parameters() if p.requires_grad} == set(part)  # all three parts train
    no_decay = [names[i] for i in seen if names[i] not in decay]
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)

    out = capsys.readouterr().out
    assert "trainable parameters and peak learning rates" in out
    towers = sum(p.numel() for p in model.vision_tower.parameters())
    assert re.search(rf"\n  vision_tower +{towers:,} trainable +lr 0.0006\n", out), out


def test_a_frozen_part_is_in_no_group(ws, tmp_path):
    trainer = build_trainer(recipe(ws, tmp_path, "learning_rate=0.003", "projector_lr=0.002"))
    optimizer = trainer.create_optimizer()
    assert {g["name"] for g in optimizer.param_groups} == {"language_model", "projector"}
    trainer = build_trainer(recipe(ws, tmp_path / "align", "stage=align", "learning_rate=0.003", "projector_lr=0.002"))
    groups = trainer.create_optimizer().param_groups
    assert {g["name"] for g in groups} == {"projector"} and all(g["lr"] == 0.002 for g in groups)


class RecordRates(TrainerCallback):
    """Each group's rate as a fraction of its peak, after every optimizer step."""

    def __init__(self):
        self.fractions = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.fractions.append({g["name"]: g["lr"] / g["initial_lr"] for g in optimizer.param_groups})


@pytest.mark.parametrize("tower", [True, False])
def test_a_short_run_moves_the_tower_only_when_it_trains_under_one_schedule(ws, tmp_path, tower):
    extra = ["train_vision_tower=true", *RATES] if tower else ["learning_rate=0.003", "projector_lr=0.002"]
    trainer = build_trainer(recipe(ws, tmp_path, "max_steps=3", "lr_scheduler=cosine", *extra))
    rates = RecordRates()
    trainer.add_callback(rates)
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    moved = {k for k, v in trainer.model.named_parameters() if not torch.equal(start[k], v.detach())}
    if tower:
        assert "vision_tower.embeddings.patch_embedding.weight" in moved
    assert {k.split(".")[0] for k in moved} == ({"vision_tower"} if tower else set()) | {"projector", "language_model"}
    assert {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups} == (
        {"language_model": 0.003, "projector": 0.002, "vision_tower": 0.0006} if tower
        else {"language_model": 0.003, "projector": 0.002})
    # one schedule: at every step each group's rate is the same fraction of its peak (cosine: 0.75 after step 1)
    assert len(rates.fractions) == 3
    for step in rates.fractions:
        assert max(step.values()) - min(step.values()) < 1e-12, step
    assert rates.fractions[0]["language_model"] == pytest.approx(0.75)


def test_param_groups_refuse_a_parameter_of_no_part():
    model = torch.nn.ModuleDict({"projector": torch.nn.Linear(2, 2), "extra": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match=r"trainable parameter extra.weight belongs to none of the parts"):
        param_groups(model.named_parameters(), {"projector": 1e-3}, 0.0, set())
    model["extra"].requires_grad_(False)
    (group,) = param_groups(model.named_parameters(), {"projector": 1e-3}, 0.0, set())
    assert group["params"] == [model["projector"].weight, model["projector"].bias]
    assert part_of("_fsdp_wrapped_module.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", PARTS) == \
        "vision_tower"
    assert part_of("language_model.model.projector.weight", PARTS) == "language_model"


@pytest.mark.parametrize("overrides, expected", [
    (["vision_tower_lr=2e-6"],
     "vision_tower_lr=2e-06 is set but the vision tower is frozen (train_vision_tower is false): set "
     "train_vision_tower=true or unset vision_tower_lr"),
    (["stage=align", "train_vision_tower=true", "vision_tower_lr=2e-6"],
     "vision_tower_lr=2e-06 is set but the vision tower is frozen (stage 'align' trains the projector only)"),
    (["train_vision_tower=true", "vision_tower_lr=0"], "vision_tower_lr must be a positive number or null"),
    (["projector_lr=-1"], "projector_lr must be a positive number or null (learning_rate), got -1.0"),
    (["projector_lr=fast"], "projector_lr must be float or null, got 'fast'"),
])
def test_bad_part_rates_are_one_error_at_load(overrides, expected):
    with pytest.raises(UserError) as info:
        load_recipe(None, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_part_rates_are_typed_and_fingerprinted_only_when_set():
    config = load_recipe(None, ["train_vision_tower=true", "vision_tower_lr=2.0e-6", "projector_lr='1e-4'"])
    assert config.vision_tower_lr == 2e-6 and config.projector_lr == 1e-4
    assert run_recipe(config)["vision_tower_lr"] == 2e-6
    plain = run_recipe(load_recipe(None, []))
    assert "vision_tower_lr" not in plain and "projector_lr" not in plain  # runs from before these keys still resume
    # a trained tower has parameters past vision_feature_layer that no loss reaches: DDP must not wait for them
    assert training_arguments(config).ddp_find_unused_parameters is True
    assert training_arguments(load_recipe(None, [])).ddp_find_unused_parameters is False

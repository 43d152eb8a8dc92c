"""EM-KD's hidden-state VSD ablation (``loss.vsd_target=hidden``, EM-KD Table 3c, SPEC §3) when the student's hidden
size differs from the teacher's: the run adds the learnable map ``P`` (Ds -> Dt), trains it with the student at the
language model's rate, saves it beside the model in every checkpoint and in ``final``, and ``--resume`` loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _workspace import build_workspace, workspace_overrides
from emkd.errors import OutputDirError
from emkd.models import load_student
from emkd.training.config import load_recipe
from emkd.training.run import build_trainer, train
from emkd.training.trainer import VSD_PROJECTOR_FILE, last_complete_checkpoint
from conftest import StopAt

FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0"]
HIDDEN = ["method=emkd", "loss.vsd_target=hidden"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("vsd") / "ws")  # student D=32, teacher D=48


def recipe(ws, out, *extra, teacher=None):
    return load_recipe(None, workspace_overrides(ws, out, *FAST, *extra, teacher=teacher))



def test_the_projector_trains_with_the_student_and_is_saved_beside_it(ws, tmp_path):
    out = tmp_path / "run"
    trainer = build_trainer(recipe(ws, out, *HIDDEN, "max_steps=2", "save_steps=1", "save_total_limit=0"))
    projector = trainer.model.vsd_projector
    assert isinstance(projector, torch.nn.Linear) and projector.bias is None
    assert tuple(projector.weight.shape) == (48, 32)  # (Dt, Ds)
    assert trainer.method.projector is projector  # what the method hands its loss
    initial = projector.weight.detach().clone()
    trainer.train()
    (group,) = [g for g in trainer.optimizer.param_groups if g["name"] == "vsd_projector"]
    assert group["params"] == [projector.weight] and group["initial_lr"] == 0.003  # the language model's rate
    assert not torch.equal(projector.weight.detach(), initial)

    for step in (1, 2):
        folder = out / f"checkpoint-{step}"
        saved = load_file(str(folder / VSD_PROJECTOR_FILE))
        assert set(saved) == {"weight"}
        assert not any(k.startswith("vsd_projector") for k in load_file(str(folder / "model.safetensors")))
    assert torch.equal(saved["weight"], projector.weight.detach())

    from emkd.training.run import save_final

    final = save_final(trainer, out)
    assert torch.equal(load_file(str(final / VSD_PROJECTOR_FILE))["weight"], projector.weight.detach())
    model, _ = load_student(final)  # the model directory is the plain student
    assert not hasattr(model, "vsd_projector")


def test_resume_loads_the_projector_and_ends_where_an_uninterrupted_run_does(ws, tmp_path):
    common = [*HIDDEN, "max_steps=4", "save_steps=2", "save_total_limit=5"]
    whole = train(recipe(ws, tmp_path / "whole", *common))
    first = build_trainer(recipe(ws, tmp_path / "parts", *common))
    first.add_callback(StopAt(2))
    first.train()
    checkpoint = last_complete_checkpoint(tmp_path / "parts")
    assert checkpoint.name == "checkpoint-2"

    again = build_trainer(recipe(ws, tmp_path / "parts", *common))
    assert not torch.equal(again.model.vsd_projector.weight, first.model.vsd_projector.weight)  # a fresh P
    again._load_from_checkpoint(str(checkpoint))
    assert torch.equal(again.model.vsd_projector.weight.detach(),
                       load_file(str(checkpoint / VSD_PROJECTOR_FILE))["weight"])

    resumed = train(recipe(ws, tmp_path / "parts", *common), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    for name in (VSD_PROJECTOR_FILE, "model.safetensors"):
        a = load_file(str(Path(whole["final_model"]) / name))
        b = load_file(str(Path(resumed["final_model"]) / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_checkpoint_without_the_projector_is_refused(ws, tmp_path):
    out = tmp_path / "run"
    trainer = build_trainer(recipe(ws, out, *HIDDEN, "max_steps=1", "save_steps=1"))
    trainer.train()
    (out / "checkpoint-1" / VSD_PROJECTOR_FILE).unlink()
    with pytest.raises(OutputDirError, match=f"holds no {VSD_PROJECTOR_FILE}"):
        build_trainer(recipe(ws, out, *HIDDEN, "max_steps=1"))._load_from_checkpoint(str(out / "checkpoint-1"))


@pytest.mark.parametrize("case", ["equal hidden sizes", "logit VSD", "no teacher"])
def test_no_projector_when_none_is_needed(ws, tmp_path, case):
    extra = {"equal hidden sizes": HIDDEN, "logit VSD": ["method=emkd"], "no teacher": ["method=sft"]}[case]
    teacher = ws["student"] if case == "equal hidden sizes" else None  # a teacher with the student's D=32
    trainer = build_trainer(recipe(ws, tmp_path, *extra, "max_steps=1", teacher=teacher))
    assert not hasattr(trainer.model, "vsd_projector")
    trainer.train()  # with equal sizes the loss compares h_s and h_t directly
    assert {g["name"] for g in trainer.optimizer.param_groups} == {"language_model", "projector"}

"""`emkd train`: every method trains, stages freeze what they must, the teacher never changes, runs resume exactly."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _workspace import build_workspace, workspace_overrides
from emkd.models import load_student
from emkd.training.config import load_recipe
from emkd.training.run import build_trainer, train
from emkd.training.stages import apply_stage
from emkd.training.trainer import COMPLETE_MARKER, last_complete_checkpoint
from conftest import StopAt

FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("train") / "ws")


def recipe(ws, out, *extra):
    return load_recipe(None, workspace_overrides(ws, out, *FAST, *extra))


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def teacher_state(ws):
    return load_file(str(ws["teacher"] / "model.safetensors"))


COMPONENTS = {
    "sft": {"ce"},
    "kd": {"ce", "kd"},
    "rkl": {"ce", "kd"},
    "llava_kd": {"ce", "res", "vis", "rel"},
    "emkd": {"sup", "rld", "vsd", "vlad"},
    "align_ti": {"ce", "iva", "kd", "tpa"},
}


@pytest.mark.parametrize("method", sorted(COMPONENTS))
def test_each_method_lowers_its_loss_and_leaves_the_teacher_alone(ws, tmp_path, method):
    before = teacher_state(ws)
    extra = ["irs_layer=1"] if method == "align_ti" else []
    summary = train(recipe(ws, tmp_path / method, f"method={method}", "max_steps=6", *extra))
    assert summary["global_step"] == 6
    logs = [r for r in read_log(tmp_path / method) if "objective" in r]
    assert len(logs) == 6
    for r in logs:
        assert COMPONENTS[method] <= set(r), f"components missing from {r}"
        assert all(torch.isfinite(torch.tensor(r[k])) for k in COMPONENTS[method] | {"objective"})
    assert logs[-1]["objective"] < logs[0]["objective"]  # dataset = one batch: the same batch every step
    after = teacher_state(ws)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    final, _ = load_student(summary["final_model"])  # the final model loads like any checkpoint
    assert final.config.model_type == "emkd_mllm"


@pytest.mark.parametrize(
    "stage,vision,expected",
    [("align", False, {"projector"}), ("dpt", False, {"projector"}), ("instruct", False, {"projector", "language_model"}),
     ("sft", False, {"projector", "language_model"}), ("dft", True, {"projector", "language_model", "vision_tower"})],
)
def test_stage_trains_exactly_its_parts(ws, tmp_path, stage, vision, expected):
    model, _ = load_student(ws["student"])
    apply_stage(model, stage, train_vision_tower=vision)
    for part in ("vision_tower", "projector", "language_model"):
        flags = {p.requires_grad for p in getattr(model, part).parameters()}
        assert flags == {part in expected}, (stage, part, flags)

    # and a real step changes exactly those parts
    trainer = build_trainer(recipe(ws, tmp_path / stage, "method=sft", f"stage={stage}", "max_steps=1",
                                   f"train_vision_tower={str(vision).lower()}"))
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.model.named_parameters():
        part = name.split(".")[0]
        changed = not torch.equal(start[name], p.detach())
        if part not in expected:
            assert not changed, f"{stage}: frozen {name} changed"
    moved = {name.split(".")[0] for name, p in trainer.model.named_parameters() if not torch.equal(start[name], p.detach())}
    assert moved == expected


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(ws, tmp_path):
    common = ["method=emkd", "max_steps=6", "save_steps=3", "save_total_limit=5", "lr_scheduler=cosine", "warmup_ratio=0.2"]
    whole = train(recipe(ws, tmp_path / "whole", *common))
    # first half: the same recipe stopped after 3 steps (a checkpoint was written at step 3)
    first = build_trainer(recipe(ws, tmp_path / "parts", *common))
    first.add_callback(StopAt(3))
    first.train()
    assert last_complete_checkpoint(tmp_path / "parts").name == "checkpoint-3"
    resumed = train(recipe(ws, tmp_path / "parts", *common), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-3")
    a = load_file(str(Path(whole["final_model"]) / "model.safetensors"))
    b = load_file(str(Path(resumed["final_model"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_incomplete_checkpoint_is_never_resumed(tmp_path):
    good = tmp_path / "checkpoint-2"
    bad = tmp_path / "checkpoint-4"  # a crash while saving: files but no marker
    good.mkdir()
    bad.mkdir()
    (good / COMPLETE_MARKER).write_text("{}")
    (bad / "model.safetensors").write_bytes(b"truncated")
    assert last_complete_checkpoint(tmp_path) == good
    assert last_complete_checkpoint(tmp_path / "missing") is None


def test_sigterm_saves_a_checkpoint_and_stops(ws, tmp_path):
    trainer_config = recipe(ws, tmp_path / "sig", "method=kd", "max_steps=200")
    handler_before = signal.getsignal(signal.SIGTERM)
    fired = threading.Event()

    class SendSignal(StopAt):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not fired.is_set():
                fired.set()
                os.kill(os.getpid(), signal.SIGTERM)

    import emkd.training.run as run_module

    original = run_module.build_trainer

    def build_with_signal(config, source="the recipe"):
        t = original(config, source)
        t.add_callback(SendSignal(0))
        return t

    run_module.build_trainer = build_with_signal
    try:
        summary = train(trainer_config)
    finally:
        run_module.build_trainer = original
    assert summary["interrupted"] is True
    assert summary["global_step"] == 2
    ckpt = last_complete_checkpoint(tmp_path / "sig")
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler is restored after training


def test_cli_train_with_overrides(ws, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "emkd", "train", "--set", "method=rkl", "--set", f"student={ws['student']}",
           "--set", f"teacher={ws['teacher']}", "--set", f"data.train={ws['train']}", "--set",
           f"data.images={ws['images']}", "--set", f"output_dir={out}", "--set", "max_steps=2", "--set", "seed=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "recipe.json").read_text())["seed"] == 3
    assert len([r for r in read_log(out) if "objective" in r]) == 2


RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_parses(path):
    config = load_recipe(path)
    assert config.method and config.stage


def test_tiny_two_phase_recipes_run(ws, tmp_path):
    root = Path(__file__).resolve().parents[1] / "recipes"
    p1 = train(load_recipe(root / "tiny_phase1.yaml", [
        f"student={ws['student']}", f"data.train={ws['captions']}", f"data.images={ws['images']}",
        f"output_dir={tmp_path / 'p1'}", "max_steps=3"]))
    p2 = train(load_recipe(root / "tiny_phase2.yaml", [
        f"student={p1['final_model']}", f"teacher={ws['teacher']}", f"data.train={ws['train']}",
        f"data.images={ws['images']}", f"output_dir={tmp_path / 'p2'}", "max_steps=3"]))
    assert p2["global_step"] == 3
    # phase 1 trained the projector only: the language model is the initial one
    init, _ = load_student(ws["student"])
    after, _ = load_student(p1["final_model"])
    for (name, a), (_, b) in zip(init.named_parameters(), after.named_parameters()):
        assert torch.equal(a, b) == (not name.startswith("projector")), name


def test_align_ti_takes_its_iva_layer_from_the_irs_file(ws, tmp_path):
    (tmp_path / "irs.json").write_text(json.dumps({"scores": [0.1, 0.4], "best_layer": 1}))
    trainer = build_trainer(recipe(ws, tmp_path / "a", "method=align_ti", f"irs_file={tmp_path / 'irs.json'}"))
    assert trainer.method.loss_kwargs["iva_layer"] == 1
    with pytest.raises(ValueError, match="emkd irs"):
        build_trainer(recipe(ws, tmp_path / "b", "method=align_ti"))


def test_recipe_values_take_their_field_types():
    config = load_recipe(None, ["learning_rate=1e-3", "num_epochs=2", "data.max_length=64"])
    assert config.learning_rate == 0.001 and isinstance(config.num_epochs, float) and config.data.max_length == 64
    with pytest.raises(ValueError, match="learning_rate must be float"):
        load_recipe(None, ["learning_rate=fast"])
    with pytest.raises(ValueError, match=r"unknown recipe key .learning_rat. \(did you mean .learning_rate.\?\)"):
        load_recipe(None, ["learning_rat=1"])

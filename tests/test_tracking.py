"""`report_to`: every log record reaches the trackers under its own name; TensorBoard's event files are read back.

The runs go through `emkd train` (``emkd.cli.main``), the entry point of the command line. TensorBoard is a test
dependency (the ``dev`` extra), so nothing here is skipped for it. wandb and mlflow are not: their runs here are
skipped unless the package is installed (they were run by hand with wandb 0.31.0 and mlflow-skinny 3.18.0), and their
package check is tested with ``importlib.util.find_spec`` patched.
"""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers.integrations import INTEGRATION_TO_CALLBACK

import emkd.training.run as run_module
from _workspace import build_workspace
from emkd.cli import main
from emkd.errors import UserError
from emkd.training.config import TRACKERS, load_recipe, tracker_names
from emkd.training.run import run_recipe, training_arguments
from conftest import StopAt

FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0"]
COMPONENTS = {"sft": {"ce"}, "emkd": {"sup", "rld", "vsd", "vlad"}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("tracking") / "ws")


def train_args(ws, out, *extra):
    """``emkd train`` arguments of a tiny run of the workspace into ``out``."""
    keys = [f"student={ws['student']}", f"teacher={ws['teacher']}", f"data.train={ws['train']}",
            f"data.images={ws['images']}", f"output_dir={out}", *FAST, *extra]
    return ["train", *(arg for key in keys for arg in ("--set", key))]


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def scalars(folder):
    """Every scalar of the TensorBoard event files in ``folder``: ``{tag: [(step, value), ...]}``, as TensorBoard
    shows them (an event file's purge step applied)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_log_in_tensorboard(board, records):
    """Each numeric value of each ``log.jsonl`` record is in ``board`` as ``train/KEY`` at the record's step."""
    for record in records:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            found = [v for step, v in board.get(f"train/{key}", []) if step == record["step"]]
            # (epoch comes once more at the last step, in the end-of-training record)
            assert found and all(v == pytest.approx(value, rel=1e-6, abs=1e-7) for v in found), (key, record, found)


@pytest.mark.parametrize("method", sorted(COMPONENTS))
def test_every_loss_component_reaches_tensorboard_under_its_name(ws, tmp_path, method):
    out = tmp_path / method
    assert main(train_args(ws, out, f"method={method}", "max_steps=3", "report_to=tensorboard")) == 0
    board = scalars(out / "tensorboard")
    records = [r for r in read_log(out) if "objective" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in COMPONENTS[method] | {"loss", "objective", "learning_rate", "grad_norm"}:
        points = board[f"train/{key}"]
        assert [step for step, _ in points] == [1, 2, 3], key
        assert all(math.isfinite(value) for _, value in points), (key, points)
    if method == "emkd":  # the match quality of a pooled student, logged by the trainer, arrives too
        assert any("match_in_window" in r for r in records)
        assert [step for step, _ in board["train/match_in_window"]] == [1, 2, 3]
    assert_log_in_tensorboard(board, records)



def test_a_resumed_run_shows_each_step_once(ws, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    common = ["method=sft", "max_steps=4", "save_steps=2", "report_to=tensorboard"]
    original = run_module.build_trainer

    def stopping_at_3(config, source="the recipe"):
        trainer = original(config, source)
        trainer.add_callback(StopAt(3))
        return trainer

    monkeypatch.setattr(run_module, "build_trainer", stopping_at_3)
    assert main(train_args(ws, out, *common)) == 0  # logs steps 1-3; its last checkpoint is step 2
    monkeypatch.setattr(run_module, "build_trainer", original)
    assert main([*train_args(ws, out, *common), "--resume"]) == 0  # steps 3-4 again from checkpoint-2
    board = scalars(out / "tensorboard")
    for key in ("loss", "objective", "ce"):
        assert [step for step, _ in board[f"train/{key}"]] == [1, 2, 3, 4], key
    assert_log_in_tensorboard(board, [r for r in read_log(out) if "objective" in r])


def test_wandb_offline_run_writes_under_output_dir(ws, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not a test dependency (it brings 22 packages); pip install wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "wandb-run"
    assert main(train_args(ws, out, "method=emkd", "max_steps=2", "report_to=wandb")) == 0
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # protobuf records: their keys are stored as plain bytes
    for key in COMPONENTS["emkd"] | {"loss", "objective", "match_in_window"}:
        assert f"train/{key}".encode() in data, key
    assert "WANDB_DIR" not in os.environ  # the run's defaults are gone after it


def test_mlflow_local_store_gets_every_component(ws, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not a test dependency; pip install mlflow")
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's file store, kept for offline use
    out = tmp_path / "mlflow-run"
    assert main(train_args(ws, out, "method=sft", "max_steps=2", "report_to=mlflow")) == 0
    (run,) = (p for p in (store / "0").iterdir() if (p / "metrics").is_dir())
    assert (run / "tags" / "mlflow.runName").read_text() == "mlflow-run"
    for key in ("loss", "objective", "ce"):  # MLflow keeps the names as logged (no train/ prefix)
        steps = [int(line.split()[2]) for line in (run / "metrics" / key).read_text().splitlines()]
        assert steps == [1, 2], key


def test_unknown_tracker_is_one_line_naming_key_value_and_choices(capsys):
    assert main(["train", "--set", "report_to=tensorbord"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "report_to: 'tensorbord' is not a tracker emkd supports (did you mean 'tensorboard'?" in err
    assert "tensorboard, wandb, mlflow" in err
    with pytest.raises(UserError, match="'comet_ml' is not a tracker"):
        load_recipe(None, ["report_to=[tensorboard, comet_ml]"])
    with pytest.raises(UserError, match="report_to must be a tracker name or a list"):
        load_recipe(None, ["report_to=3"])


def test_missing_tracker_package_names_the_install_before_any_model_loads(ws, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec

    def without_wandb(name, *args, **kwargs):
        return None if name.split(".")[0] == "wandb" else real(name, *args, **kwargs)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the trackers were checked")

    monkeypatch.setattr(importlib.util, "find_spec", without_wandb)
    monkeypatch.setattr(run_module, "load_student", no_model)
    out = tmp_path / "no-wandb"
    assert main(train_args(ws, out, "report_to=[tensorboard, wandb]")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "report_to=wandb needs the wandb package, which is not installed: pip install wandb" in err
    assert not out.exists()  # refused before output_dir was touched


def test_report_to_values_and_what_transformers_receives(ws, tmp_path):
    assert set(TRACKERS) <= set(INTEGRATION_TO_CALLBACK)  # the names are transformers' integrations
    assert tracker_names(None) == tracker_names("none") == tracker_names([]) == tracker_names(["none"]) == []
    assert tracker_names("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    base = [f"output_dir={tmp_path / 'my-run'}"]
    plain, tracked = load_recipe(None, base), load_recipe(None, [*base, "report_to=tensorboard"])
    assert plain.report_to == [] and training_arguments(plain).report_to == []
    args = training_arguments(tracked)
    assert args.report_to == ["tensorboard"] and args.run_name == "my-run"
    named = load_recipe(None, [*base, "report_to=[mlflow]", "run_name=emkd-phase2"])
    assert training_arguments(named).run_name == "emkd-phase2"
    # trackers do not change what is trained: a checkpoint resumes whatever they are
    assert run_recipe(plain) == run_recipe(tracked) == run_recipe(named)

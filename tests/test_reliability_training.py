"""Faults injected into `emkd train`, and what must survive them.

Each test injects one fault and checks what is kept:

* blow-ups (``learning_rate=1e6``, a NaN loss or component at step k): the run stops before the bad update (or, with
  ``on_nonfinite=skip``, drops it), no checkpoint or ``final`` holds a non-finite tensor, the CLI exits 3;
* two runs on one ``output_dir``, a fresh run into a used one, a lock left by a dead run, ``--resume`` with another
  recipe;
* a kill between saving a checkpoint and deleting the older ones (``save_total_limit=1``), a crash mid-save;
* truncated and corrupted (same size) checkpoint files: ``--resume`` falls back to the newest intact checkpoint and
  ends with the weights of an uninterrupted run, ``log.jsonl`` without duplicated steps;
* SIGTERM: exit status 143;
* bad recipe values (``max_steps=1.5``, ``loss.alpha=abc``, ``loss.alpah=0.5``): one error at load naming the recipe
  file and the key, before any model loads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from _workspace import build_workspace
from emkd.cli import main
from emkd.errors import UserError
from emkd.training.config import load_recipe
from emkd.training.methods import StepOutput
from emkd.training.run import build_trainer, train
from emkd.training.trainer import COMPLETE_MARKER, last_complete_checkpoint
from conftest import StopAt

FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0"]
# the run the checkpoint faults interrupt: six steps, a checkpoint every two
CKPT = ["method=sft", "max_steps=6", "save_steps=2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("reliability") / "ws")


def args(ws, out, *extra):
    return [f"student={ws['student']}", f"teacher={ws['teacher']}", f"data.train={ws['train']}",
            f"data.images={ws['images']}", f"output_dir={out}", *FAST, *extra]


def recipe(ws, out, *extra):
    return load_recipe(None, args(ws, out, *extra))


def cli_args(ws, out, *extra):
    return [x for item in args(ws, out, *extra) for x in ("--set", item)]


@pytest.fixture(scope="module")
def uninterrupted(ws, tmp_path_factory):
    """Final weights of the CKPT run without any fault (what every recovered run must end with)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    summary = train(recipe(ws, out, *CKPT))
    return load_file(str(Path(summary["final_model"]) / "model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_finite(folder: Path) -> bool:
    tensors = list(load_file(str(folder / "model.safetensors")).values())
    if (folder / "optimizer.pt").exists():
        state = torch.load(folder / "optimizer.pt", weights_only=True)["state"]
        tensors += [t for s in state.values() for t in s.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def error_lines(stderr: str) -> list[str]:
    """The ``emkd train: error:`` lines (one expected), out of whatever progress bars were printed too."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    errors = [line for line in lines if line.startswith("emkd train: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors


def logged_steps(out):
    return [r["step"] for r in map(json.loads, open(Path(out) / "log.jsonl")) if "loss" in r]



def partial_run(ws, out, stop, *extra):
    """The CKPT recipe stopped after ``stop`` steps (its checkpoints written as by `emkd train`)."""
    trainer = build_trainer(recipe(ws, out, *CKPT, *extra))
    trainer.add_callback(StopAt(stop))
    trainer.train()
    return trainer


@pytest.fixture
def patch_trainer(monkeypatch):
    """``patch_trainer(fn)``: ``fn(trainer)`` runs on the trainer `train` builds, before it trains."""
    import emkd.training.run as run_module

    def install(fn):
        original = run_module.build_trainer

        def build(config, source="the recipe"):
            trainer = original(config, source)
            fn(trainer)
            return trainer

        monkeypatch.setattr(run_module, "build_trainer", build)

    return install


class NaNAt:
    """Wrap a trainer's method: at the given (1-based) steps its loss, or one component, is NaN."""

    def __init__(self, trainer, steps, component=None):
        self.inner, self.trainer, self.steps, self.component = trainer.method, trainer, set(steps), component
        self.name, self.needs_teacher = self.inner.name, self.inner.needs_teacher

    def __call__(self, student, teacher, batch, model=None):
        out = self.inner(student, teacher, batch, model=model)
        if self.trainer.state.global_step + 1 not in self.steps:
            return out
        if self.component is not None:
            return StepOutput(out.loss, {**out.components, self.component: float("nan")})
        return StepOutput(out.loss * float("nan"), {k: float("nan") for k in out.components})


# ---- 1. blow-ups -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, lr, step, what", [
    ("sft", "1e6", 2, "the gradient norm is nan"),
    ("emkd", "1e6", 2, "the gradient norm is nan"),
    ("sft", "1e39", 1, "the weights turned non-finite"),  # finite loss and gradients, an update to +-inf
])
def test_huge_learning_rate_stops_before_the_bad_update_and_saves_nothing_non_finite(ws, tmp_path, method, lr, step,
                                                                                     what):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        train(recipe(ws, out, f"method={method}", f"learning_rate={lr}", "max_steps=5", "save_steps=1"))
    message = str(info.value)
    assert f"training stopped at step {step}: {what}" in message, message
    assert not (out / "final").exists()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ([f"checkpoint-{step - 1}"] if step > 1 else [])
    assert all(all_finite(c) for c in checkpoints)
    if step > 1:
        assert str(last_complete_checkpoint(out)) in message  # the last good one is named
    assert json.loads((out / "summary.json").read_text())["status"] == "nonfinite"
    assert not (out / "emkd.lock").exists()


def test_nonfinite_stop_is_one_line_and_exit_3_and_resume_stops_again_cleanly(ws, tmp_path, capsys):
    out = tmp_path / "run"
    blow_up = cli_args(ws, out, "method=kd", "learning_rate=1e6", "max_steps=4", "save_steps=1")
    assert main(["train", *blow_up]) == 3
    err = capsys.readouterr().err
    assert error_lines(err)[0].startswith("emkd train: error: training stopped at step 2: ")
    assert err.rstrip().endswith(error_lines(err)[0]) and "Traceback" not in err  # the last thing printed
    assert main(["train", *blow_up, "--resume"]) == 3  # today: a raw ValueError from the NaN weights
    assert "training stopped at step 2" in capsys.readouterr().err
    assert last_complete_checkpoint(out).name == "checkpoint-1" and all_finite(out / "checkpoint-1")


def test_a_nan_component_at_step_k_stops_the_run_naming_step_and_component(ws, tmp_path, patch_trainer):
    patch_trainer(lambda t: setattr(t, "method", NaNAt(t, {3}, component="vsd")))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"training stopped at step 3: loss component 'vsd' is nan"):
        train(recipe(ws, out, "method=emkd", "max_steps=5", "save_steps=1"))
    assert last_complete_checkpoint(out).name == "checkpoint-2" and not (out / "final").exists()


def test_skip_drops_the_nonfinite_update_and_goes_on(ws, tmp_path, patch_trainer):
    patch_trainer(lambda t: setattr(t, "method", NaNAt(t, {3})))
    out = tmp_path / "run"
    summary = train(recipe(ws, out, "method=sft", "max_steps=5", "save_steps=1", "save_total_limit=0",
                           "on_nonfinite=skip"))
    assert summary["global_step"] == 5 and summary["nonfinite_skipped"] == 1
    weights = {s: load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (2, 3, 4)}
    assert same_weights(weights[2], weights[3])  # step 3 changed nothing
    assert not same_weights(weights[3], weights[4])  # step 4 trained again
    optim = [torch.load(out / f"checkpoint-{s}" / "optimizer.pt", weights_only=True)["state"] for s in (2, 3)]
    assert all(torch.equal(a, b) for k in optim[0] for a, b in zip(optim[0][k].values(), optim[1][k].values()))
    assert all_finite(out / "final")
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-2])["nonfinite_skipped"] == 1


def test_skip_stops_after_n_nonfinite_steps_in_a_row(ws, tmp_path, patch_trainer):
    patch_trainer(lambda t: setattr(t, "method", NaNAt(t, range(3, 100))))
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"step 4: .*2 non-finite steps in a row: max_consecutive_nonfinite=2"):
        train(recipe(ws, out, "method=sft", "max_steps=6", "save_steps=1", "save_total_limit=0",
                     "on_nonfinite=skip", "max_consecutive_nonfinite=2"))
    assert all(all_finite(c) for c in out.glob("checkpoint-*")) and not (out / "final").exists()


# ---- 2. who owns output_dir ----------------------------------------------------------------------------------------
def test_a_second_run_on_a_live_runs_output_dir_is_refused(ws, tmp_path, patch_trainer):
    out = tmp_path / "run"
    second = {}

    class StartAnother(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                try:
                    second["summary"] = train(recipe(ws, out, "method=sft", "max_steps=1", "seed=5"), resume=True)
                except UserError as e:
                    second["error"] = str(e)

    patch_trainer(lambda t: t.add_callback(StartAnother()))
    first = train(recipe(ws, out, "method=sft", "max_steps=2"))
    assert "summary" not in second, "two runs trained into one output_dir"
    assert f"is in use by another emkd run (pid {os.getpid()}" in second["error"]
    assert first["global_step"] == 2 and json.loads((out / "recipe.json").read_text())["seed"] == 0


def test_a_fresh_run_into_a_used_output_dir_is_refused_unless_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "run"
    train(recipe(ws, out, "method=sft", "max_steps=2", "save_steps=2"))
    before = load_file(str(out / "final" / "model.safetensors"))
    capsys.readouterr()
    assert main(["train", *cli_args(ws, out, "method=sft", "max_steps=2", "seed=7")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files (checkpoint-2, environment.json, final" in err[0]
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert same_weights(before, load_file(str(out / "final" / "model.safetensors")))  # untouched

    # --overwrite: the old run is deleted before anything of the new one is written, so a crash in the new run's
    # first save cannot leave new weights next to the old optimizer under the old completion marker
    class Crash(BaseException):
        pass

    import transformers

    real = transformers.Trainer._save_optimizer_and_scheduler

    def crash(self, output_dir):
        raise Crash

    transformers.Trainer._save_optimizer_and_scheduler = crash
    try:
        with pytest.raises(Crash):
            train(recipe(ws, out, "method=sft", "max_steps=2", "save_steps=2", "seed=7"), overwrite=True)
    finally:
        transformers.Trainer._save_optimizer_and_scheduler = real
    assert not (out / "final").exists() and last_complete_checkpoint(out) is None
    summary = train(recipe(ws, out, "method=sft", "max_steps=2", "save_steps=2", "seed=7"), resume=True)
    assert summary["resumed_from"] is None and summary["global_step"] == 2


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(ws, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / "emkd.lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "then"}))
    summary = train(recipe(ws, out, "method=sft", "max_steps=1"))
    assert summary["global_step"] == 1
    err = capsys.readouterr().err
    assert f"took over the lock of a run that is no longer running (pid {dead.pid} on h" in err
    assert not (out / "emkd.lock").exists()


def test_resume_refuses_a_checkpoint_of_another_recipe(ws, tmp_path):
    out = tmp_path / "run"
    partial_run(ws, out, 2)
    with pytest.raises(UserError, match=r"checkpoint-2 was written by a different recipe \(seed: 0 there, 1 now\)"):
        train(recipe(ws, out, *CKPT, "seed=1"), resume=True)
    # what a resumed run may change: its length and its bookkeeping
    summary = train(recipe(ws, out, *CKPT, "max_steps=4", "save_total_limit=3", "logging_steps=2"), resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4


# ---- 3. a kill between saving and rotating ---------------------------------------------------------------------
KILL_IN_ROTATION = """
import os, shutil, signal, sys
from emkd.training.config import load_recipe
from emkd.training.run import train

real = shutil.rmtree
def rmtree(path, *args, **kwargs):  # the rotation deletes checkpoint-2: die right after it
    real(path, *args, **kwargs)
    if os.path.basename(str(path)) == "checkpoint-2":
        os.kill(os.getpid(), signal.SIGKILL)
shutil.rmtree = rmtree
train(load_recipe(None, sys.argv[1:]))
"""


def test_kill_right_after_rotation_still_leaves_a_complete_checkpoint(ws, tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_ROTATION, *args(ws, out, *CKPT, "save_total_limit=1")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "checkpoint-2").exists()  # rotated away ...
    assert last_complete_checkpoint(out).name == "checkpoint-4"  # ... only after its successor was complete
    resumed = train(recipe(ws, out, *CKPT, "save_total_limit=1"), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    assert same_weights(uninterrupted, load_file(str(out / "final" / "model.safetensors")))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert "took over the lock of a run that is no longer running" in capsys.readouterr().err


# ---- 4. damaged checkpoints --------------------------------------------------------------------------------------
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 32):  # the middle: tensor data, not a header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage, problem", [
    ("model.safetensors", truncate, "bytes, "),
    ("model.safetensors", flip_bytes, "does not match the checksum"),
    ("optimizer.pt", flip_bytes, "does not match the checksum"),
])
def test_resume_falls_back_to_the_newest_intact_checkpoint(ws, tmp_path, uninterrupted, capsys, name, damage,
                                                           problem):
    out = tmp_path / "run"
    partial_run(ws, out, 4, "save_total_limit=0")
    damage(out / "checkpoint-4" / name)
    resumed = train(recipe(ws, out, *CKPT, "save_total_limit=0"), resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    err = capsys.readouterr().err
    assert f"checkpoint-4 is damaged ({name} " in err and problem in err and "resuming from checkpoint-2" in err
    assert (out / "damaged-checkpoint-4").is_dir()  # set aside, not deleted
    assert same_weights(uninterrupted, load_file(str(out / "final" / "model.safetensors")))
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # the abandoned steps 3-4 are logged once
    marker = json.loads((out / "checkpoint-6" / COMPLETE_MARKER).read_text())  # what made the damage visible
    assert marker["files"][name]["size"] == (out / "checkpoint-6" / name).stat().st_size
    assert len(marker["files"][name]["sha256"]) == 64


def test_resume_with_only_damaged_checkpoints_changes_nothing_and_says_why(ws, tmp_path):
    out = tmp_path / "run"
    partial_run(ws, out, 2, "save_total_limit=0")
    truncate(out / "checkpoint-2" / "model.safetensors")
    with pytest.raises(UserError, match=r"--resume: no intact checkpoint in .*checkpoint-2: model.safetensors has "):
        train(recipe(ws, out, *CKPT), resume=True)
    assert (out / "checkpoint-2").is_dir()


# ---- 5. interrupted runs exit non-zero -------------------------------------------------------------------------------
def test_sigterm_exits_143_after_saving(ws, tmp_path, patch_trainer, capsys):
    class SendSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    patch_trainer(lambda t: t.add_callback(SendSigterm()))
    out = tmp_path / "run"
    assert main(["train", *cli_args(ws, out, "method=sft", "max_steps=50")]) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at step 2" in capsys.readouterr().err
    assert last_complete_checkpoint(out).name == "checkpoint-2" and not (out / "final").exists()


# ---- 7. recipe values are checked at load ---------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    ("max_steps: 1.5", "max_steps must be int, got 1.5"),
    ("loss: {alpha: abc}", "loss.alpha must be float, got 'abc'"),
    ("loss: {alpah: 0.5}", "unknown loss option 'loss.alpah' of method 'emkd' (did you mean 'loss.alpha'?)"),
    ("loss: {matching: nearest}", "loss options of method 'emkd': matching must be one of"),
    ("train_vision_tower: maybe", "train_vision_tower must be bool, got 'maybe'"),
    ("lr_scheduler: cosin", "lr_scheduler 'cosin' is not a transformers scheduler (did you mean 'cosine'?)"),
    ("learning_rate: -1", "learning_rate must be a positive number, got -1.0"),
    ("on_nonfinite: ignore", "on_nonfinite must be 'stop' or 'skip', got 'ignore'"),
])
def test_bad_recipe_values_are_one_error_at_load_naming_file_and_key(tmp_path, capsys, line, expected):
    path = tmp_path / "r.yaml"
    path.write_text(f"method: emkd\nstudent: {tmp_path / 'no-model'}\n{line}\n")
    assert main(["train", str(path)]) == 2  # before any model loads: the student does not even exist
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"emkd train: error: {path}: ") and expected in err[0], err


def test_sft_loss_options_come_from_its_loss_signature():
    with pytest.raises(UserError, match=r"unknown loss option 'loss.temperature' of method 'sft' \(options: "
                                        r"chunk_size, implementation\)"):
        load_recipe(None, ["method=sft", "loss.temperature=2"])
    config = load_recipe(None, ["method=emkd", "loss.gamma=0", "loss.alpha=1e-3"])
    assert config.loss == {"gamma": 0.0, "alpha": 0.001}  # YAML's int and string, taken as the declared float

"""``emkd train``: a recipe read top to bottom — setup, train, save.

``train(config)`` loads the student and (unless the method needs none: ``sft``) the teacher from local directories —
or, with ``teacher_cache``, only the teacher's vision side and the cache of its outputs — checks that they tokenize text
identically, sets what the stage trains, builds the pair data set, and runs
:class:`~emkd.training.trainer.DistillTrainer`. Under ``torchrun`` every process runs this same function; the
Trainer splits the batches.

``output_dir`` belongs to one run: while it trains it holds ``emkd.lock`` (:class:`RunLock`), and a new run into a
folder that already holds something is refused unless it continues that run (``resume=True``, ``--resume``) or
replaces it (``overwrite=True``, ``--overwrite``). All of this is decided before any model loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from transformers import TrainingArguments, set_seed
from transformers.integrations import TensorBoardCallback

try:
    import fcntl
except ImportError:  # not POSIX: runs go unlocked
    fcntl = None

from emkd.cache import load_cached_teacher
from emkd.data import PairCollator, PairDataset
from emkd.models import EfficientMLLMAdapter, check_same_tokenization, load_student, load_teacher
from emkd.models.compose import DTYPES
from emkd.compat import installed_versions
from emkd.errors import NonFiniteError, OutputDirError, UserError
from emkd.training.config import TrainConfig, check_paths, check_trackers
from emkd.training.methods import METHODS, build_method
from emkd.training.stages import apply_stage, trained_parts
from emkd.training.trainer import (
    COMPLETE_MARKER,
    DAMAGED_PREFIX,
    VSD_PROJECTOR,
    DistillTrainer,
    InterruptCallback,
    JsonlLogger,
    checkpoint_step,
    last_complete_checkpoint,
    select_resume_checkpoint,
    truncate_log,
)

LOCK_FILE = "emkd.lock"
# Where the trackers of report_to write inside output_dir: TensorBoard's event files, and wandb's offline runs
# (WANDB_DIR, unless set).
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
# What a run writes into output_dir (all that --overwrite deletes; anything else there is left alone).
RUN_FILES = ("log.jsonl", "recipe.json", "environment.json", "summary.json", "final", "final.partial", "final.old",
             TENSORBOARD_DIR, WANDB_DIR)
# Recipe keys a resumed run may change: they do not change what is being trained (the length of the run does: a
# longer max_steps stretches the schedule from the checkpoint on). The learning rate and its schedule are not among
# them: the checkpoint's optimizer and scheduler states would silently override a new value.
NOT_FINGERPRINTED = ("output_dir", "logging_steps", "save_steps", "save_total_limit", "dataloader_workers", "path_help",
                     "on_nonfinite", "max_consecutive_nonfinite", "max_steps", "num_epochs", "report_to", "run_name",
                     # how the student's step is computed, not what it computes (the same loss and gradients): a run
                     # that ran out of memory may resume with checkpointing on
                     "gradient_checkpointing", "torch_compile")
# Keys added after runs were first fingerprinted, recorded only when set (not None, not false): a checkpoint written
# before they existed still resumes under the same recipe, and one written with a value refuses a recipe without it.
RECORDED_WHEN_SET = ("vision_tower_lr", "projector_lr", "bf16", "fp16")


def run_recipe(config: TrainConfig) -> dict[str, Any]:
    """The recipe values that decide the training trajectory, as JSON: every checkpoint records them (and their
    fingerprint), and ``--resume`` takes only checkpoints that recorded the same."""
    values = dataclasses.asdict(config)
    for key in NOT_FINGERPRINTED:
        values.pop(key, None)
    for key in RECORDED_WHEN_SET:
        if values.get(key) is None or values.get(key) is False:
            values.pop(key, None)
    return json.loads(json.dumps(values))


def _launch_rank() -> int:
    """This process's rank under ``torchrun`` (``RANK``), known before the process group exists."""
    return int(os.environ.get("RANK", "0"))


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """``output_dir/emkd.lock``: held with ``flock`` while a run is alive.

    The kernel releases the lock when its process ends, however it ends (``kill -9`` included), so a lock left by a
    dead run is taken over, with a warning naming it; one held by a live run refuses the second run with
    :class:`~emkd.errors.OutputDirError` naming the holder (pid, host, start time, which the file records). Under
    ``torchrun`` only rank 0 takes it. On file systems without ``flock`` (some network mounts) ``acquire`` warns and
    runs unlocked.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.previous: dict[str, Any] | None = None  # what a dead run left in the file
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise OutputDirError(
                    f"output_dir={self.path.parent} is in use by another emkd run ({_describe(holder)}): wait for it "
                    f"to finish or stop it, or choose another output_dir"
                ) from None
            except OSError as e:  # flock not supported here
                os.close(fd)
                print(f"emkd train: warning: cannot lock {self.path} ({e}); two runs into one output_dir will not be "
                      "detected", file=sys.stderr)
                return
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed (its run ended) between our open and our lock: lock the new one
        self.previous = self._read(fd) or None
        if self.previous:
            print(f"emkd train: warning: output_dir={self.path.parent}: took over the lock of a run that is no longer "
                  f"running ({_describe(self.previous)}); it ended without cleaning up (killed?)", file=sys.stderr)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a run waiting on the old file notices (see acquire)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            data = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}
        return data if isinstance(data, dict) else {}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def prepare_output_dir(config: TrainConfig, resume: bool, overwrite: bool) -> Path | None:
    """Make ``output_dir`` ready for this run; return the checkpoint to resume from, or ``None``.

    * a fresh run (neither flag) needs an empty or absent folder (``emkd.lock`` aside);
    * ``overwrite`` deletes what an earlier run wrote (checkpoints, ``final``, logs, ``recipe.json``, ...);
    * ``resume`` takes the newest intact checkpoint of the same recipe (:func:`select_resume_checkpoint`). Newer
      damaged checkpoints are set aside as ``damaged-checkpoint-N`` with a warning naming what is wrong, unfinished
      ones deleted, and ``log.jsonl`` cut back to the checkpoint's step. With no checkpoint at all it starts from
      step 0, unless the folder holds a finished model (``final``) or only damaged checkpoints: that is refused.

    Raises :class:`~emkd.errors.OutputDirError` (nothing on disk changed) when the folder cannot be used as asked.
    """
    out = Path(config.output_dir)
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if overwrite:
        removed = [name for name in entries
                   if name in RUN_FILES or name.startswith(("checkpoint-", DAMAGED_PREFIX + "checkpoint-"))]
        for name in removed:
            _remove(out / name)
        if removed:
            print(f"--overwrite: removed {', '.join(removed)} from {out}")
        return None
    if not resume:
        if entries:
            listed = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
            raise OutputDirError(
                f"output_dir={out} already holds files ({listed}): pass --resume to continue the run there, "
                f"--overwrite to delete it and start over, or choose another output_dir"
            )
        return None
    plan = select_resume_checkpoint(out, run_recipe(config))
    if plan.checkpoint is None and plan.damaged:
        damaged = "; ".join(f"{p.name}: {', '.join(why)}" for p, why in plan.damaged.items())
        raise OutputDirError(f"--resume: no intact checkpoint in {out} ({damaged}); nothing was changed. Pass "
                             f"--overwrite to start over")
    if plan.checkpoint is None and (out / "final").exists():
        raise OutputDirError(f"--resume: {out} holds a finished model (final/) and no checkpoint to continue from; "
                             f"pass --overwrite to train again")
    for path, why in plan.damaged.items():
        aside = path.with_name(DAMAGED_PREFIX + path.name)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
        fallback = plan.checkpoint.name if plan.checkpoint else "step 0"
        print(f"emkd train: warning: {path} is damaged ({'; '.join(why)}); moved to {aside.name}, resuming from "
              f"{fallback}", file=sys.stderr)
    for path in plan.incomplete:
        shutil.rmtree(path)
        print(f"emkd train: warning: deleted {path}: its save did not finish (no {COMPLETE_MARKER} marker)",
              file=sys.stderr)
    step = checkpoint_step(plan.checkpoint) if plan.checkpoint else 0
    if plan.checkpoint is None:
        print(f"--resume: no complete checkpoint in {out}; starting from the beginning")
    dropped = truncate_log(out / "log.jsonl", step)
    if dropped:
        print(f"--resume: removed {dropped} records after step {step} from {out / 'log.jsonl'}")
    return plan.checkpoint


def _share(value: Any) -> Any:
    """Rank 0's ``value`` on every process (the decisions about ``output_dir`` are rank 0's)."""
    if dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def check_precision(config: TrainConfig, source: str = "the recipe", cuda: bool | None = None) -> str | None:
    """Refuse ``fp16`` without a CUDA GPU, before any model loads (``cuda``: whether one is visible, default
    ``torch.cuda.is_available()``); return the line a run prints for ``bf16`` on a CPU, else ``None``."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if config.fp16 and not cuda:
        raise UserError(
            f"{source}: fp16=true needs a CUDA GPU and none is visible (float16 mixed precision with loss scaling runs "
            "on GPUs only); set bf16=true instead, which also works on a CPU, or unset fp16"
        )
    if config.bf16 and not cuda:
        return ("bf16 on a CPU: the student's forward runs under torch.autocast('cpu', dtype=torch.bfloat16), weights "
                "and optimizer stay float32; expect it slower than float32 unless the CPU has bfloat16 instructions")
    return None


def training_arguments(config: TrainConfig, **overrides: Any) -> TrainingArguments:
    """The ``TrainingArguments`` a recipe stands for (CPU when no GPU is visible)."""
    kwargs = dict(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        num_train_epochs=config.num_epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        # transformers >= 5 reads warmup_steps in [0, 1) as a fraction of the total steps (warmup_ratio is gone)
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        report_to=list(config.report_to),
        run_name=run_name(config),
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers,
        use_cpu=not torch.cuda.is_available(),
        # a trained tower has parameters no loss reaches (the layers after vision_feature_layer, its last norm)
        ddp_find_unused_parameters=trained_parts(config.stage, config.train_vision_tower)["vision_tower"],
        disable_tqdm=False,
        bf16=config.bf16,
        fp16=config.fp16,
        activation_checkpointing=config.gradient_checkpointing,  # transformers' name for gradient checkpointing
        torch_compile=config.torch_compile,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run_name(config: TrainConfig) -> str:
    """The run's name in the trackers: the recipe's ``run_name``, else the name of its ``output_dir`` folder."""
    return config.run_name or Path(config.output_dir).resolve().name


def attach_tensorboard(trainer: DistillTrainer, config: TrainConfig, resumed_step: int | None = None) -> Path | None:
    """Point the run's TensorBoard callback (``report_to: tensorboard``) at ``output_dir/tensorboard``, or at
    ``TENSORBOARD_LOGGING_DIR`` when that is set; return the folder (``None`` without TensorBoard).

    A run resumed from step ``resumed_step`` writes with ``purge_step = resumed_step + 1``: TensorBoard hides what an
    earlier attempt logged after the checkpoint, as ``log.jsonl`` is cut back, so every step shows once.
    """
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
    if callback is None:
        return None
    if callback.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset
        callback.logging_dir = str(Path(config.output_dir) / TENSORBOARD_DIR)
    if resumed_step is not None and trainer.is_world_process_zero() and callback.tb_writer is None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # transformers' fallback when only tensorboardX is installed
            from tensorboardX import SummaryWriter
        callback.tb_writer = SummaryWriter(log_dir=callback.logging_dir, purge_step=resumed_step + 1)
    return Path(callback.logging_dir)


@contextmanager
def tracker_environment(config: TrainConfig) -> Iterator[None]:
    """While the run trains: wandb's files under ``output_dir`` (``WANDB_DIR``) in the project ``emkd``
    (``WANDB_PROJECT``), each unless already set, and afterwards the environment as it was and the wandb run that
    training started finished (one started by the caller is left open)."""
    defaults, wandb = {}, None
    if "wandb" in config.report_to:
        import wandb

        defaults = {"WANDB_DIR": str(Path(config.output_dir).resolve()), "WANDB_PROJECT": "emkd"}
    added = {key: value for key, value in defaults.items() if key not in os.environ}
    callers_run = wandb is not None and wandb.run is not None
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)
        if wandb is not None and not callers_run and wandb.run is not None:
            wandb.finish()


def learning_rates(config: TrainConfig) -> dict[str, float]:
    """Peak learning rate of each part of the student (:func:`emkd.training.stages.param_groups`): the recipe's
    ``vision_tower_lr`` and ``projector_lr`` where set, ``learning_rate`` for the rest (the language model and the
    :data:`~emkd.training.trainer.VSD_PROJECTOR`, which trains with it)."""
    lr = config.learning_rate
    return {
        "language_model": lr,
        "projector": lr if config.projector_lr is None else config.projector_lr,
        "vision_tower": lr if config.vision_tower_lr is None else config.vision_tower_lr,
        VSD_PROJECTOR: lr,
    }


def _hidden_size(model: torch.nn.Module) -> int:
    """Width of the hidden states a model's LM head reads (a cached teacher's ``model`` is its head alone)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else model
    return int(head.weight.shape[1])


def build_vsd_projector(method: Any, student: torch.nn.Module, teacher: Any) -> torch.nn.Linear | None:
    """EM-KD's learnable map ``P`` of the hidden-state VSD ablation (SPEC §3, EM-KD Table 3c,
    ``loss.vsd_target=hidden``): ``VSD_b = mean_m MSE(P h_s[s_m], h_t[t_m])``.

    A bias-free ``Linear(Ds, Dt)`` in float32 (the loss projects float32 hidden states) when the method's loss takes
    hidden-state VSD and the student's hidden size ``Ds`` differs from the teacher's ``Dt``; ``None`` otherwise (with
    equal sizes the loss compares ``h_s`` and ``h_t`` directly). Drawn from the run's seed, like the student's own
    initialisation.
    """
    loss = getattr(method, "loss_fn", None)
    if teacher is None or getattr(loss, "vsd_target", None) != "hidden":
        return None
    ds, dt = _hidden_size(student), _hidden_size(teacher.model)
    return None if ds == dt else torch.nn.Linear(ds, dt, bias=False, dtype=torch.float32)


def build_trainer(config: TrainConfig, source: str = "the recipe") -> DistillTrainer:
    """Everything ``train`` needs, without running it (tests use this to inspect a run).

    ``source`` names the recipe in errors about its paths and trackers, which are checked before any model loads.
    """
    check_paths(config, source)
    check_trackers(config, source)
    precision_note = check_precision(config, source)
    if precision_note is not None:
        print(precision_note)
    set_seed(config.seed)
    model, student_side = load_student(config.student)
    apply_stage(model, config.stage, config.train_vision_tower)
    student = EfficientMLLMAdapter(model, student_side, return_logits=False)
    teacher = None
    loss_kwargs = {**METHODS[config.method].run_options(config), **config.loss}  # the recipe's loss: wins
    method = build_method(config.method, **loss_kwargs)
    if method.needs_teacher:
        if config.teacher_cache is not None:
            teacher = load_cached_teacher(config.teacher_cache, config.teacher)
        elif config.teacher is None:
            raise ValueError(f"method {config.method!r} needs a teacher: set teacher=DIR")
        else:
            teacher = load_teacher(config.teacher, dtype=DTYPES[config.teacher_dtype])
            teacher.return_logits = False
        check_same_tokenization(student_side.tokenizer, teacher.side.tokenizer)
    projector = build_vsd_projector(method, model, teacher)
    if projector is not None:
        # a submodule of the student, so the Trainer moves, wraps, clips and checks it with the rest; the method
        # hands it to its loss, and DistillTrainer saves it beside the model (VSD_PROJECTOR_FILE)
        model.add_module(VSD_PROJECTOR, projector)
        method.projector = projector
    teacher_side = teacher.side if teacher is not None else student_side
    if config.data.train is None:
        raise ValueError("no training data: set data.train=FILE")
    train_set = PairDataset(
        config.data.train,
        config.data.images,
        student_side,
        teacher_side,
        template=config.data.template,
        max_length=config.data.max_length,
        on_bad_sample=config.data.on_bad_sample,
        allow_outside_images=config.data.allow_outside_images,
    )
    adapters = [student] if teacher is None else [student, teacher]
    for adapter in adapters:
        adapter.check_dataset(train_set)  # a cached teacher refuses data its cache was not built from
    trainer = DistillTrainer(
        model=model,
        args=training_arguments(config),
        train_dataset=train_set,
        data_collator=PairCollator(
            student_side, teacher_side, with_index=any(adapter.needs_sample_index for adapter in adapters)
        ),
        method=method,
        student_adapter=student,
        teacher_adapter=teacher,
        on_nonfinite=config.on_nonfinite,
        max_consecutive_nonfinite=config.max_consecutive_nonfinite,
        recipe=run_recipe(config),
        callbacks=[JsonlLogger(Path(config.output_dir) / "log.jsonl")],
    )
    trainer.student_side = student_side
    trainer.part_learning_rates = learning_rates(config)
    attach_tensorboard(trainer, config)
    return trainer


def train(config: TrainConfig, resume: bool = False, source: str = "the recipe", overwrite: bool = False) -> dict[str, Any]:
    """Run a recipe; return a summary (steps, final loss, where the model is, skipped records).

    Besides checkpoints and logs, ``output_dir`` receives ``recipe.json`` (the resolved recipe) and
    ``environment.json`` (Python's and the libraries' versions, :func:`emkd.compat.installed_versions`), and the
    files of the ``report_to`` trackers that write locally (``tensorboard/``, ``wandb/``).

    ``resume`` continues the run in ``output_dir`` from its newest intact checkpoint; ``overwrite`` deletes that run
    and starts over; with neither, ``output_dir`` must be empty or absent (:func:`prepare_output_dir`). A run that
    stops on a non-finite value raises :class:`~emkd.errors.NonFiniteError` (its ``summary.json`` says so); an
    interrupted one returns ``interrupted=True`` and the ``signal``, and writes no ``final``.
    """
    if resume and overwrite:
        raise UserError("--resume continues the run in output_dir and --overwrite deletes it: pass one of them")
    check_paths(config, source)  # before the folder is touched (--overwrite deletes)
    check_trackers(config, source)
    check_precision(config, source)
    out = Path(config.output_dir)
    lock = RunLock(out)
    if _launch_rank() == 0:
        lock.acquire()
    try:
        return _train_locked(config, resume, overwrite, source)
    finally:
        lock.release()


def _train_locked(config: TrainConfig, resume: bool, overwrite: bool, source: str) -> dict[str, Any]:
    out = Path(config.output_dir)
    checkpoint = prepare_output_dir(config, resume, overwrite) if _launch_rank() == 0 else None
    trainer = build_trainer(config, source)
    checkpoint = _share(str(checkpoint) if checkpoint else None)
    if trainer.args.should_save:
        (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        (out / "environment.json").write_text(json.dumps(installed_versions(), indent=2))
        (out / "summary.json").unlink(missing_ok=True)  # an earlier attempt's
    if checkpoint:
        attach_tensorboard(trainer, config, resumed_step=checkpoint_step(checkpoint))
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    interrupt.install()
    try:
        with tracker_environment(config):
            result = trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteError as e:
        for callback in trainer.callback_handler.callbacks:  # close the progress bar before the error is printed
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
                callback.training_bar = None
        if trainer.args.should_save:
            (out / "summary.json").write_text(json.dumps({
                "status": "nonfinite", "global_step": trainer.state.global_step, "error": str(e),
                "last_complete_checkpoint": str(last_complete_checkpoint(out) or "") or None,
                "resumed_from": checkpoint}, indent=2))
        raise
    finally:
        interrupt.uninstall()
    skipped = trainer.train_dataset.skipped
    summary = {
        "status": "interrupted" if interrupt.interrupted else "finished",
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "interrupted": interrupt.interrupted,
        "signal": signal_name(interrupt.signum),
        "skipped_records": len(skipped),
        "nonfinite_skipped": trainer.guard.skipped,
        "resumed_from": checkpoint,
    }
    if skipped:
        print(f"skipped {len(skipped)} bad records:")
        for bad in skipped[:20]:
            print(f"  {bad}")
    if not interrupt.interrupted:
        summary["final_model"] = str(save_final(trainer, out))
    else:
        summary["last_complete_checkpoint"] = str(last_complete_checkpoint(out) or "") or None
    if trainer.args.should_save:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def signal_name(signum: int | None) -> str | None:
    return signal.Signals(signum).name if signum else None


def save_final(trainer: DistillTrainer, out: Path) -> Path:
    """Write ``out/final`` whole or not at all: into ``final.partial``, then renamed; never from non-finite weights."""
    final, partial, old = out / "final", out / "final.partial", out / "final.old"
    trainer.guard.check_saveable(trainer.model, None, f"the final model {final}", trainer.args, trainer.state.global_step)
    if trainer.args.should_save and partial.exists():
        shutil.rmtree(partial)
    trainer.save_model(str(partial))
    if trainer.args.should_save:
        trainer.student_side.tokenizer.save_pretrained(partial)
        trainer.student_side.image_processor.save_pretrained(partial)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return final

"""``DistillTrainer``: a ``transformers.Trainer`` that runs a distillation method.

The trainer only gathers tensors: ``compute_loss`` hands the wrapped student, the frozen teacher and the collated
batch to a :class:`emkd.training.methods.Method`. From ``transformers.Trainer`` it inherits accelerate (DDP, FSDP,
DeepSpeed), gradient accumulation, schedulers, checkpointing and resume. It adds:

* every loss component averaged over the logging window (and over processes) in each log record, written to
  ``output_dir/log.jsonl`` as well as the console;
* a finiteness guard (:class:`NonFiniteGuard`) on every optimizer step: the loss, each of its components and the
  gradient norm are checked *before* the update is applied, the weights after it; a non-finite value stops the run
  (or, with ``on_nonfinite="skip"``, drops that update) and nothing non-finite is ever saved;
* interrupt safety: SIGTERM / SIGINT ask for a checkpoint at the end of the current optimizer step, then stop;
* verified checkpoints, in this order: save every file, read each back for its size and SHA-256 (and parse the
  safetensors headers and ``trainer_state.json``), write the ``emkd-complete`` marker that records them and the
  recipe's fingerprint, *then* delete checkpoints beyond ``save_total_limit``. A crash at any point leaves the
  previous complete checkpoint in place, and :func:`select_resume_checkpoint` takes only a checkpoint whose files
  still match their marker and whose recipe is the one being resumed;
* one optimizer group per part of the student (language model, projector, vision tower), each at its own peak
  learning rate under the one schedule (:meth:`DistillTrainer.create_optimizer`);
* EM-KD's ``vsd_projector`` (``loss.vsd_target=hidden`` with different hidden sizes) trained inside the student but
  saved beside the model, in ``vsd_projector.safetensors``, and loaded from there on resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from emkd.errors import NonFiniteError, OutputDirError
from emkd.losses.normalisation import UNITS
from emkd.matching.quality import WindowHits, batch_window_hits, pooling_geometry, random_hit_rate
from emkd.models.base import DistillAdapter
from emkd.training.methods import Method, StepCounts, vision_token_counts
from emkd.training.stages import PARTS, describe_groups, param_groups

COMPLETE_MARKER = "emkd-complete"
MARKER_FORMAT = 2  # 1 (emkd before checksums): {"global_step"} only
DAMAGED_PREFIX = "damaged-"  # a damaged checkpoint set aside by --resume: damaged-checkpoint-N
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# EM-KD's learnable map P (Ds -> Dt) of vsd_target="hidden": a submodule of the student while it trains (so DDP
# reduces its gradients, clipping and the finiteness guard see it), saved beside the model, not in its weights.
VSD_PROJECTOR = "vsd_projector"
VSD_PROJECTOR_FILE = "vsd_projector.safetensors"


def _is_main() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _warn(message: str) -> None:
    print(f"emkd train: warning: {message}", file=sys.stderr, flush=True)


class JsonlLogger(TrainerCallback):
    """Append every training log record (step, loss, each component, learning rate) to ``path`` as JSON lines."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def truncate_log(path: str | Path, step: int) -> int:
    """Keep the records of ``path`` up to ``step`` (a resumed run logs the later steps again); return how many were
    dropped. A line cut short by a crash is dropped too. The file is replaced atomically."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


class Interrupted(KeyboardInterrupt):
    """A second SIGTERM / SIGINT while the first one's checkpoint is pending: stop at once, saving nothing."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"a second {signal.Signals(signum).name}: stopped without saving")
        self.signum = signum


class InterruptCallback(TrainerCallback):
    """On SIGTERM or SIGINT, save a checkpoint after the current optimizer step and stop training.

    ``signum`` is the signal received (``None`` if none): ``emkd train`` exits with ``128 + signum``.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.interrupted:  # a second signal: give up at once
            raise Interrupted(signum)
        self.interrupted = True
        self.signum = signum

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control


# ---- the finiteness guard ------------------------------------------------------------------------------------------
def _total_norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of all floating-point ``tensors`` together (NaN if any element is NaN, inf if any is infinite)."""
    tensors = [t.detach() for t in tensors if t is not None and t.numel() > 0 and t.is_floating_point()]
    if not tensors:
        return 0.0
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return float(torch.nn.utils.get_total_norm(tensors, 2.0))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


def _any_process(flag: bool, device: torch.device) -> bool:
    """``flag`` of any process: every process takes the same decision, so none waits for the others forever."""
    if not _distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class NonFiniteGuard(TrainerCallback):
    """Check every optimizer step: the loss and each component (of every micro-batch) and the gradient norm before
    the update is applied, the weights after it.

    ``policy="stop"`` raises :class:`~emkd.errors.NonFiniteError` before the update (the weights stay those of the
    previous step, nothing is saved from the bad step; the newest complete checkpoint is the last good one).
    ``policy="skip"`` drops the update (no parameter and no optimizer state changes; the step counter and the
    learning-rate schedule advance), counts it in ``skipped``, and stops once ``max_consecutive`` steps in a row were
    non-finite. Weights that turn non-finite in an update whose loss and gradients were finite cannot be undone: that
    stops the run under either policy. Under DeepSpeed the engine steps inside ``backward``, so a stop there comes
    after the update (still before any save); under fp16 loss scaling the grad scaler owns the gradient check.
    """

    def __init__(self, policy: str = "stop", max_consecutive: int = 3) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {policy!r}")
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = 0  # updates dropped so far
        self.in_a_row = 0
        self._problems: list[str] = []  # of the step being accumulated

    # what the trainer reports during the step
    def observe_loss(self, loss: torch.Tensor, components: dict[str, float]) -> None:
        value = float(loss.detach().float().sum())
        if not math.isfinite(value):
            self._problems.append(f"the loss is {value}")
        for key, part in components.items():
            if key != "loss" and not math.isfinite(part):
                self._problems.append(f"loss component '{key}' is {part}")

    def observe_gradients(self, parameters) -> None:
        norm = _total_norm([p.grad for p in parameters if p.grad is not None])
        if not math.isfinite(norm):
            self._problems.append(f"the gradient norm is {norm}")

    # the decision, before the update
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        problems, self._problems = list(dict.fromkeys(self._problems)), []
        if not _any_process(bool(problems), args.device):
            self.in_a_row = 0
            return
        step = state.global_step + 1
        what = "; ".join(problems) if problems else "a non-finite value on another process"
        self.in_a_row += 1
        if self.policy == "skip" and self.in_a_row < self.max_consecutive:
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone by the optimizer
            if state.is_world_process_zero:
                _warn(f"step {step}: {what}; update skipped ({self.in_a_row} in a row, {self.skipped} in all; "
                      f"the run stops at {self.max_consecutive} in a row)")
            return
        if self.policy == "skip":
            what += f" ({self.in_a_row} non-finite steps in a row: max_consecutive_nonfinite={self.max_consecutive})"
        raise NonFiniteError(self.message(step, what, args, applied=False))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = _total_norm(list(model.parameters()))
        if _any_process(not math.isfinite(norm), args.device):
            what = f"the weights turned non-finite (norm {norm}) in this update although its loss and gradients were finite"
            raise NonFiniteError(self.message(state.global_step + 1, what, args, applied=True))

    def check_saveable(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, what: str,
                       args, step: int) -> None:
        """Refuse to write ``what`` (a checkpoint, the final model) from non-finite weights or optimizer state."""
        problems = []
        norm = _total_norm(list(model.parameters()) + list(model.buffers()))
        if not math.isfinite(norm):
            problems.append(f"the weights are not finite (norm {norm})")
        if optimizer is not None:
            state = [t for s in optimizer.state.values() for t in s.values()
                     if isinstance(t, torch.Tensor) and t.is_floating_point()]
            norm = _total_norm(state)
            if not math.isfinite(norm):
                problems.append(f"the optimizer state is not finite (norm {norm})")
        if _any_process(bool(problems), args.device):
            text = "; ".join(problems) or "a non-finite tensor on another process"
            raise NonFiniteError(self.message(step, f"{text}: {what} was not written", args, applied=True))

    @staticmethod
    def message(step: int, what: str, args, applied: bool) -> str:
        newest = last_complete_checkpoint(args.output_dir)
        kept = ("the update was not applied and nothing was saved from it"
                if not applied else "nothing was saved from this step")
        where = f"the newest complete checkpoint, {newest}, is the last good one" if newest else \
            "no checkpoint was written yet"
        return (f"training stopped at step {step}: {what}; {kept}; {where}. Lower learning_rate (now "
                f"{args.learning_rate:g}) or max_grad_norm, or set on_nonfinite=skip to drop such steps")


# ---- checkpoints -----------------------------------------------------------------------------------------------
def recipe_fingerprint(recipe: dict[str, Any] | None) -> str | None:
    """SHA-256 of the recipe's canonical JSON (what a checkpoint records to say which recipe wrote it)."""
    if recipe is None:
        return None
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(COMPLETE_MARKER))


def _check_contents(folder: Path, step: int | None) -> list[str]:
    """What can be checked without loading tensors: safetensors headers and sizes, ``trainer_state.json``'s step."""
    from safetensors import safe_open

    problems = []
    for path in folder.rglob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # SafetensorError, OSError: the file is cut short or its header is damaged
            problems.append(f"{path.relative_to(folder)} does not open ({' '.join(str(e).split())})")
    state = folder / "trainer_state.json"
    if state.is_file():
        try:
            saved = json.loads(state.read_text()).get("global_step")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"trainer_state.json is not valid JSON ({e})")
        else:
            if step is not None and saved != step:
                problems.append(f"trainer_state.json says step {saved}, the folder's name {step}")
    return problems


def write_complete_marker(folder: str | Path, step: int, recipe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify a freshly saved checkpoint and mark it complete.

    Every file is read back for its size and SHA-256 (and flushed to disk), the safetensors headers and
    ``trainer_state.json`` are parsed; only then is ``emkd-complete`` written (atomically) with those sizes and
    checksums, ``step`` and the recipe with its fingerprint. Raises ``RuntimeError`` if what was just written does not
    read back (a full disk, a failing file system): the folder then stays unmarked and is never resumed.
    """
    folder = Path(folder)
    files = {}
    for path in _checkpoint_files(folder):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path, fsync=True)}
    problems = _check_contents(folder, step)
    if not files or problems:
        raise RuntimeError(f"checkpoint {folder} does not read back right after saving: "
                           f"{'; '.join(problems) or 'no files'}; it is left without its completion marker")
    _fsync_dir(folder)
    marker = {"format": MARKER_FORMAT, "global_step": step, "recipe_fingerprint": recipe_fingerprint(recipe),
              "recipe": recipe, "files": files}
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)
    _fsync_dir(folder)
    return marker


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The completion marker of ``folder``, ``{}`` if it is unreadable, ``None`` if there is none."""
    path = Path(folder) / COMPLETE_MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    return marker if isinstance(marker, dict) else {}


def verify_checkpoint(folder: str | Path) -> list[str]:
    """Every way ``folder`` differs from what its completion marker recorded; an empty list for an intact checkpoint.

    Re-reads every file (size, then SHA-256), so it costs one read of the checkpoint.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return ["no completion marker (its save did not finish)"]
    if not marker:
        return [f"its {COMPLETE_MARKER} marker is unreadable"]
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return [f"its {COMPLETE_MARKER} marker records no file sizes or checksums (written by an older emkd), so "
                "it cannot be verified"]
    problems = []
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected.get("size"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {expected.get('size')} were written (truncated?)")
        elif _sha256(path) != expected.get("sha256"):
            problems.append(f"{name} does not match the checksum recorded when it was written (corrupted bytes)")
    return problems


def checkpoint_step(path: str | Path) -> int:
    """The step of a ``checkpoint-N`` folder (``N``); ``ValueError`` for a folder of another name."""
    match = _CHECKPOINT.fullmatch(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-N folder")
    return int(match.group(1))


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` of ``output_dir`` that carries the completion marker, or ``None``.

    Cheap (no checksums): what :func:`select_resume_checkpoint` would start from, if its files are intact.
    """
    complete = [path for _, path in checkpoint_dirs(output_dir) if is_complete_checkpoint(path)]
    return complete[-1] if complete else None


def recipe_differences(recorded: dict[str, Any] | None, current: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: A there, B now`` for every recipe key whose value differs (nested mappings by dotted key)."""
    if recorded is None:
        return ["it records no recipe"]
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key, "<unset>"), current.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return out


@dataclass
class ResumePlan:
    """What ``--resume`` found in ``output_dir``: the checkpoint to take, and the newer ones it passed over."""

    checkpoint: Path | None = None
    damaged: dict[Path, list[str]] = field(default_factory=dict)  # marked complete, but files differ from the marker
    incomplete: list[Path] = field(default_factory=list)  # no marker: saves that did not finish


def select_resume_checkpoint(output_dir: str | Path, recipe: dict[str, Any] | None) -> ResumePlan:
    """The newest checkpoint of ``output_dir`` that is complete, intact and written by ``recipe``.

    Newer checkpoints without a marker are listed in ``incomplete``, those whose files no longer match their marker
    (truncated, corrupted, missing, or an unverifiable older marker) in ``damaged``. A complete checkpoint written by
    another recipe raises :class:`~emkd.errors.OutputDirError` naming the keys that differ: ``--resume`` continues
    the same run, never another one. Nothing on disk is changed.
    """
    plan = ResumePlan()
    fingerprint = recipe_fingerprint(recipe)
    for step, path in reversed(checkpoint_dirs(output_dir)):
        marker = read_marker(path)
        if marker is None:
            plan.incomplete.append(path)
            continue
        if marker.get("files") and marker.get("recipe_fingerprint") != fingerprint:
            diff = recipe_differences(marker.get("recipe"), recipe or {})
            raise OutputDirError(
                f"--resume: {path} was written by a different recipe ({'; '.join(diff[:6])}"
                f"{'; ...' if len(diff) > 6 else ''}); resume with the recipe that wrote it "
                f"({Path(output_dir) / 'recipe.json'}), or pass --overwrite to start this recipe over"
            )
        problems = verify_checkpoint(path)
        if problems:
            plan.damaged[path] = problems
            continue
        plan.checkpoint = path
        break
    return plan


def rotate_checkpoints(output_dir: str | Path, limit: int | None, keep: str | Path) -> list[Path]:
    """Delete checkpoints beyond the newest ``limit`` complete ones (``None`` / ``<= 0``: keep all); never ``keep``
    (the one just written) and never a complete one in favour of an incomplete one. Folders without a marker older
    than ``keep`` are leftovers of saves that did not finish and are deleted too. Returns what was deleted."""
    keep = Path(keep)
    found = checkpoint_dirs(output_dir)
    keep_step = next((step for step, path in found if path == keep), None)
    deleted = []
    complete = [path for _, path in found if is_complete_checkpoint(path)]
    kept = set(complete[-limit:]) if limit and limit > 0 else set(complete)
    kept.add(keep)
    for step, path in found:
        if path in kept:
            continue
        if is_complete_checkpoint(path) or (keep_step is not None and step < keep_step):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


# ---- the trainer -----------------------------------------------------------------------------------------------
def sharding_kind(trainer: Trainer) -> str | None:
    """``"fsdp"``, ``"zero3"`` or ``None``: whether the student's parameters are sharded outside its forward."""
    if trainer.is_fsdp_enabled:
        return "fsdp"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and int(plugin.zero_stage or 0) >= 3:
        return "zero3"
    return None


def check_sharding_supported(trainer: Trainer, method: Method) -> None:
    """Refuse what sharded training cannot compute correctly.

    A method that computes its loss inside the student's forward (``loss_fn`` of the adapter) trains correctly:
    FSDP holds the root unit (which owns the LM head) whole there and ZeRO-3 gathers the head registered as an
    external parameter (:meth:`DistillTrainer.compute_loss`). One that reads the student's parameters outside it
    (Align-TI's TPA reads the head after an augmented forward pass) would see a shard: it sets
    :attr:`~emkd.training.methods.Method.supports_sharding` to ``False`` and is refused here, with its
    ``sharding_reason``, rather than trained wrong. The frozen teacher is never part of the wrapped model: every
    process holds it whole.
    """
    kind = sharding_kind(trainer)
    if kind is not None and not method.supports_sharding:
        raise NotImplementedError(
            f"method {method.name!r} is not supported under {'FSDP' if kind == 'fsdp' else 'DeepSpeed ZeRO-3'}: "
            f"{method.sharding_reason}. Use DDP or ZeRO-2."
        )


def register_head_for_zero3(model: torch.nn.Module) -> None:
    """Tell DeepSpeed ZeRO-3 that the model's own forward reads its LM head's parameters (the ``head_fn`` loss), so
    they are gathered for the model's forward and backward, not only for the head module's."""
    import deepspeed

    head = model.get_output_embeddings()
    for param in head.parameters():
        deepspeed.zero.register_external_parameter(model, param)


class DistillTrainer(Trainer):
    """``transformers.Trainer`` whose loss is a distillation :class:`Method`.

    Args:
        method: the objective (see :data:`emkd.training.methods.METHODS`).
        student_adapter: adapter of the student (its ``model`` is the ``model`` given to the Trainer).
        teacher_adapter: adapter of the frozen teacher, or ``None`` for ``sft``.
        on_nonfinite: ``"stop"`` or ``"skip"`` (:class:`NonFiniteGuard`).
        max_consecutive_nonfinite: with ``"skip"``, stop after this many non-finite steps in a row.
        recipe: the recipe values that decide the training trajectory, recorded (with their fingerprint) in every
            checkpoint's marker so that ``--resume`` takes only checkpoints of the same recipe.
        **kwargs: everything ``transformers.Trainer`` takes.
    """

    def __init__(
        self,
        *args: Any,
        method: Method,
        student_adapter: DistillAdapter,
        teacher_adapter: DistillAdapter | None,
        on_nonfinite: str = "stop",
        max_consecutive_nonfinite: int = 3,
        recipe: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_sharding_supported(self, method)
        self._head_registered = False
        self.method = method
        self.student_adapter = student_adapter
        self.teacher_adapter = teacher_adapter
        self.recipe = recipe
        self.guard = NonFiniteGuard(on_nonfinite, max_consecutive_nonfinite)
        self.add_callback(self.guard)
        self._components: dict[str, list[float]] = defaultdict(list)
        # how often a vision pair lies in the student token's pooling window; only for pooled students of a teacher
        # with the same patch grid (emkd.matching.quality.pooling_geometry says when)
        self.match_windows = None if teacher_adapter is None else pooling_geometry(student_adapter, teacher_adapter)
        self._match_hits = WindowHits()
        self._match_random_logged = False
        if teacher_adapter is not None:
            teacher_adapter.model.eval()
            teacher_adapter.model.requires_grad_(False)
            teacher_adapter.model.to(self.args.device)

    # compute_loss returns each micro-batch's share of its optimizer step's loss: the Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of the next optimizer step and, in place of transformers' count of label tokens, their
        :class:`~emkd.training.methods.StepCounts`: every unit the method's loss terms are divided by
        (:meth:`~emkd.training.methods.Method.count_units`), summed over the micro-batches and, under
        torch.distributed, over the processes (one ``all_reduce`` per optimizer step). An objective that cannot count
        them (no ``count_units``) gets no counts: its micro-batches' means are averaged, as transformers does."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        count = getattr(self.method, "count_units", None)
        if count is None:
            return batch_samples, None
        local = [count(batch, self.student_adapter, self.teacher_adapter) for batch in batch_samples]
        totals = torch.tensor([sum(c[u] for c in local) for u in UNITS], dtype=torch.long, device=device)
        processes = 1
        if _distributed():
            dist.all_reduce(totals)
            processes = dist.get_world_size()
        self._step_parts: dict[str, float] = defaultdict(float)  # this step's logged components, summed over shares
        return batch_samples, StepCounts(dict(zip(UNITS, totals.tolist())), local, processes)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss on one micro-batch.

        In training, ``num_items_in_batch`` is the :class:`~emkd.training.methods.StepCounts` of
        :meth:`get_batch_samples`, and the loss is this micro-batch's share of the optimizer step's loss
        (:meth:`~emkd.training.methods.StepOutput.step_share`): each term's sum divided by the count of its unit over
        every micro-batch and process of the step, times the number of processes. Summed by gradient accumulation
        (the Trainer does not divide it: ``loss_is_scaled_for_ga``) and averaged over processes by DDP, FSDP or
        DeepSpeed, the gradient is that of one batch of all the step's samples; with one micro-batch and one process
        the loss is the method's own (means over the micro-batch). The logged components are step values, averaged
        over the logging window: the same normalisation, summed over the step's micro-batches.

        Otherwise (evaluation, or a ``training_step`` called without counts) the loss is the method's mean over the
        micro-batch, divided in training by the accumulation steps as the Trainer would.
        """
        if self.teacher_adapter is not None:
            self.teacher_adapter.model.eval()
        if not self._head_registered and sharding_kind(self) == "zero3":  # the engine exists from the first step on
            register_head_for_zero3(self.model)
            self._head_registered = True
        out = self.method(self.student_adapter, self.teacher_adapter, inputs, model=model)
        loss = out.loss
        if model.training:
            self.guard.observe_loss(out.loss, out.components)
            if self.match_windows is not None and out.matches is not None:
                self._match_hits += batch_window_hits(
                    out.matches, vision_token_counts(inputs["student"], self.student_adapter.side.image_token_id),
                    vision_token_counts(inputs["teacher"], self.teacher_adapter.side.image_token_id), self.match_windows,
                    out.matching)
            if isinstance(num_items_in_batch, StepCounts):
                loss, shares = out.step_share(num_items_in_batch)
                for key, value in shares.items():
                    self._step_parts[key] += value
            else:
                loss = loss / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
                for key, value in out.components.items():
                    self._components[key].append(value)
        return (loss, {"loss": loss}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the last micro-batch of an optimizer step: the gradients are complete (and, under DDP, reduced)
        if self.accelerator.sync_gradients:
            if isinstance(num_items_in_batch, StepCounts):  # the step's components, one value per step
                for key, value in self._step_parts.items():
                    self._components[key].append(value)
                self._step_parts.clear()
            if not self.is_deepspeed_enabled and self.accelerator.scaler is None:
                self.guard.observe_gradients(model.parameters())
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._components and "loss" in logs:
            keys = sorted(self._components)
            # a skipped step's non-finite values stay out of the means (a window of only those gives NaN)
            finite = [[v for v in self._components[k] if math.isfinite(v)] for k in keys]
            means = torch.tensor([sum(v) / len(v) if v else math.nan for v in finite], dtype=torch.float64)
            if dist.is_available() and dist.is_initialized():
                means = means.to(self.args.device)
                dist.all_reduce(means)
                means = means.cpu() / dist.get_world_size()
            for key, value in zip(keys, means.tolist()):
                logs["objective" if key == "loss" else key] = round(value, 6)
            if self.guard.skipped:
                logs["nonfinite_skipped"] = self.guard.skipped
            self._components.clear()
            if self.match_windows is not None:  # every process reaches this together
                hits, self._match_hits = self._match_hits.all_reduce(self.args.device), WindowHits()
                if hits.rate is not None:
                    logs["match_in_window"] = round(hits.rate, 6)
                if not self._match_random_logged:
                    logs["match_in_window_random"] = round(random_hit_rate(self.match_windows), 6)
                    self._match_random_logged = True
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        """Save, verify, mark complete, then rotate (transformers rotates inside its save, before our marker)."""
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"checkpoint-{step}"
        self.guard.check_saveable(self.model, self.optimizer, f"checkpoint {folder}", self.args, step)
        if self.args.should_save and folder.exists():
            # an unmarked leftover of a save that did not finish, or of a timeline --resume abandoned
            shutil.rmtree(folder)
        if _distributed():
            dist.barrier()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation inside transformers' save: it would come before the marker
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if _distributed():
            dist.barrier()
        if self.args.should_save:
            write_complete_marker(folder, step, self.recipe)
            rotate_checkpoints(run_dir, limit, keep=folder)
        if _distributed():
            dist.barrier()

    # ---- the optimizer: one learning rate per part of the student ------------------------------------------------
    #: peak learning rate by part (:func:`emkd.training.stages.param_groups`), set by the run from the recipe
    #: (:func:`emkd.training.run.learning_rates`); parts it leaves out, and all of them when ``None``, train at
    #: ``args.learning_rate``
    part_learning_rates: dict[str, float] | None = None

    def create_optimizer(self, model=None):
        """``transformers``' optimizer (``args.optim``: AdamW) over one parameter group per part of the student
        (language model, projector, vision tower, :data:`VSD_PROJECTOR`) and weight-decay flag, each at its part's
        peak learning rate under the one scheduler. Biases and norms get no weight decay
        (``Trainer.get_decay_parameter_names``, as ``Trainer.create_optimizer`` does). Prints the trainable
        parameters and learning rate of each part once (``param_group_summary``)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        rates = dict.fromkeys((*PARTS, VSD_PROJECTOR), self.args.learning_rate)
        rates.update(self.part_learning_rates or {})
        groups = param_groups(opt_model.named_parameters(), rates, self.args.weight_decay,
                              set(self.get_decay_parameter_names(opt_model)))
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        own = sorted({"params", "model", "optimizer_dict"} & set(kwargs))
        if own:
            raise NotImplementedError(f"optim={self.args.optim} builds its own parameter groups ({', '.join(own)}); "
                                      "emkd's per-part learning rates need an optimizer over parameter groups (AdamW)")
        self.optimizer = optimizer_cls(groups, **kwargs)
        self.param_group_summary = describe_groups(groups)
        if self.is_world_process_zero():
            print("emkd train: trainable parameters and peak learning rates (one schedule scales them all):\n  "
                  + "\n  ".join(self.param_group_summary), flush=True)
        return self.optimizer

    # ---- the vsd_projector: trained inside the student, saved beside it ---------------------------------------
    def vsd_projector(self) -> torch.nn.Module | None:
        """The student's :data:`VSD_PROJECTOR` submodule, or ``None`` when the run has none."""
        return getattr(self.accelerator.unwrap_model(self.model), VSD_PROJECTOR, None)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``transformers``' save of the model without the :data:`VSD_PROJECTOR` weights, which go to
        :data:`VSD_PROJECTOR_FILE` beside it (keys ``weight`` ...): the model directory loads as the plain student."""
        if self.vsd_projector() is None:
            return super()._save(output_dir, state_dict)
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        prefix = VSD_PROJECTOR + "."
        projector = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        super()._save(output_dir, {k: v for k, v in state_dict.items() if not k.startswith(prefix)})
        if self.args.should_save and projector:  # empty: ZeRO-3 without gathered weights (the engine saves them)
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in projector.items()},
                      os.path.join(output_dir or self.args.output_dir, VSD_PROJECTOR_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """``transformers``' load of the model weights, then the :data:`VSD_PROJECTOR` from its own file."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        projector = self.vsd_projector()
        if projector is None:
            return
        path = Path(resume_from_checkpoint) / VSD_PROJECTOR_FILE
        if not path.is_file():
            raise OutputDirError(f"--resume: {resume_from_checkpoint} holds no {VSD_PROJECTOR_FILE}, which this "
                                 "recipe trains (loss.vsd_target=hidden with different hidden sizes)")
        from safetensors.torch import load_file

        projector.load_state_dict(load_file(str(path)))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """``transformers``' warnings about the keys a checkpoint lacks, less the :data:`VSD_PROJECTOR`'s (saved
        beside the model, loaded by :meth:`_load_from_checkpoint`)."""
        prefix = VSD_PROJECTOR + "."
        missing = [k for k in load_result.missing_keys if not k.startswith(prefix)]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

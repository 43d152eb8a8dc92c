"""``DistillTrainer``: a ``transformers.Trainer`` that runs a distillation method.

The trainer only gathers tensors: ``compute_loss`` hands the wrapped student, the frozen teacher and the collated
batch to a :class:`emkd.training.methods.Method`. From ``transformers.Trainer`` it inherits accelerate (DDP, FSDP,
DeepSpeed), gradient accumulation, schedulers, checkpointing and resume. It adds:

* every loss component averaged over the logging window (and over processes) in each log record, written to
  ``output_dir/log.jsonl`` as well as the console;
* interrupt safety: SIGTERM / SIGINT ask for a checkpoint at the end of the current optimizer step, then stop;
* complete-checkpoint markers: a checkpoint counts only once ``emkd-complete`` is written after every file in it,
  so a crash while saving never leaves a checkpoint that ``--resume`` would load.
"""

from __future__ import annotations

import json
import os
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from emkd.models.base import DistillAdapter
from emkd.training.methods import Method

COMPLETE_MARKER = "emkd-complete"


def _is_main() -> bool:
    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


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


class InterruptCallback(TrainerCallback):
    """On SIGTERM or SIGINT, save a checkpoint after the current optimizer step and stop training."""

    def __init__(self) -> None:
        self.interrupted = False
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
            raise KeyboardInterrupt
        self.interrupted = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control


def is_complete_checkpoint(path: str | Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-step ``checkpoint-N`` of ``output_dir`` that carries the completion marker, or ``None``."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for child in output_dir.iterdir():
        if child.is_dir() and child.name.startswith("checkpoint-") and child.name[11:].isdigit():
            if is_complete_checkpoint(child):
                found.append((int(child.name[11:]), child))
    return max(found)[1] if found else None


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

    Every method but Align-TI computes its loss inside the student's forward (``loss_fn`` of the adapter), where
    FSDP holds the root unit (which owns the LM head) whole and ZeRO-3 gathers the head registered as an external
    parameter (:meth:`DistillTrainer.compute_loss`). Align-TI's TPA reads the student head after an augmented
    forward pass, outside it: under sharding that head is a shard, so it is refused rather than trained wrong.
    The frozen teacher is never part of the wrapped model: every process holds it whole.
    """
    kind = sharding_kind(trainer)
    if kind is not None and method.name == "align_ti":
        raise NotImplementedError(
            f"method 'align_ti' is not supported under {'FSDP' if kind == 'fsdp' else 'DeepSpeed ZeRO-3'}: TPA reads "
            "the student's LM head outside its forward pass, where it is sharded. Use DDP or ZeRO-2."
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
        **kwargs: everything ``transformers.Trainer`` takes.
    """

    def __init__(
        self,
        *args: Any,
        method: Method,
        student_adapter: DistillAdapter,
        teacher_adapter: DistillAdapter | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_sharding_supported(self, method)
        self._head_registered = False
        self.method = method
        self.student_adapter = student_adapter
        self.teacher_adapter = teacher_adapter
        self._components: dict[str, list[float]] = defaultdict(list)
        if teacher_adapter is not None:
            teacher_adapter.model.eval()
            teacher_adapter.model.requires_grad_(False)
            teacher_adapter.model.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher_adapter is not None:
            self.teacher_adapter.model.eval()
        if not self._head_registered and sharding_kind(self) == "zero3":  # the engine exists from the first step on
            register_head_for_zero3(self.model)
            self._head_registered = True
        out = self.method(self.student_adapter, self.teacher_adapter, inputs, model=model)
        if model.training:
            for key, value in out.components.items():
                self._components[key].append(value)
        return (out.loss, {"loss": out.loss}) if return_outputs else out.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._components and "loss" in logs:
            keys = sorted(self._components)
            means = torch.tensor([sum(self._components[k]) / len(self._components[k]) for k in keys], dtype=torch.float64)
            if dist.is_available() and dist.is_initialized():
                means = means.to(self.args.device)
                dist.all_reduce(means)
                means = means.cpu() / dist.get_world_size()
            for key, value in zip(keys, means.tolist()):
                logs["objective" if key == "loss" else key] = round(value, 6)
            self._components.clear()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            tmp = folder / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps({"global_step": self.state.global_step}))
            os.replace(tmp, folder / COMPLETE_MARKER)

"""``emkd train``: a recipe read top to bottom — setup, train, save.

``train(config)`` loads the student and (unless the method is ``sft``) the teacher from local directories — or, with
``teacher_cache``, only the teacher's vision side and the cache of its outputs — checks that they tokenize text
identically, sets what the stage trains, builds the pair data set, and runs
:class:`~emkd.training.trainer.DistillTrainer`. Under ``torchrun`` every process runs this same function; the
Trainer splits the batches.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from emkd.data import PairCollator, PairDataset
from emkd.models import EfficientMLLMAdapter, check_same_tokenization, load_student, load_teacher
from emkd.compat import installed_versions
from emkd.training.config import TrainConfig, check_paths
from emkd.training.methods import build_method
from emkd.training.stages import apply_stage
from emkd.training.teacher_cache import CachedTeacher, load_cached_teacher
from emkd.training.trainer import DistillTrainer, InterruptCallback, JsonlLogger, last_complete_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps > 0 else "no",
        save_steps=max(config.save_steps, 1),
        save_total_limit=config.save_total_limit,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=config.dataloader_workers,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def resolve_iva_layer(config: TrainConfig) -> int:
    """Align-TI's IVA layer: ``irs_layer`` if set, else ``best_layer`` of the ``emkd irs`` JSON in ``irs_file``."""
    if config.irs_layer is not None:
        return config.irs_layer
    if config.irs_file is None:
        raise ValueError(
            "method 'align_ti' needs the teacher layer of IVA's weights: run `emkd irs` and set irs_file=PATH/irs.json, "
            "or set irs_layer=N"
        )
    return int(json.loads(Path(config.irs_file).read_text())["best_layer"])


def build_trainer(config: TrainConfig, source: str = "the recipe") -> DistillTrainer:
    """Everything ``train`` needs, without running it (tests use this to inspect a run).

    ``source`` names the recipe in errors about its paths, which are checked before any model loads.
    """
    check_paths(config, source)
    set_seed(config.seed)
    model, student_side = load_student(config.student)
    apply_stage(model, config.stage, config.train_vision_tower)
    student = EfficientMLLMAdapter(model, student_side, return_logits=False)
    teacher = None
    loss_kwargs = dict(config.loss)
    if config.method == "align_ti" and config.teacher is not None:
        loss_kwargs.setdefault("iva_layer", resolve_iva_layer(config))
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
    )
    cached = isinstance(teacher, CachedTeacher)
    if cached:
        teacher.cache.check_dataset(train_set)
    trainer = DistillTrainer(
        model=model,
        args=training_arguments(config),
        train_dataset=train_set,
        data_collator=PairCollator(student_side, teacher_side, with_index=cached),
        method=method,
        student_adapter=student,
        teacher_adapter=teacher,
        callbacks=[JsonlLogger(Path(config.output_dir) / "log.jsonl")],
    )
    trainer.student_side = student_side
    return trainer


def train(config: TrainConfig, resume: bool = False, source: str = "the recipe") -> dict[str, Any]:
    """Run a recipe; return a summary (steps, final loss, where the model is, skipped records).

    Besides checkpoints and logs, ``output_dir`` receives ``recipe.json`` (the resolved recipe) and
    ``environment.json`` (Python's and the libraries' versions, :func:`emkd.compat.installed_versions`).
    """
    trainer = build_trainer(config, source)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    (out / "environment.json").write_text(json.dumps(installed_versions(), indent=2))
    checkpoint = None
    if resume:
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is None:
            print(f"--resume: no complete checkpoint in {out}; starting from the beginning")
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    interrupt.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        interrupt.uninstall()
    skipped = trainer.train_dataset.skipped
    summary = {
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "interrupted": interrupt.interrupted,
        "skipped_records": len(skipped),
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    if skipped:
        print(f"skipped {len(skipped)} bad records:")
        for bad in skipped[:20]:
            print(f"  {bad}")
    if not interrupt.interrupted:
        final = out / "final"
        trainer.save_model(str(final))
        if trainer.args.should_save:
            trainer.student_side.tokenizer.save_pretrained(final)
            trainer.student_side.image_processor.save_pretrained(final)
        summary["final_model"] = str(final)
    if trainer.args.should_save:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary

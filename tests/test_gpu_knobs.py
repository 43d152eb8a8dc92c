"""Recipe keys users expect on GPUs, checked on a CPU: ``bf16`` / ``fp16`` (mixed precision for the student),
``gradient_checkpointing`` (the student recomputes its layers' activations: same loss and gradients) and
``torch_compile`` (passed to TrainingArguments); each goes through TrainConfig's checks and the run's fingerprint."""

from __future__ import annotations

import re

import pytest
import torch

from _workspace import build_workspace, workspace_overrides
from emkd.errors import UserError
from emkd.training.config import TrainConfig, load_recipe
from emkd.training.run import (
    NOT_FINGERPRINTED,
    RECORDED_WHEN_SET,
    build_trainer,
    check_precision,
    run_recipe,
    training_arguments,
)

FAST = ["batch_size=4", "warmup_ratio=0", "learning_rate=0.003", "lr_scheduler=constant"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("knobs") / "ws")


def recipe(ws, out, *extra):
    return load_recipe(None, workspace_overrides(ws, out, "method=kd", *FAST, *extra))


# ---- the keys: declared, checked, passed on, fingerprinted ----------------------------------------------------------
def test_the_keys_reach_training_arguments(tmp_path):
    defaults = training_arguments(TrainConfig(output_dir=str(tmp_path)))
    assert (defaults.bf16, defaults.fp16, defaults.activation_checkpointing, defaults.torch_compile) == (
        False, False, False, False)
    config = load_recipe(None, [f"output_dir={tmp_path}", "bf16=true", "gradient_checkpointing=true",
                                "torch_compile=true"])
    args = training_arguments(config)
    assert args.bf16 and not args.fp16 and args.activation_checkpointing and args.torch_compile
    # fp16 is passed on as well (TrainingArguments is built with use_cpu there; the run refuses it without CUDA)
    assert training_arguments(TrainConfig(output_dir=str(tmp_path), fp16=True)).fp16


def test_bad_values_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=re.escape("defaults: bf16 and fp16 are both set: choose one mixed-precision "
                                                  "mode")):
        load_recipe(None, ["bf16=true", "fp16=true"])
    with pytest.raises(UserError, match="gradient_checkpointing"):
        load_recipe(None, ["gradient_checkpointing=maybe"])
    with pytest.raises(UserError, match=re.escape("did you mean 'torch_compile'?")):
        load_recipe(None, ["torch_compiled=true"])


def test_fp16_without_cuda_is_refused_before_any_model_loads(ws, tmp_path):
    config = recipe(ws, tmp_path / "fp16", "fp16=true")
    message = ("the recipe: fp16=true needs a CUDA GPU and none is visible (float16 mixed precision with loss scaling "
               "runs on GPUs only); set bf16=true instead, which also works on a CPU, or unset fp16")
    with pytest.raises(UserError) as error:
        check_precision(config, cuda=False)
    assert str(error.value) == message
    assert check_precision(config, cuda=True) is None  # on a GPU machine it goes through
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=re.escape("fp16=true needs a CUDA GPU")):
            build_trainer(config)
    assert check_precision(recipe(ws, tmp_path / "b", "bf16=true"), cuda=False).startswith("bf16 on a CPU:")
    assert check_precision(recipe(ws, tmp_path / "b", "bf16=true"), cuda=True) is None


def test_precision_is_fingerprinted_when_set_and_the_compute_keys_are_not(tmp_path):
    assert {"bf16", "fp16"} <= set(RECORDED_WHEN_SET)
    assert {"gradient_checkpointing", "torch_compile"} <= set(NOT_FINGERPRINTED)
    base = run_recipe(TrainConfig(output_dir=str(tmp_path)))
    # a checkpoint written before the keys existed records the same recipe as one with them at their defaults
    assert not {"bf16", "fp16", "gradient_checkpointing", "torch_compile"} & set(base)
    assert run_recipe(TrainConfig(output_dir=str(tmp_path), bf16=True)) == {**base, "bf16": True}
    assert run_recipe(TrainConfig(output_dir=str(tmp_path), gradient_checkpointing=True, torch_compile=True)) == base


# ---- bf16 on a CPU: the student's forward runs under bfloat16 autocast ----------------------------------------------
def test_bf16_trains_the_student_under_cpu_autocast(ws, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    trainer = build_trainer(recipe(ws, tmp_path / "bf16", "bf16=true", "max_steps=2"))
    assert "bf16 on a CPU: the student's forward runs under torch.autocast('cpu', dtype=torch.bfloat16)" in (
        capsys.readouterr().out)
    seen, teacher_seen = [], []
    layer = trainer.model.language_model.model.layers[0].mlp.down_proj
    teacher_layer = trainer.teacher_adapter.model.language_model.model.layers[0].mlp.down_proj
    handles = [layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype)),
               teacher_layer.register_forward_hook(lambda module, args, out: teacher_seen.append(out.dtype))]
    try:
        trainer.train()
    finally:
        for handle in handles:
            handle.remove()
    assert seen and set(seen) == {torch.bfloat16}  # the student's linear layers ran in bfloat16 ...
    assert teacher_seen and set(teacher_seen) == {torch.float32}  # the teacher's in its teacher_dtype
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # ... the weights stayed float32
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in trainer.state.log_history if "loss" in r)


# ---- gradient checkpointing: same loss and gradients ----------------------------------------------------------------
def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(ws, tmp_path):
    trainer = build_trainer(recipe(ws, tmp_path / "gc", "train_vision_tower=true", "max_steps=1"))
    model = trainer.model
    assert type(model).supports_gradient_checkpointing
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    loss, grads = _loss_and_grads(trainer, batch)

    calls = []
    # the MLP of each part's first layer: checkpointing wraps the layer's forward, whose recompute in the backward
    # calls the MLP's forward again (module hooks do not run in the recompute, so its forward itself counts)
    modules = dict(model.named_modules())
    mlps = [next(modules[n] for n in modules if n.startswith(part) and n.endswith("layers.0.mlp"))
            for part in ("language_model", "vision_tower")]

    def counting(i, forward):
        def run(*args, **kwargs):
            calls.append(i)
            return forward(*args, **kwargs)
        return run

    for i, mlp in enumerate(mlps):
        mlp.forward = counting(i, mlp.forward)
    model.activation_checkpointing_enable()  # what TrainingArguments.activation_checkpointing makes the Trainer call
    try:
        checked_loss, checked_grads = _loss_and_grads(trainer, batch)
    finally:
        for mlp in mlps:
            del mlp.forward
        model.activation_checkpointing_disable()
    # both the language model's and the vision tower's layers were recomputed in the backward pass
    assert calls.count(0) == 2 and calls.count(1) == 2, calls
    torch.testing.assert_close(checked_loss, loss, atol=0, rtol=0)
    assert checked_grads.keys() == grads.keys()
    assert {n.split(".")[0] for n in grads} == {"vision_tower", "projector", "language_model"}
    for name in grads:
        torch.testing.assert_close(checked_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_trainer_turns_checkpointing_on_from_the_recipe(ws, tmp_path):
    plain = build_trainer(recipe(ws, tmp_path / "plain", "max_steps=1"))
    plain.train()
    trainer = build_trainer(recipe(ws, tmp_path / "checked", "gradient_checkpointing=true", "max_steps=1"))
    assert trainer.args.activation_checkpointing
    trainer.train()
    flags = {n: m.gradient_checkpointing for n, m in trainer.model.named_modules()
             if hasattr(m, "gradient_checkpointing")}
    assert any(n.startswith("language_model") for n in flags) and any(n.startswith("vision_tower") for n in flags)
    assert all(flags.values()), flags
    loss = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert loss == [r["loss"] for r in plain.state.log_history if "loss" in r]

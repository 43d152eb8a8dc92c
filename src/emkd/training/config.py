"""Training recipes: dataclasses with help text, validated on construction, loaded from YAML with overrides.

A recipe is a YAML file whose keys mirror :class:`TrainConfig`; ``--set key=value`` overrides any key, nested keys
with dots (``data.train=...``). Values are parsed as YAML scalars (``max_steps=10`` is an int, ``loss.gamma=25.0`` a
float). Unknown keys are errors that name the key and the recipe file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emkd.data.dataset import ON_BAD_SAMPLE
from emkd.data.render import TEMPLATES
from emkd.errors import UserError
from emkd.models.compose import DTYPES
from emkd.training.methods import METHODS, check_loss_options, load_method_plugins  # the losses, not the models
from emkd.training.options import type_fields
from emkd.training.stages import PROJECTOR_ONLY, trained_parts

STAGES = ("align", "instruct", "dpt", "sft", "dft")

# Where each path a recipe may need comes from: said once, in the error that reports it missing.
PATH_HINTS = {
    "student": "a student checkpoint directory: the previous phase's output_dir/final, or one composed by "
    "`emkd init-student --from-teacher TEACHER --out DIR --pool-size P --layers N`",
    "teacher": "a teacher checkpoint directory in transformers format (a LLaVA-family download), or the demo's "
    "teacher, src/emkd/demo/assets/teacher",
    "teacher_cache": "a directory written by `emkd cache-teacher`",
    "data.train": "a LLaVA-format JSON/JSONL or parquet file, a `datasets` save_to_disk folder or a .yaml mixture "
    "(`emkd demo` writes runs/demo/data/train.json; check a file with "
    "`emkd data check FILE --images DIR`)",
    "data.eval": "a LLaVA-format JSON/JSONL file",
    "data.images": "the directory the records' image paths are relative to (runs/demo/data/images for the demo's data)",
    "irs_file": "the JSON written by `emkd irs`",
}


# The experiment trackers a recipe may name in report_to (transformers' integrations of the same names): the
# modules any one of which makes the tracker usable (transformers' own test), and what to install for it.
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard (or pip install 'emkd[track]')"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}
NO_TRACKING = "none"


def tracker_names(value: Any) -> list[str]:
    """``report_to`` as a list of :data:`TRACKERS` names, each once: a name, a comma-separated string of names or a
    list of them; ``None``, ``[]`` and ``"none"`` mean no tracker (the console and ``log.jsonl`` only).

    Raises ``ValueError`` naming the key, the value and the trackers there are (with the closest one to a misspelling).
    """
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ValueError(f"report_to must be a tracker name or a list of them ({', '.join(TRACKERS)} or "
                         f"{NO_TRACKING}), got {value!r}")
    names = [item.strip() for item in items if item.strip() and item.strip() != NO_TRACKING]
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(name, list(TRACKERS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"report_to: {name!r} is not a tracker emkd supports ({hint}supported: "
                             f"{', '.join(TRACKERS)}, a list of them, or {NO_TRACKING})")
    return list(dict.fromkeys(names))


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    train: str | None = _help(
        "training records (LLaVA or HF messages): a JSON/JSONL file, a parquet file (images embedded as bytes), a "
        "`datasets` save_to_disk folder, or a .yaml mixture of such sources (docs/training.md#data)",
        default=None,
    )
    eval: str | None = _help("held-out records, same format", default=None)
    images: str | None = _help("directory that image paths in the records are relative to", default=None)
    template: str = _help("'plain' (caption alignment) or 'chat' (the tokenizer's chat template)", default="chat")
    max_length: int = _help("maximum tokens per rendered sample (prompt + vision tokens must fit)", default=2048)
    on_bad_sample: str = _help("'error' stops at the first bad record, 'skip' drops and counts it", default="error")
    allow_outside_images: bool = _help(
        "read image paths that are absolute or climb out of data.images with '..' (by default such a record is "
        "bad: image_outside)",
        default=False,
    )

    def __post_init__(self) -> None:
        type_fields(self, "data.")
        if self.template not in TEMPLATES:
            raise ValueError(f"data.template must be one of {TEMPLATES}, got {self.template!r}")
        if self.on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"data.on_bad_sample must be {' or '.join(map(repr, ON_BAD_SAMPLE))}, "
                             f"got {self.on_bad_sample!r}")
        if self.max_length <= 0:
            raise ValueError(f"data.max_length must be positive, got {self.max_length}")


@dataclass
class TrainConfig:
    method: str = _help(
        f"distillation method: a key of emkd.training.methods.METHODS ({', '.join(METHODS)}, or one added with "
        "register_method, or by an installed package's emkd.methods entry point)",
        default="emkd",
    )
    stage: str = _help(
        "'align' (projector only), 'instruct' (LLM + projector), or LLaVA-KD's 'dpt' / 'sft' / 'dft'; the stage "
        "'sft' says which parts train and the method 'sft' which loss, and the two combine freely",
        default="instruct",
    )
    student: str | None = _help("directory of the student checkpoint (model, tokenizer, image processor)", default=None)
    teacher: str | None = _help(
        "directory of the teacher checkpoint; unused by methods without a teacher ('sft')", default=None
    )
    teacher_cache: str | None = _help(
        "directory written by `emkd cache-teacher`: the teacher's outputs are read from it and its weights are not "
        "loaded (teacher= may then be omitted: the cache names its teacher); not for methods that cannot use it "
        "('align_ti')",
        default=None,
    )
    loss: dict = _help("keyword arguments of the method's loss (defaults are the papers' values)", default_factory=dict)
    data: DataConfig = _help("data files and rendering", default_factory=DataConfig)
    output_dir: str = _help("where checkpoints, logs and the final model go", default="runs/train")
    max_steps: int = _help("optimizer steps (-1: run num_epochs)", default=-1)
    num_epochs: float = _help("epochs when max_steps is -1", default=1.0)
    batch_size: int = _help("samples per device per micro-batch", default=4)
    grad_accum: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak learning rate (of the language model; of every part without its own)",
                                 default=2e-5)
    vision_tower_lr: float | None = _help(
        "peak learning rate of the vision tower (None: learning_rate), under the same schedule; only when the tower "
        "trains (train_vision_tower: true, stage 'instruct'/'sft'/'dft')",
        default=None,
    )
    projector_lr: float | None = _help(
        "peak learning rate of the projector (None: learning_rate), under the same schedule", default=None
    )
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_ratio: float = _help("fraction of steps with linear warm-up", default=0.03)
    lr_scheduler: str = _help("transformers scheduler name", default="cosine")
    max_grad_norm: float = _help("gradient clipping norm", default=1.0)
    seed: int = _help("seed of initialisation, data order and sampling", default=0)
    logging_steps: int = _help("log every N optimizer steps", default=1)
    save_steps: int = _help("checkpoint every N optimizer steps (0: only at the end)", default=0)
    save_total_limit: int = _help(
        "complete checkpoints kept (0: all); older ones are deleted only after a newer one is written and verified",
        default=2,
    )
    on_nonfinite: str = _help(
        "when a step's loss, a loss component, the gradient norm or the weights are NaN or infinite: 'stop' ends the "
        "run before that update (the newest complete checkpoint stays the last good one; `emkd train` exits 3); "
        "'skip' drops the update, counts it and goes on",
        default="stop",
    )
    max_consecutive_nonfinite: int = _help(
        "with on_nonfinite=skip: stop after this many non-finite steps in a row", default=3
    )
    train_vision_tower: bool = _help("also train the vision tower in 'instruct'/'sft'/'dft'", default=False)
    teacher_dtype: str = _help(
        "dtype the teacher runs in: float32, bfloat16 or float16 (with teacher_cache: the cache's own dtypes)",
        default="float32",
    )
    bf16: bool = _help(
        "mixed precision for the student (TrainingArguments.bf16): its forward, and the loss computed inside it, run "
        "under bfloat16 autocast while weights, gradients and optimizer stay float32; on a CPU torch autocasts to "
        "bfloat16 too (slower than float32 on most CPUs); the teacher keeps teacher_dtype",
        default=False,
    )
    fp16: bool = _help(
        "mixed precision for the student (TrainingArguments.fp16): float16 autocast with loss scaling; needs a CUDA "
        "GPU (refused on a CPU: use bf16)",
        default=False,
    )
    gradient_checkpointing: bool = _help(
        "recompute the student's activations layer by layer in the backward pass instead of keeping them "
        "(TrainingArguments.activation_checkpointing, non-reentrant): less memory, about one more forward of "
        "compute; the same loss and gradients",
        default=False,
    )
    torch_compile: bool = _help(
        "compile the student with torch.compile (TrainingArguments.torch_compile); the first steps are slow while it "
        "compiles",
        default=False,
    )
    dataloader_workers: int = _help("data loader worker processes", default=0)
    irs_layer: int | None = _help("Align-TI: teacher layer for IVA weights (None: argmax of the IRS file)", default=None)
    irs_file: str | None = _help("Align-TI: JSON written by `emkd irs`", default=None)
    report_to: list | str | None = _help(
        "experiment trackers that also receive every log record (loss, objective, each loss component by its name, "
        "learning rate): 'tensorboard' (event files in output_dir/tensorboard), 'wandb', 'mlflow', or a list of "
        "them; 'none' or [] (the default): the console and log.jsonl only (docs/training.md#tracking)",
        default_factory=list,
    )
    run_name: str | None = _help(
        "the run's name in the trackers (None: the name of the output_dir folder)", default=None
    )
    path_help: dict = _help(
        "where to get each path this recipe needs, by key (student, teacher, data.train, ...): shown in the error "
        "when the path is unset or missing, in place of the generic hint",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        type_fields(self)  # max_steps=1.5 or train_vision_tower=maybe is an error here, not a TypeError mid-step
        if self.method not in METHODS:
            load_method_plugins()  # methods of installed packages (entry points), once they are asked for
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        method = METHODS[self.method]
        if self.teacher_cache is not None and not method.supports_teacher_cache:
            raise ValueError(
                f"method {self.method!r} cannot train from teacher_cache: {method.teacher_cache_reason}; unset "
                "teacher_cache"
            )
        unknown_help = set(self.path_help) - set(PATH_HINTS)
        if unknown_help:
            raise ValueError(f"path_help has keys {sorted(unknown_help)} that are not paths; paths: {sorted(PATH_HINTS)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.teacher_dtype not in DTYPES:
            *first, last = DTYPES
            raise ValueError(f"teacher_dtype must be {', '.join(first)} or {last}, got {self.teacher_dtype!r}")
        _check_ranges(self)
        self.report_to = tracker_names(self.report_to)
        self.loss = check_loss_options(self.method, self.loss)


# (key, test, what the key must be) for every numeric key with a range; checked at load, before any model.
_RANGES = [
    ("max_steps", lambda v: v == -1 or v >= 1, "-1 (run num_epochs) or >= 1"),
    ("num_epochs", lambda v: 0 < v < float("inf"), "a positive number"),
    ("learning_rate", lambda v: 0 < v < float("inf"), "a positive number"),
    ("vision_tower_lr", lambda v: v is None or 0 < v < float("inf"), "a positive number or null (learning_rate)"),
    ("projector_lr", lambda v: v is None or 0 < v < float("inf"), "a positive number or null (learning_rate)"),
    ("weight_decay", lambda v: 0 <= v < float("inf"), ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("max_grad_norm", lambda v: 0 <= v < float("inf"), ">= 0 (0: no clipping)"),
    ("logging_steps", lambda v: v >= 1, ">= 1"),
    ("save_steps", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("save_total_limit", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("dataloader_workers", lambda v: v >= 0, ">= 0"),
    ("max_consecutive_nonfinite", lambda v: v >= 1, ">= 1"),
]


def _check_ranges(config: TrainConfig) -> None:
    for key, ok, expected in _RANGES:
        value = getattr(config, key)
        if not ok(value):
            raise ValueError(f"{key} must be {expected}, got {value!r}")
    tower_trains = trained_parts(config.stage, config.train_vision_tower)["vision_tower"]
    if config.vision_tower_lr is not None and not tower_trains:
        why = (f"stage {config.stage!r} trains the projector only" if config.stage in PROJECTOR_ONLY
               else "train_vision_tower is false")
        raise ValueError(f"vision_tower_lr={config.vision_tower_lr:g} is set but the vision tower is frozen ({why}): "
                         "set train_vision_tower=true or unset vision_tower_lr")
    if config.bf16 and config.fp16:
        raise ValueError("bf16 and fp16 are both set: choose one mixed-precision mode")
    if config.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {config.on_nonfinite!r}")
    from transformers import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if config.lr_scheduler not in schedulers:
        close = difflib.get_close_matches(str(config.lr_scheduler), schedulers, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of {', '.join(schedulers)}"
        raise ValueError(f"lr_scheduler {config.lr_scheduler!r} is not a transformers scheduler ({hint})")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else None


def _known_keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _refuse_unknown(values: dict[str, Any], cls: type, prefix: str, source: str) -> None:
    """One error for the first unknown key, with the closest known one, or the list of known keys."""
    known = _known_keys(cls)
    for key in sorted(set(values) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known: {', '.join(sorted(known))}"
        raise UserError(f"{source}: unknown recipe key '{prefix}{key}' ({hint})")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe (or start from defaults when ``path`` is None) and apply ``key=value`` overrides.

    Raises :class:`~emkd.errors.UserError` naming the recipe file for a missing file, bad YAML, an unknown key or a
    bad value.
    """
    source = "defaults" if path is None else str(path)
    try:
        return _load_recipe(path, overrides, source)
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        raise UserError(f"{source}: {e}") from e


def _load_recipe(path: str | Path | None, overrides: list[str] | None, source: str) -> TrainConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"recipe {path} not found (shipped recipes are in recipes/ of the repository)") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a recipe must be a mapping of keys to values, got {type(raw).__name__}")
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item}: {k!r} is not a mapping")
        node[keys[-1]] = value
    _refuse_unknown(raw, TrainConfig, "", source)
    _refuse_unknown(raw.get("data") or {}, DataConfig, "data.", source)
    raw["data"] = DataConfig(**(raw.get("data") or {}))
    return TrainConfig(**raw)


def check_trackers(config: TrainConfig, source: str = "the recipe") -> None:
    """Check, before any model loads, that the package of every tracker in ``report_to`` is installed.

    Raises a :class:`~emkd.errors.UserError` naming the tracker and the ``pip install`` that provides it.
    """
    for name in config.report_to:
        modules, install = TRACKERS[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            raise UserError(f"{source}: report_to={name} needs the {modules[0]} package, which is not installed: "
                            f"{install}, or drop {name} from report_to")


def check_paths(config: TrainConfig, source: str = "the recipe") -> None:
    """Check, before any model loads, that every path the run needs is set and exists.

    Raises one :class:`~emkd.errors.UserError` that lists every missing key as the ``--set`` that fills it and every
    path that does not exist, each with where to get it: the recipe's ``path_help``, else :data:`PATH_HINTS`.
    """
    needed = {"student": "DIR"}
    if METHODS[config.method].needs_teacher and config.teacher_cache is None:
        needed["teacher"] = "DIR"
    needed["data.train"] = "FILE"
    values = {
        "student": config.student, "teacher": config.teacher, "teacher_cache": config.teacher_cache,
        "data.train": config.data.train, "data.eval": config.data.eval, "data.images": config.data.images,
        "irs_file": config.irs_file,
    }
    unset = [key for key in needed if values[key] is None]
    absent = [key for key, value in values.items() if value is not None and not Path(value).exists()]
    if not unset and not absent:
        return
    problems = []
    if unset:
        problems.append("set " + " ".join(f"--set {k}={needed[k]}" for k in unset))
    problems += [f"{k}={values[k]} does not exist" for k in absent]
    hints = "; ".join(f"{k}: {config.path_help.get(k, PATH_HINTS[k])}" for k in unset + absent)
    raise UserError(f"{source}: {', '.join(problems)} -- {hints}")

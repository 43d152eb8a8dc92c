"""The registry of training methods: what one step computes from a student, a teacher and a collated batch.

A method runs the models through their adapters (:class:`emkd.models.DistillAdapter`), hands the tensors to a loss
of :mod:`emkd.losses`, and returns the total with every component for logging. The student's loss runs inside the
student's forward (the adapter's ``loss_fn``), where FSDP and ZeRO-3 hold its LM head whole. The teacher always runs in eval mode
under ``torch.no_grad``; the student runs through ``model`` when the trainer passes its wrapped model (DDP, FSDP,
DeepSpeed), so gradients are synchronised.

| key | loss |
| --- | --- |
| ``sft`` | cross-entropy on response tokens (no teacher) |
| ``kd`` | vanilla KD: ``CE + KL(p_t || p_s)`` (``KDLoss("forward", 1, 1)``) |
| ``rkl`` | MiniLLM-style token-level reverse KL: ``0.5 CE + 0.5 KL(p_s || p_t)`` |
| ``llava_kd`` | LLaVA-KD MDist + RDist (LLaVA-KD* with matching when token counts differ) |
| ``align_ti`` | Align-TI: ``CE + IVA + KD + TPA`` |
| ``emkd`` | EM-KD: ``alpha SUP + (1 - alpha) RLD + beta VSD + gamma VLAD`` |

A method's loss options (the recipe's ``loss:`` mapping) are the keyword parameters of the callable it hands them to
(:meth:`Method.loss_callable`: the loss class, or Align-TI's step function). :func:`check_loss_options` checks their
names and types against that signature, and the values by building the method, when the recipe loads, before any model.

Normalisation: a method's :class:`StepOutput` carries its loss's terms unreduced (``terms``, each a sum and the
unit it is divided by, :mod:`emkd.losses.normalisation`); :meth:`Method.count_units` counts those units in a collated
batch before any model runs. The trainer sums the counts over the micro-batches of an optimizer step and over the
processes (:class:`StepCounts`) and divides each term by them (:meth:`StepOutput.step_share`), so that one step's
gradient is that of one batch of all its samples, whatever the accumulation and the number of processes.

A method is known only here: the recipe, the run and the trainer read its class attributes
(:attr:`Method.needs_teacher`, ``supports_teacher_cache``, ``supports_sharding``, :meth:`Method.run_options`), never
its name. Adding one is its loss
and one :class:`Method` subclass decorated with :func:`register_method` (``tests/test_method_registry.py`` does it).
"""

from __future__ import annotations

import difflib
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from emkd.errors import UserError
from emkd.inputs import IGNORE_INDEX
from emkd.losses import EMKDLoss, KDLoss, LlavaKDLoss
from emkd.losses.normalisation import LossTerms, combine, count_units
from emkd.losses.sft import SFTLoss
from emkd.models.base import DistillAdapter
from emkd.training.options import typed_value

if TYPE_CHECKING:
    from emkd.training.config import TrainConfig


@dataclass
class StepCounts:
    """The unit counts of one optimizer step (what the trainer hands ``compute_loss`` as ``num_items_in_batch``).

    Args:
        totals: unit -> count (:data:`~emkd.losses.normalisation.UNITS`), summed over every micro-batch of the step
            on every process.
        micro_batches: ``[unit -> count]`` of each micro-batch of the step on this process, in order.
        processes: the data-parallel processes whose gradients are averaged (DDP, FSDP, DeepSpeed).
    """

    totals: dict[str, int]
    micro_batches: list[dict[str, int]]
    processes: int = 1
    _next: int = field(default=0, init=False, repr=False)

    @property
    def taken(self) -> int:
        """How many micro-batches :meth:`take` has handed out."""
        return self._next

    def take(self) -> dict[str, int]:
        """The counts of the next micro-batch of the step (each call moves on by one)."""
        if self._next >= len(self.micro_batches):
            raise RuntimeError(f"the optimizer step has {len(self.micro_batches)} micro-batches; a loss was computed "
                               "for one more")
        self._next += 1
        return self.micro_batches[self._next - 1]


@dataclass
class StepOutput:
    """One micro-batch's loss (the loss's own normalisation: means over this micro-batch), its components for
    logging, and its terms unreduced (``None`` for a method that only reports means)."""

    loss: torch.Tensor
    components: dict[str, float]
    terms: LossTerms | None = None
    #: the vision pairs ``(idx_s, idx_t)`` of each sample and the matching that made them (``None`` for a method
    #: without vision pairs); the trainer measures with them how often a pair lies in the student token's pooling
    #: window (:mod:`emkd.matching.quality`)
    matches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    matching: str | None = None

    def step_share(self, counts: StepCounts) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the optimizer step's loss and of each logged component.

        With ``terms``, each term's sum is divided by its unit's count over the whole step and multiplied by the
        number of processes (whose gradients are averaged): summed over the micro-batches of every process and
        averaged over the processes, the shares make the loss of one batch of all the step's samples. Without, the
        share is the micro-batch's mean divided by the number of micro-batches (the mean of their means).
        """
        expected = counts.take()
        if self.terms is None:
            n = len(counts.micro_batches)
            return self.loss / n, {k: v / n for k, v in self.components.items()}
        wrong = {t.unit: (self.terms.counts[t.unit], expected[t.unit]) for t in self.terms.terms.values()
                 if t.unit in self.terms.counts and self.terms.counts[t.unit] != expected[t.unit]}
        if wrong:
            found = ", ".join(f"{unit}: the loss saw {a}, Method.count_units counted {b}"
                              for unit, (a, b) in wrong.items())
            raise RuntimeError(f"micro-batch {counts.taken - 1} of the optimizer step: {found}; the step would be "
                               "normalised by wrong counts")
        values = self.terms.values(counts.totals, scale=float(counts.processes))
        loss = combine(self.terms, values)
        return loss, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in values.items()}}


class Method(ABC):
    """One training objective. ``loss_kwargs`` are the recipe's ``loss:`` mapping (the papers' values by default).

    A method's identity lives here, in its class attributes, and nowhere else: the recipe (:mod:`emkd.training.config`),
    the run (:mod:`emkd.training.run`) and the trainer (:mod:`emkd.training.trainer`) read these flags and never compare
    a method's name. A new method is its loss plus one subclass registered with :func:`register_method`.
    """

    #: the key of :data:`METHODS` and of the recipe's ``method:``
    name: ClassVar[str]
    #: whether the method runs a teacher: the run then loads one (or its ``teacher_cache``) and checks
    #: ``teacher=`` is set; ``False`` (``sft``) trains the student alone
    needs_teacher: ClassVar[bool] = True
    #: whether the teacher's outputs can be read from ``emkd cache-teacher``'s cache (``teacher_cache=``) instead of
    #: running the teacher; a method whose teacher sees inputs no cache holds sets ``False``
    supports_teacher_cache: ClassVar[bool] = True
    #: why ``supports_teacher_cache`` is ``False``: the recipe's error, "method NAME cannot train from teacher_cache:
    #: REASON; unset teacher_cache"
    teacher_cache_reason: ClassVar[str] = ""
    #: whether the method trains correctly when the student's parameters are sharded outside its forward (FSDP,
    #: DeepSpeed ZeRO-3): true when its student loss runs inside the student's forward (the adapter's ``loss_fn``)
    supports_sharding: ClassVar[bool] = True
    #: why ``supports_sharding`` is ``False``: the trainer's error, "method NAME is not supported under FSDP: REASON.
    #: Use DDP or ZeRO-2."
    sharding_reason: ClassVar[str] = ""
    #: parameters of :meth:`loss_callable` that the method fills itself (models, batch) or ignores: not options
    not_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, **loss_kwargs: Any) -> None:
        self.loss_kwargs = loss_kwargs

    @classmethod
    def run_options(cls, config: TrainConfig) -> dict[str, Any]:
        """Loss options the run derives from other recipe keys (Align-TI: ``iva_layer`` from ``irs_layer`` /
        ``irs_file``), resolved when the run builds the method; the recipe's own ``loss:`` values take precedence.
        None by default."""
        return {}

    @classmethod
    def loss_callable(cls) -> Callable[..., Any]:
        """The loss class or function the ``loss:`` mapping is passed to; its signature defines the options."""
        raise NotImplementedError

    @classmethod
    def loss_options(cls) -> dict[str, inspect.Parameter]:
        """Option name -> parameter (annotation and default) of :meth:`loss_callable`."""
        signature = inspect.signature(cls.loss_callable(), eval_str=True)
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return {name: p for name, p in signature.parameters.items()
                if p.kind in keyword and name != "self" and name not in cls.not_options}

    @abstractmethod
    def __call__(
        self,
        student: DistillAdapter,
        teacher: DistillAdapter | None,
        batch: dict[str, dict[str, torch.Tensor]],
        model: torch.nn.Module | None = None,
    ) -> StepOutput:
        """Compute the loss of one micro-batch ``{"student": {...}, "teacher": {...}}``."""

    def count_units(
        self, batch: dict[str, dict[str, torch.Tensor]], student: DistillAdapter, teacher: DistillAdapter | None
    ) -> dict[str, int]:
        """Every unit of :data:`~emkd.losses.normalisation.UNITS` counted in a collated batch, without running a
        model: response positions from the student side's ``labels``, vision tokens from each side's ``input_ids``
        (``side.image_token_id``, real tokens only), which is where the models put them. A method whose loss
        normalises by other units overrides this."""
        s_side = batch["student"]
        num_response = (s_side["labels"][:, 1:] != IGNORE_INDEX).sum(1)  # (B,)
        if teacher is None:
            return count_units(num_response)
        return count_units(num_response, vision_token_counts(s_side, student.side.image_token_id),
                           vision_token_counts(batch["teacher"], teacher.side.image_token_id))

    @staticmethod
    def run_teacher(teacher: DistillAdapter, side: dict[str, torch.Tensor], **kwargs: Any):
        with torch.no_grad():
            return teacher(side, **kwargs)


def vision_token_counts(side: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """``[B]`` image tokens of each sample of a collated side."""
    return ((side["input_ids"] == image_token_id) & side["attention_mask"].bool()).sum(1)


#: name -> method class, in registration order (the order a recipe's "method must be one of" error lists them)
METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` under its exact ``name``; a second class with the same name is an error."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, **loss_kwargs: Any) -> Method:
    """The method ``name`` with its loss options checked (:func:`check_loss_options`) and taken in their types."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    cls = METHODS[name]
    options = _typed_options(cls, loss_kwargs)
    try:
        return cls(**options)
    except (ValueError, TypeError) as e:  # the loss's own checks of the values (choices, ranges)
        raise ValueError(f"loss options of method {name!r}: {e}") from e


def check_loss_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check the recipe's ``loss:`` mapping against ``method``'s loss signature without loading any model.

    Unknown names (with the closest known one), values of the wrong type (``loss.alpha=abc`` for a float) and values
    the loss refuses (``loss.matching=nearest``) are ``ValueError`` naming the ``loss.KEY``. Returns the options in
    their declared types: YAML's ``1e-3`` (a string) and ``0`` for a float become floats.
    """
    return dict(build_method(method, **options).loss_kwargs)


def _typed_options(cls: type[Method], options: dict[str, Any]) -> dict[str, Any]:
    known = cls.loss_options()
    out = {}
    for key, value in options.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean 'loss.{close[0]}'?" if close else f"options: {', '.join(sorted(known)) or 'none'}"
            raise ValueError(f"unknown loss option 'loss.{key}' of method {cls.name!r} ({hint})")
        out[key] = typed_value(f"loss.{key}", value, known[key].annotation)
    return out


class LossMethod(Method):
    """A method that is one loss module (``loss_class``, built with ``loss_defaults`` under the recipe's ``loss:``
    values) applied to the two sides' DistillInputs (``sft``: to the student's alone)."""

    loss_class: ClassVar[type[torch.nn.Module]]
    loss_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **loss_kwargs: Any) -> None:
        super().__init__(**loss_kwargs)
        self.loss_fn = self.loss_class(**{**self.loss_defaults, **self.loss_kwargs})
        #: a trainable module the run owns and the loss takes as ``projector=`` (EM-KD's hidden-state VSD map ``P``,
        #: :func:`emkd.training.run.build_vsd_projector`); ``None``: the loss is called without one
        self.projector: torch.nn.Module | None = None

    @classmethod
    def loss_callable(cls):
        return cls.loss_class

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        if teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        t = self.run_teacher(teacher, batch["teacher"]).inputs
        extra = {} if self.projector is None else {"projector": self.projector}
        out = student(batch["student"], model=model, loss_fn=lambda s: self.loss_fn(s, t, **extra)).loss_output
        return StepOutput(out.loss, out.components(), out.terms, matches=getattr(out, "matches", None),
                          matching=getattr(self.loss_fn, "matching", None))


@register_method
class SFT(LossMethod):
    """Supervised fine-tuning: :class:`~emkd.losses.sft.SFTLoss` on the student's inputs, no teacher."""

    name = "sft"
    needs_teacher = False
    loss_class = SFTLoss

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        out = student(batch["student"], model=model, loss_fn=self.loss_fn).loss_output
        return StepOutput(out.loss, out.components(), out.terms)


@register_method
class KD(LossMethod):
    """Vanilla KD: ``CE + KL(p_t || p_s)`` on response tokens."""

    name = "kd"
    loss_class = KDLoss
    loss_defaults = {"divergence": "forward", "ce_weight": 1.0, "kd_weight": 1.0}


@register_method
class RKL(LossMethod):
    """MiniLLM-style token-level reverse KL: ``0.5 CE + 0.5 KL(p_s || p_t)`` on response tokens."""

    name = "rkl"
    loss_class = KDLoss
    loss_defaults = {"divergence": "reverse", "ce_weight": 0.5, "kd_weight": 0.5}


@register_method
class LlavaKD(LossMethod):
    """LLaVA-KD: MDist (response and vision-token KL) + RDist (relation of vision logits); LLaVA-KD* (matched
    tokens) when the two models' vision token counts differ."""

    name = "llava_kd"
    loss_class = LlavaKDLoss


@register_method
class AlignTI(Method):
    """Align-TI (``CE + IVA + KD + TPA``). ``loss_kwargs``: ``iva_layer`` (teacher layer of IVA's weights, set by
    the run from ``irs_layer`` / ``irs_file``: :meth:`run_options`), ``num_candidates`` (4), ``sampling``
    (``nucleus``), ``top_p`` (0.9), ``iva_matching`` (``auto``), ``temperature`` (1), ``vocab`` (``strict``),
    ``implementation`` (``fused``), ``normalisation`` (``token_sum``, the paper's; or ``token_mean``: see
    :func:`~emkd.training.align_ti.align_ti_step`), ``tpa`` (``true``; ``false``: ``CE + IVA + KD`` without TPA, which
    M-RoPE teachers such as Qwen2-VL need)."""

    name = "align_ti"
    supports_teacher_cache = False
    teacher_cache_reason = ("its TPA runs the teacher on candidates sampled from the student at every step, which no "
                            "cache holds")
    supports_sharding = False
    sharding_reason = "TPA reads the student's LM head outside its forward pass, where it is sharded"
    not_options = frozenset({"student_adapter", "teacher_adapter", "batch", "generator", "student_model"})

    def __init__(self, **loss_kwargs: Any) -> None:
        from emkd.training.align_ti import check_options

        super().__init__(**loss_kwargs)
        check_options(**loss_kwargs)

    @classmethod
    def loss_callable(cls):
        from emkd.training.align_ti import align_ti_step

        return align_ti_step

    @classmethod
    def run_options(cls, config: TrainConfig) -> dict[str, Any]:
        """``iva_layer`` (:func:`resolve_iva_layer`) when the recipe names a teacher (without one the run stops on
        the missing teacher instead)."""
        return {"iva_layer": resolve_iva_layer(config)} if config.teacher is not None else {}

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        from emkd.training.align_ti import align_ti_step

        if teacher is None:
            raise ValueError("method 'align_ti' needs a teacher")
        if "iva_layer" not in self.loss_kwargs:
            raise ValueError("method 'align_ti' needs iva_layer (set irs_layer= or irs_file= in the recipe)")
        loss, parts = align_ti_step(student, teacher, batch, student_model=model, **self.loss_kwargs)
        components = {k: float(parts[k].detach()) for k in ("ce", "iva", "kd", "tpa")}
        components["loss"] = float(loss.detach())
        return StepOutput(loss, components, parts["terms"], matches=parts["matches"],
                          matching=self.loss_kwargs.get("iva_matching", "auto"))


@register_method
class EMKD(LossMethod):
    """EM-KD: ``alpha SUP + (1 - alpha) RLD + beta VSD + gamma VLAD`` on Hungarian-matched vision tokens."""

    name = "emkd"
    loss_class = EMKDLoss


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


# ---- methods from other packages ------------------------------------------------------------------------------------
#: the entry-point group through which an installed package adds methods (``[project.entry-points."emkd.methods"]
#: foo = "mypkg.foo:Foo"`` in its pyproject.toml): loading the entry imports the module, whose
#: :func:`register_method` adds the class
ENTRY_POINT_GROUP = "emkd.methods"


def load_method_plugins() -> list[str]:
    """Import every installed ``emkd.methods`` entry point once; return the names of the methods they registered.

    Raises:
        UserError: an entry point fails to import or does not register the method it names (the message names the
            entry point and its package, so the user knows what to fix or uninstall).
    """
    from importlib.metadata import entry_points

    added = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in METHODS:
            continue
        where = f"entry point {entry.name!r} = {entry.value!r} of package {getattr(entry.dist, 'name', '?')!r}"
        try:
            entry.load()
        except Exception as e:  # any import error of third-party code: one line that names the package
            raise UserError(f"{where} ({ENTRY_POINT_GROUP}) failed to load: {type(e).__name__}: {e}") from e
        if entry.name not in METHODS:
            raise UserError(f"{where} ({ENTRY_POINT_GROUP}) registered no method {entry.name!r}: decorate its "
                            f"class with emkd.training.methods.register_method and give it name = {entry.name!r}")
        added.append(entry.name)
    return added


# ---- what a method offers, for `emkd train --help-method NAME` -----------------------------------------------------
def describe_method(name: str) -> str:
    """A method's loss, flags and loss options (type, default, what the loss's docstring says of each), as printed by
    ``emkd train --help-method NAME``. An unknown name is a ``ValueError`` listing the registered methods."""
    if name not in METHODS:
        load_method_plugins()
    if name not in METHODS:
        close = difflib.get_close_matches(name, sorted(METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown method {name!r}; {hint}registered: {', '.join(METHODS)}")
    cls = METHODS[name]
    target = cls.loss_callable()
    own = cls.__dict__.get("__doc__")  # not the docstring inherited from a base class
    summary = inspect.cleandoc(own or inspect.getdoc(target) or "").split("\n\n")[0].replace("\n", " ")
    defaults = {key: p.default for key, p in cls.loss_options().items()}
    defaults.update(getattr(cls, "loss_defaults", {}))
    described = docstring_args(inspect.getdoc(target) or "")
    if isinstance(target, type):  # a loss class documents its options on the class or on __init__
        described = {**docstring_args(inspect.getdoc(target.__init__) or ""), **described}
    lines = [f"method {name}: {summary}", f"  loss: {target.__module__}.{target.__qualname__}",
             f"  teacher: {'required' if cls.needs_teacher else 'none'}"]
    if cls.needs_teacher:
        cache = "yes" if cls.supports_teacher_cache else f"no ({cls.teacher_cache_reason})"
        lines.append(f"  teacher_cache: {cache}")
    lines.append("  FSDP / ZeRO-3: " + ("yes" if cls.supports_sharding else f"no ({cls.sharding_reason})"))
    lines.append("loss options (recipe `loss: {KEY: VALUE}` or `--set loss.KEY=VALUE`):")
    for key, parameter in cls.loss_options().items():
        kind = _annotation_name(parameter.annotation)
        default = defaults[key]
        default_text = "required" if default is inspect.Parameter.empty else f"default {default!r}"
        lines.append(f"  {key} ({kind}, {default_text})" + (f": {described[key]}" if key in described else ""))
    return "\n".join(lines)


def _annotation_name(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def docstring_args(doc: str) -> dict[str, str]:
    """``name -> text`` of a Google-style docstring's ``Args:`` section; ``a, b: text`` documents both names, and
    more deeply indented lines continue the entry before them."""
    entries: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return entries
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break  # the section ended
        if depth == indent and ":" in line:
            head, text = line.strip().split(":", 1)
            names = [n.strip().lstrip("*") for n in head.split(",")]
            for n in names:
                entries[n] = text.strip()
        elif names:
            for n in names:
                entries[n] = f"{entries[n]} {line.strip()}".strip()
    return entries

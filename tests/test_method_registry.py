"""The method registry owns a method's identity: a new method is its loss plus one registered class.

``Foo`` below is such a method, written only here: a recipe with ``method: foo`` loads, its ``loss:`` options are
checked against its loss's signature, its flags (teacher, teacher cache, sharding, run-time options) are honoured by
the recipe, the run and the trainer, and it trains, without any other file knowing its name. Align-TI's refusals,
now read from its flags, keep their messages.
"""

import json
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from _workspace import build_workspace, workspace_overrides
from emkd.errors import UserError
from emkd.inputs import DistillInputs
from emkd.losses.head import head_divergences
from emkd.losses.response import mean_or_zero
from emkd.training.config import TrainConfig, load_recipe
from emkd.training.methods import METHODS, Method, StepOutput, build_method, register_method
from emkd.training.run import build_trainer, train
from emkd.training.trainer import check_sharding_supported

FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0"]
BUILT_IN = ("sft", "kd", "rkl", "llava_kd", "align_ti", "emkd")


def foo_loss(student: DistillInputs, teacher: DistillInputs, kl_weight: float = 0.5, temperature: float = 1.0):
    """``CE + kl_weight * KL(p_t || p_s)`` on response tokens -> (scalar loss, {"ce", "kl"} scalars)."""
    rows = head_divergences(student, student.response_hidden(), teacher, teacher.response_hidden(), ("ce", "forward"),
                            temperature, student.response_targets)  # {kind: (R,)}
    ce = mean_or_zero(rows["ce"], student.hidden)
    kl = mean_or_zero(rows["forward"], student.hidden)
    return ce + kl_weight * kl, {"ce": ce, "kl": kl}


class Foo(Method):
    name = "foo"
    supports_teacher_cache = False
    teacher_cache_reason = "foo wants the live teacher"
    supports_sharding = False
    sharding_reason = "foo was never tried sharded"

    @classmethod
    def loss_callable(cls):
        return foo_loss

    @classmethod
    def run_options(cls, config):
        return {"temperature": 2.0}  # derived at run time; a recipe's loss.temperature would win

    def __call__(self, student, teacher, batch, model=None) -> StepOutput:
        t = self.run_teacher(teacher, batch["teacher"]).inputs
        out = student(batch["student"], model=model, loss_fn=lambda s: foo_loss(s, t, **self.loss_kwargs))
        loss, parts = out.loss_output
        return StepOutput(loss, {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}})


@pytest.fixture
def foo():
    register_method(Foo)
    try:
        yield Foo
    finally:
        METHODS.pop("foo", None)
    assert tuple(METHODS) == BUILT_IN


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("registry") / "ws")


def recipe(ws, out, *extra):
    return load_recipe(None, workspace_overrides(ws, out, *FAST, *extra))


def fake_trainer(kind):
    """Enough of a Trainer for :func:`check_sharding_supported`: FSDP, ZeRO-3 or ZeRO-2."""
    stage = {"fsdp": None, "zero3": 3, "zero2": 2}[kind]
    plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
    return SimpleNamespace(is_fsdp_enabled=kind == "fsdp",
                           accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))


def test_registered_method_loads_is_validated_and_trains(ws, tmp_path, foo):
    config = recipe(ws, tmp_path / "foo", "method=foo", "loss.kl_weight=0.25", "max_steps=2")
    assert config.method == "foo" and config.loss == {"kl_weight": 0.25}
    with pytest.raises(UserError, match=re.escape("unknown loss option 'loss.kl_wieght' of method 'foo' (did you mean "
                                                  "'loss.kl_weight'?)")):
        recipe(ws, tmp_path / "bad", "method=foo", "loss.kl_wieght=1")
    with pytest.raises(UserError, match=r"loss.kl_weight must be float, got 'abc'"):
        recipe(ws, tmp_path / "bad", "method=foo", "loss.kl_weight=abc")
    with pytest.raises(UserError, match=re.escape("method 'foo' cannot train from teacher_cache: foo wants the live "
                                                  "teacher; unset teacher_cache")):
        recipe(ws, tmp_path / "bad", "method=foo", f"teacher_cache={tmp_path}")

    trainer = build_trainer(config)  # the run adds run_options under the recipe's own loss: values
    assert isinstance(trainer.method, Foo) and trainer.teacher_adapter is not None  # needs_teacher: loaded
    assert trainer.method.loss_kwargs == {"kl_weight": 0.25, "temperature": 2.0}
    for kind in ("fsdp", "zero3"):
        with pytest.raises(NotImplementedError, match=re.escape("method 'foo' is not supported under")):
            check_sharding_supported(fake_trainer(kind), trainer.method)
    check_sharding_supported(fake_trainer("zero2"), trainer.method)

    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    summary = train(config)
    assert summary["global_step"] == 2
    logs = [json.loads(line) for line in open(tmp_path / "foo" / "log.jsonl")]
    steps = [r for r in logs if "objective" in r]
    assert len(steps) == 2 and all({"ce", "kl"} <= set(r) for r in steps)
    assert all(torch.isfinite(torch.tensor([r["objective"], r["ce"], r["kl"]])).all() for r in steps)
    from emkd.models import load_student

    final, _ = load_student(summary["final_model"])
    changed = dict(final.named_parameters())
    assert any(not torch.equal(changed[n], p) for n, p in params.items()), "foo trained nothing"


def test_unknown_and_duplicate_methods_are_refused(foo):
    with pytest.raises(ValueError, match=re.escape(f"method must be one of {BUILT_IN + ('foo',)}, got 'nope'")):
        TrainConfig(method="nope")
    with pytest.raises(ValueError, match="method 'foo' is already registered by Foo"):
        register_method(type("Foo2", (Foo,), {}))
    assert METHODS["foo"] is Foo


def test_built_in_methods_and_their_flags():
    with pytest.raises(ValueError, match=re.escape(f"method must be one of {BUILT_IN}, got 'nope'")):
        TrainConfig(method="nope")
    assert [m for m in BUILT_IN if not METHODS[m].needs_teacher] == ["sft"]
    assert [m for m in BUILT_IN if not METHODS[m].supports_teacher_cache] == ["align_ti"]
    assert [m for m in BUILT_IN if not METHODS[m].supports_sharding] == ["align_ti"]
    assert all(METHODS[m].run_options(TrainConfig(method=m, teacher="t", irs_layer=3)) == {} for m in BUILT_IN
               if m != "align_ti")


def test_align_ti_resolves_its_iva_layer_through_run_options(tmp_path):
    align_ti = METHODS["align_ti"]
    assert align_ti.run_options(TrainConfig(method="align_ti", teacher="t", irs_layer=3)) == {"iva_layer": 3}
    (tmp_path / "irs.json").write_text(json.dumps({"best_layer": 2}))
    config = TrainConfig(method="align_ti", teacher="t", irs_file=str(tmp_path / "irs.json"))
    assert align_ti.run_options(config) == {"iva_layer": 2}
    assert align_ti.run_options(TrainConfig(method="align_ti")) == {}  # no teacher: the run reports that instead
    with pytest.raises(ValueError, match=re.escape("method 'align_ti' needs the teacher layer of IVA's weights")):
        align_ti.run_options(TrainConfig(method="align_ti", teacher="t"))


def test_align_ti_refusals_keep_their_messages():
    with pytest.raises(ValueError, match=re.escape(
        "method 'align_ti' cannot train from teacher_cache: its TPA runs the teacher on candidates sampled from the "
        "student at every step, which no cache holds; unset teacher_cache"
    )):
        TrainConfig(method="align_ti", teacher_cache="cache")
    align_ti = build_method("align_ti", iva_layer=-1)
    for kind, under in (("fsdp", "FSDP"), ("zero3", "DeepSpeed ZeRO-3")):
        with pytest.raises(NotImplementedError, match=re.escape(
            f"method 'align_ti' is not supported under {under}: TPA reads the student's LM head outside its forward "
            "pass, where it is sharded. Use DDP or ZeRO-2."
        )):
            check_sharding_supported(fake_trainer(kind), align_ti)
    check_sharding_supported(fake_trainer("zero2"), align_ti)


# ---- emkd train --help-method --------------------------------------------------------------------------------------
def test_describe_method_lists_every_loss_option_with_type_default_and_meaning(foo):
    from emkd.training.methods import describe_method

    text = describe_method("emkd")
    assert text.startswith("method emkd: EM-KD:")
    assert "  teacher: required" in text and "  teacher_cache: yes" in text
    for key in METHODS["emkd"].loss_options():
        assert f"\n  {key} (" in text, key
    assert "  alpha (float, default 0.5): weight of SUP; ``1 - alpha`` weighs RLD (paper: 0.5)." in text
    assert "  matching (str, default 'hungarian_logits'): ``hungarian_logits`` (paper)" in text
    rkl = describe_method("rkl")  # the method's defaults, not the loss class's
    assert "  divergence (str, default 'reverse')" in rkl and "  ce_weight (float, default 0.5)" in rkl
    align = describe_method("align_ti")
    assert "teacher_cache: no (its TPA runs the teacher" in align and "  iva_layer (int, required)" in align
    assert "  teacher: none" in describe_method("sft")
    foo_text = describe_method("foo")  # a method registered from outside the package
    assert "  kl_weight (float, default 0.5)" in foo_text
    assert "FSDP / ZeRO-3: no (foo was never tried sharded)" in foo_text
    with pytest.raises(ValueError, match="unknown method 'emdk'; did you mean 'emkd'"):
        describe_method("emdk")


def test_docstring_args_reads_entries_shared_names_and_continuations():
    from emkd.training.methods import docstring_args

    doc = ("Summary.\n\nArgs:\n    a: first\n        continued.\n    b, c: shared\n    d:\n        below.\n\n"
           "Returns:\n    x: no")
    assert docstring_args(doc) == {"a": "first continued.", "b": "shared", "c": "shared", "d": "below."}
    assert docstring_args("No sections.") == {}


def test_cli_help_method(capsys):
    from emkd.cli import main

    assert main(["train", "--help-method", "kd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method kd: Vanilla KD") and "  kd_weight (float, default 1.0)" in out
    assert main(["train", "--help-method", "nope"]) == 2
    assert "emkd train: error: --help-method: unknown method 'nope'" in capsys.readouterr().err


# ---- a method from an installed package: the "emkd.methods" entry point -------------------------------------------
PLUGIN = '''
from emkd.training.methods import register_method
{body}
'''
PLUGIN_METHOD = '''
import sys
sys.path.insert(0, {tests!r})
from test_method_registry import Foo

@register_method
class FooPlugin(Foo):
    name = "foo_plugin"
'''


def _install_plugin(root, package, entry, body):
    """A package on ``sys.path`` with a dist-info declaring ``entry`` in the ``emkd.methods`` group, as pip leaves
    it."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(PLUGIN.format(body=body))
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[emkd.methods]\n{entry}\n")


def test_an_installed_package_adds_a_method_through_its_entry_point(ws, tmp_path, monkeypatch):
    import importlib
    from pathlib import Path

    from emkd.training.methods import describe_method, load_method_plugins

    tests = str(Path(__file__).parent)
    _install_plugin(tmp_path / "site", "emkd_foo_plugin", "foo_plugin = emkd_foo_plugin:FooPlugin",
                    PLUGIN_METHOD.format(tests=tests))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    try:
        config = recipe(ws, tmp_path / "run", "method=foo_plugin", "loss.kl_weight=0.25", "max_steps=1")
        assert config.method == "foo_plugin" and "foo_plugin" in METHODS  # loaded when the recipe asked for it
        assert "method foo_plugin:" in describe_method("foo_plugin")
        assert load_method_plugins() == []  # once
        assert train(config)["global_step"] == 1
    finally:
        METHODS.pop("foo_plugin", None)
        for name in [m for m in sys.modules if m.startswith("emkd_foo_plugin")]:
            del sys.modules[name]
    assert tuple(METHODS) == BUILT_IN


def test_a_broken_or_silent_entry_point_is_one_line_naming_its_package(tmp_path, monkeypatch):
    import importlib

    from emkd.training.methods import load_method_plugins

    _install_plugin(tmp_path / "a", "emkd_broken", "broken = emkd_broken:Missing", "import not_a_module_anywhere")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    importlib.invalidate_caches()
    with pytest.raises(UserError, match=r"entry point 'broken' = 'emkd_broken:Missing' of package 'emkd_broken' "
                                        r"\(emkd.methods\) failed to load: ModuleNotFoundError"):
        load_method_plugins()
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    _install_plugin(tmp_path / "b", "emkd_silent", "silent = emkd_silent:Nothing", "Nothing = object")
    monkeypatch.delitem(sys.modules, "emkd_broken", raising=False)
    sys.path.remove(str(tmp_path / "a"))
    importlib.invalidate_caches()
    with pytest.raises(UserError, match=r"registered no method 'silent': decorate its class"):
        load_method_plugins()
    assert tuple(METHODS) == BUILT_IN


def test_docs_adding_a_method_walkthrough_runs_as_written(ws, tmp_path, monkeypatch):
    """docs/adding-a-method.md: its two files, saved as a package with the entry point it declares, train two steps
    from a recipe, and ``--help-method foo`` prints what the page shows."""
    import importlib
    from pathlib import Path

    from emkd.training.methods import describe_method

    page = (Path(__file__).parents[1] / "docs" / "adding-a-method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 2, "the page shows the loss and the registration, one block each"
    site = tmp_path / "site"
    (site / "mypkg").mkdir(parents=True)
    (site / "mypkg" / "__init__.py").write_text("")
    (site / "mypkg" / "foo_loss.py").write_text(blocks[0])
    (site / "mypkg" / "foo_method.py").write_text(blocks[1])
    entry = re.search(r'\[project.entry-points."emkd.methods"\]\n(.*)\n', page).group(1)
    entry = entry.replace('"', '')  # a TOML string in pyproject.toml, a bare value in entry_points.txt
    info = site / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[emkd.methods]\n{entry}\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        config = recipe(ws, tmp_path / "run", "method=foo", "loss.kl_weight=0.25", "max_steps=2")
        shown = re.search(r"```\n(method foo:.*?)```", page, re.S).group(1).strip()
        assert describe_method("foo") == shown
        summary = train(config)
        assert summary["global_step"] == 2
        steps = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
        assert all({"ce", "kl"} <= set(r) for r in steps if "objective" in r)
    finally:
        METHODS.pop("foo", None)
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    assert tuple(METHODS) == BUILT_IN

"""A user's first run: the installed transformers' API, one-line errors for what the user gave, honest demo output.

Covers: :mod:`emkd.compat` (the decoder cache's name changed in transformers 5.24), ``emkd --version``, the
``emkd train`` errors for unset or missing paths in every shipped recipe, :class:`~emkd.errors.UserError` handling
in the CLI, and the paired difference the demo prints under its table.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from transformers import GenerationMixin, Qwen2Model

from emkd.cli import main
from emkd.compat import CACHE_KEY, installed_versions, pop_cache
from emkd.errors import UserError
from emkd.evaluation import EvalResult, Prediction, paired_difference
from emkd.models.student import EfficientMLLMOutput
from emkd.training.config import PATH_HINTS, check_paths, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# ---- the installed transformers' API ------------------------------------------------------------------------------
def test_cache_key_is_the_name_the_installed_transformers_uses():
    generation = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    decoder = inspect.signature(Qwen2Model.forward).parameters
    assert CACHE_KEY in generation and CACHE_KEY in decoder
    assert CACHE_KEY in {f.name for f in dataclasses.fields(EfficientMLLMOutput)}
    if transformers.__version__ >= "5.24":
        assert CACHE_KEY == "cache"


def test_pop_cache_reads_either_name_and_refuses_both():
    cache = object()
    for name in ("cache", "past_key_values"):
        kwargs = {name: cache, "other": 1}
        assert pop_cache(kwargs) is cache and kwargs == {"other": 1}
    kwargs = {"cache": None, "past_key_values": None}
    assert pop_cache(kwargs) is None and kwargs == {}
    with pytest.raises(ValueError, match="not both"):
        pop_cache({"cache": cache, "past_key_values": object()})


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_student_decodes_incrementally_with_a_cache_passed_under_either_name(name):
    """Prefill + one cached step gives the logits of a full forward, whichever name the cache is passed under."""
    from emkd.models.tiny import build_tiny_student
    from emkd.models.tokenizer import build_tokenizer

    tok = build_tokenizer(["a red square on the left", "what colour is the circle"])
    model = build_tiny_student(tok, seed=0)
    ids = torch.randint(0, tok.eos_token_id, (2, 7))  # (B, L), no image tokens
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (B, L, V)
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        cache = getattr(prefill, CACHE_KEY)
        assert cache is not None and cache.get_seq_length() == 6
        step = model(input_ids=ids[:, -1:], use_cache=True, **{name: cache}).logits  # (B, 1, V)
    torch.testing.assert_close(step[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_version_lists_the_libraries(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"transformers {transformers.__version__}" in out and f"torch {torch.__version__}" in out
    assert set(installed_versions()) >= {"python", "emkd", "transformers", "accelerate", "tokenizers", "safetensors"}


# ---- paths a recipe needs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_names_each_path_it_needs_and_where_to_get_it(recipe, tmp_path, monkeypatch):
    """Run from an empty folder, a recipe's relative paths do not exist and its unset ones are needed: one
    UserError names the recipe, every such key and, from the recipe's own path_help, where to get each."""
    monkeypatch.chdir(tmp_path)
    path = RECIPES / recipe
    config = load_recipe(path)
    with pytest.raises(UserError) as info:
        check_paths(config, str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    raw = yaml.safe_load(path.read_text())
    head = message[len(str(path)):].split(" -- ")[0]
    keys = re.findall(r"--set ([\w.]+)=", head) + re.findall(r"([\w.]+)=\S+ does not exist", head)
    assert set(keys) <= set(PATH_HINTS)
    assert "student" in keys and "data.train" in keys
    for key in keys:
        assert key in raw.get("path_help", {}), f"{recipe}: path_help has no hint for {key}"
        assert raw["path_help"][key] in message


def test_unset_paths_are_listed_as_the_set_options_that_fill_them():
    config = load_recipe(None, ["method=emkd"])
    with pytest.raises(UserError) as info:
        check_paths(config, "r.yaml")
    head = str(info.value).split(" -- ")[0]
    assert head == "r.yaml: set --set student=DIR --set teacher=DIR --set data.train=FILE"
    sft = load_recipe(None, ["method=sft"])
    with pytest.raises(UserError, match=r"^r.yaml: set --set student=DIR --set data.train=FILE -- "):
        check_paths(sft, "r.yaml")


def test_existing_paths_pass(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    config = load_recipe(None, [f"student={tmp_path}", f"teacher={tmp_path}", f"data.train={tmp_path / 'train.json'}"])
    check_paths(config, "r.yaml")  # no error


def test_path_help_keys_are_checked():
    with pytest.raises(UserError, match=r"path_help has keys \['studnet'\]"):
        load_recipe(None, ["path_help.studnet=x"])


# ---- the command line: one line and exit 2 for what the user gave ------------------------------------------------
def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "emkd", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=RECIPES.parent)


def test_train_without_paths_is_one_line_and_exit_2():
    out = run_cli("train", "recipes/tiny_phase2.yaml")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("emkd train: error: recipes/tiny_phase2.yaml: set --set student=DIR")
    assert "Traceback" not in out.stderr and "emkd train recipes/tiny_phase1.yaml" in lines[0]


@pytest.mark.parametrize("args, expected", [
    (["train", "no-such-recipe.yaml"], "recipe no-such-recipe.yaml not found"),
    (["train", "recipes/tiny_phase2.yaml", "--set", "max_steps=abc"], "max_steps must be int, got 'abc'"),
    (["train", "recipes/tiny_phase2.yaml", "--set", "lerning_rate=1"], "unknown recipe key 'lerning_rate' (did you mean 'learning_rate'?)"),
])
def test_recipe_errors_are_one_line(args, expected):
    out = run_cli(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emkd train: error: ") and expected in lines[0]


def test_debug_shows_the_traceback():
    for args, env in [(["--debug", "train", "recipes/tiny_phase2.yaml"], None),
                      (["train", "recipes/tiny_phase2.yaml"], {"EMKD_DEBUG": "1"})]:
        out = run_cli(*args, env=env)
        assert out.returncode == 2 and "Traceback" in out.stderr and "UserError" in out.stderr


def test_bugs_keep_their_traceback(monkeypatch):
    """Only UserError is turned into one line: any other exception is ours and propagates."""
    import emkd.cli as cli

    def broken(args):
        raise KeyError("a bug")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["train"].set_defaults(func=broken)
    with pytest.raises(KeyError):
        cli.main(["train", "x.yaml"])


# ---- the demo's numbers and what they do not show ----------------------------------------------------------------
def result(correct: list[bool], name: str = "m") -> EvalResult:
    predictions = [Prediction(str(i), "c", f"q{i}", "a", "a" if c else "b", c) for i, c in enumerate(correct)]
    n = len(correct)
    acc = sum(correct) / n
    return EvalResult(model=name, data="d", num_samples=n, accuracy={"c": acc}, counts={"c": n},
                      correct={"c": sum(correct)}, average=acc, micro_accuracy=acc, vision_tokens_per_image=None,
                      ttft_ms=None, ttft_samples_ms=[], ttft_threads=1, ttft_warmup=0, ttft_sample_id=None,
                      ttft_method="", max_new_tokens=1, batch_size=1, predictions=predictions)


def test_paired_difference_against_a_hand_computation():
    a = result([True, True, True, False, True, False, True, True])
    b = result([True, False, True, False, False, False, True, False])
    d = paired_difference(a, b)
    diffs = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1], dtype=torch.float64)
    half = 1.96 * diffs.std().item() / 8 ** 0.5
    assert d.num_samples == 8
    assert d.mean == pytest.approx(100 * 3 / 8)
    assert (d.low, d.high) == pytest.approx((100 * (3 / 8 - half), 100 * (3 / 8 + half)))
    assert paired_difference(a, a).mean == 0 and paired_difference(a, a).low == 0
    assert "95 % CI" in str(d)


def test_paired_difference_refuses_different_records():
    with pytest.raises(ValueError, match="not scored on the same records"):
        paired_difference(result([True, False]), result([True]))


def test_full_demo_states_paired_differences_and_what_they_do_not_cover():
    from emkd.demo.pipeline import QUICK, DemoBudget, what_it_shows

    results = {"teacher": result([True, True, True, False]), "student-sft": result([True, False, False, False]),
               "student-emkd": result([True, True, False, False])}
    text = what_it_shows(results, DemoBudget(), quick=False)
    assert "one seed" in text and "not the seed" in text
    assert f"student-emkd - student-sft: {paired_difference(results['student-emkd'], results['student-sft'])}" in text
    assert "teacher - student-sft: +50.0 points" in text and "teacher - student-emkd" in text
    quick = what_it_shows(results, QUICK, quick=True)
    assert "pipeline check" in quick and f"{QUICK.student_phase2_steps} phase-2 steps, 4 held-out records" in quick

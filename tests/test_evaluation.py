"""``emkd eval``: answer normalisation and multiple-choice reading on hand-written cases, then real tiny checkpoints
(the student, the vanilla student-class teacher, an HF LLaVA teacher) evaluated end to end: prompts equal the
training rendering up to the answer, batched = unbatched, known answers score 1 and wrong ones 0, JSON round-trips."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys

import pytest
import torch
from _workspace import build_workspace
from transformers import AutoTokenizer

from emkd.data import load_images, render_side
from emkd.evaluation import (
    EvalResult,
    add_eval_arguments,
    evaluate,
    extract_choice,
    format_table,
    is_correct,
    load_for_eval,
    normalize_answer,
    read_eval_samples,
    render_prompt,
    run_eval,
)
from emkd.evaluation.evaluate import Prediction, batch_inputs, measure_ttft
from emkd.inputs import IGNORE_INDEX
from emkd.models import save_tiny_teacher
from emkd.models.tiny import build_tiny_student, tiny_image_processor

COLOURS = ["red", "green", "blue", "yellow"]


# ---- normalisation --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Cat", "cat"),
        ("  A dog.  ", "dog"),
        ("an apple", "apple"),
        ("a", ""),
        ("", ""),
        ("theme", "theme"),  # articles go only as whole words
        ("Anne and the other", "anne and other"),
        ("Two", "2"),
        ("zero", "0"),
        ("seventeen apples", "17 apples"),
        ("twenty", "20"),
        ("twentyone", "twentyone"),
        ("twenty-one", "20 1"),  # a hyphen is punctuation: two words, each mapped
        ("There are three dogs!", "there are 3 dogs"),
        ("don't", "dont"),
        ("don\u2019t", "dont"),
        ("1,000 people", "1000 people"),
        ("red, green", "red green"),
        ("Hello,world", "hello world"),
        ("3.5", "3.5"),
        ("It ends here.", "it ends here"),
        ("\u00abquoted\u00bb (text)", "quoted text"),
        ("A\tb\n  c", "b c"),
        ("The answer: Yes.", "answer yes"),
        ("RED", "red"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("A", "A"),
        ("b", "B"),
        ("(B)", "B"),
        ("[c]", "C"),
        ("( d )", "D"),
        ("C.", "C"),
        ("D)", "D"),
        ("B: green", "B"),
        ("B. green", "B"),
        ("  C  ", "C"),
        ("Answer: C", "C"),
        ("The answer is (D).", "D"),
        ("option a", "A"),
        ("E", None),  # outside the four choices
        ("(E)", None),
        ("green", "B"),
        ("Green.", "B"),
        ("the square is blue", "C"),  # exactly one choice inside the answer
        ("red or green", None),  # two choices inside: no letter
        ("A square", None),  # "A" followed by text is an article, and no choice is named
        ("purple", None),
        ("", None),
    ],
)
def test_extract_choice(pred, letter):
    assert extract_choice(pred, COLOURS) == letter


def test_extract_choice_special_cases():
    # a choice inside another matching choice only matched as part of it
    assert extract_choice("dark red", ["red", "dark red"]) == "B"
    assert extract_choice("it is dark red", ["red", "dark red"]) == "B"
    assert extract_choice("red", ["red", "dark red"]) == "A"
    # two choices with the same normalised text cannot be told apart
    assert extract_choice("red", ["Red", "red."]) is None
    # normalisation applies to choices: number words, articles
    assert extract_choice("2", ["two", "three"]) == "A"
    assert extract_choice("a dog", ["a cat", "a dog"]) == "B"
    assert extract_choice("a.", ["a cat", "a dog"]) == "A"
    with pytest.raises(ValueError, match="1 to 26 choices"):
        extract_choice("A", [])


@pytest.mark.parametrize(
    "pred, answer, choices, expected",
    [
        ("The cat.", "cat", None, True),
        ("cats", "cat", None, False),
        ("two", "2", None, True),
        ("the square is red", "The square is red.", None, True),
        ("the square is red", "the square is green", None, False),
        ("", "", None, True),
        ("B", "green", COLOURS, True),
        ("(B) green", "B", COLOURS, True),
        ("green", "B", COLOURS, True),
        ("C", "B", COLOURS, False),
        ("\ufffd\ufffd", "B", COLOURS, False),
        ("E", "B", COLOURS, False),
    ],
)
def test_is_correct(pred, answer, choices, expected):
    assert is_correct(pred, answer, choices) is expected


def test_is_correct_needs_a_reference_that_names_a_choice():
    with pytest.raises(ValueError, match="names none of the choices"):
        is_correct("A", "purple", COLOURS)


# ---- tiny checkpoints and data --------------------------------------------------------------------------------------
def _records() -> list[dict]:
    """Text-only first (so the timed sample is the second), categories, multiple choice, two images, multi-turn."""
    q = "what colour is the square?"
    return [
        {"id": "t0", "conversations": [
            {"from": "human", "value": "how many squares are there?"}, {"from": "gpt", "value": "one"}]},
        {"id": "c0", "category": "colour", "image": "0.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "the square is red"}]},
        {"id": "c1", "category": "colour", "image": "1.png", "conversations": [
            {"from": "human", "value": f"{q} describe the image.<image>"}, {"from": "gpt", "value": "green"}]},
        {"id": "m0", "category": "mc", "image": "2.png", "choices": COLOURS, "conversations": [
            {"from": "human", "value": f"<image>\n{q}\nA. red\nB. green\nC. blue\nD. yellow"},
            {"from": "gpt", "value": "C"}]},
        {"id": "m1", "category": "mc", "images": ["3.png"], "choices": COLOURS, "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": "yellow"}]},
        {"id": "two", "category": "colour", "images": ["0.png", "1.png"], "conversations": [
            {"from": "human", "value": "<image><image>how many squares are there?"}, {"from": "gpt", "value": "two"}]},
        {"id": "multi", "image": "2.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "blue"},
            {"from": "human", "value": "how many squares are there?"}, {"from": "gpt", "value": "one"}]},
    ]


def _sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every matrix at unit scale (std 1/sqrt(fan_in)) so that greedy answers are non-empty and differ between
    prompts; at the 0.02-std initialisation a tiny model just repeats the last prompt token (a newline)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    return model


def _save_sharp_student(directory, tokenizer, seed: int = 0):
    """A tiny student checkpoint with :func:`_sharpen`ed weights (its model, tokenizer and image processor)."""
    model = _sharpen(build_tiny_student(tokenizer, seed=seed), seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tiny_image_processor(model.config.tile_size).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    paths = build_workspace(tmp_path_factory.mktemp("eval") / "ws")
    root = paths["root"]
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    paths["sharp"] = _save_sharp_student(root / "sharp", tokenizer)
    paths["llava"] = save_tiny_teacher("llava", root / "llava", tokenizer, seed=1)
    paths["bench"] = root / "bench.json"
    paths["bench"].write_text(json.dumps(_records()))
    paths["bench_jsonl"] = root / "bench.jsonl"
    paths["bench_jsonl"].write_text("\n".join(json.dumps(r) for r in _records()) + "\n\n")
    return paths


def _eval(path, ws, data=None, **kwargs):
    kwargs = {"ttft_runs": 0, "progress": False, **kwargs}
    return evaluate(path, data or ws["bench"], ws["images"], **kwargs)


# ---- data -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["bench", "bench_jsonl"])
def test_read_eval_samples(ws, key):
    samples = read_eval_samples(ws[key], ws["images"])
    assert [s.record.id for s in samples] == [r["id"] for r in _records()]
    assert [s.category for s in samples] == ["all", "colour", "colour", "mc", "mc", "colour", "all"]
    assert samples[3].choices == tuple(COLOURS) and samples[0].choices is None
    multi = samples[-1]
    assert (multi.question, multi.answer) == ("how many squares are there?", "one")
    assert [t.role for t in multi.prompt_record.messages] == ["user", "assistant", "user"]
    assert samples[4].question == "<image>what colour is the square?"
    assert len(read_eval_samples(ws[key], ws["images"], limit=2)) == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"category": 3}, "'category' must be a non-empty string"),
        ({"choices": "red"}, "'choices' must be a list"),
        ({"choices": ["red", "green"], "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "purple"}]}, "names none of the choices"),
        ({"conversations": [{"from": "human", "value": "q"}]}, "no assistant turn"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                            {"from": "human", "value": "q2"}]}, "user turn with no answer"),
        ({"image": "missing.png"}, "not found"),
    ],
)
def test_bad_eval_records_are_reported_with_their_place(ws, tmp_path, change, message):
    records = _records()
    records[2] = {**records[2], **change}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    with pytest.raises(ValueError, match=message) as info:
        read_eval_samples(path, ws["images"])
    assert f"{path}:3 (id 'c1')" in str(info.value)


def test_prompt_is_the_training_rendering_up_to_the_answer(ws):
    """The prompt ids are the ids ``render_side`` gives the full record, cut before the last answer's first token."""
    side = load_for_eval(ws["student"]).side
    for s in read_eval_samples(ws["bench"], ws["images"]):
        images = load_images(s.record, ws["images"])
        prompt = render_prompt(s.prompt_record, images, side)
        full = render_side(s.record, images, side)
        supervised = (full["labels"] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        starts = [i for i in supervised if i - 1 not in supervised]  # first token of each assistant turn
        assert torch.equal(prompt.input_ids, full["input_ids"][: starts[-1]]), s.record.id
        text = side.tokenizer.decode(prompt.input_ids)
        assert text.endswith("<|im_start|>assistant\n")
        assert prompt.num_images == len(s.record.image_paths)
        assert prompt.vision_tokens == 4 * prompt.num_images
    with pytest.raises(ValueError, match="must end with a user turn"):
        render_prompt(s.record, images, side)


# ---- evaluation of tiny checkpoints ---------------------------------------------------------------------------------
def test_evaluate_tiny_student(ws):
    result = _eval(ws["student"], ws, ttft_runs=3, ttft_warmup=1, ttft_threads=1)
    assert result.num_samples == 7 and len(result.predictions) == 7
    assert list(result.counts) == ["all", "colour", "mc"]
    assert result.counts == {"all": 2, "colour": 3, "mc": 2}
    assert set(result.correct) == set(result.counts)
    for category, acc in result.accuracy.items():
        assert 0.0 <= acc <= 1.0
        assert acc == result.correct[category] / result.counts[category]
    assert result.average == pytest.approx(sum(result.accuracy.values()) / 3)
    assert result.micro_accuracy == pytest.approx(sum(result.correct.values()) / 7)
    assert result.vision_tokens_per_image == 4.0
    assert len(result.ttft_samples_ms) == 3 and all(t > 0 for t in result.ttft_samples_ms)
    assert result.ttft_ms == statistics.median(result.ttft_samples_ms) > 0
    assert (result.ttft_threads, result.ttft_warmup, result.ttft_sample_id) == (1, 1, "c0")  # first with an image
    for p, r in zip(result.predictions, _records()):
        assert isinstance(p, Prediction) and isinstance(p.prediction, str)
        assert p.id == r["id"] and p.correct == is_correct(p.prediction, p.answer, r.get("choices"))
    assert result.predictions[-1].answer == "one"


def test_vanilla_teacher_has_every_patch_token(ws):
    result = _eval(ws["teacher"], ws, limit=3)
    assert result.vision_tokens_per_image == 16.0  # 32 px / 8 px patches, no pooling
    assert result.num_samples == 3 and result.counts == {"all": 1, "colour": 2}


def test_batched_predictions_equal_unbatched(ws):
    """Left padding changes nothing: prompts of different lengths, with and without images, in batches of 3."""
    one = _eval(ws["sharp"], ws, max_new_tokens=6)
    three = _eval(ws["sharp"], ws, max_new_tokens=6, batch_size=3)
    answers = [p.prediction for p in one.predictions]
    assert answers == [p.prediction for p in three.predictions]
    assert sum(bool(a) for a in answers) >= 5 and len(set(answers)) >= 3  # the check is not vacuous
    assert three.batch_size == 3


def test_known_answers_score_one_and_wrong_answers_zero(ws, tmp_path):
    """Reference = the model's own greedy answer -> accuracy 1; a reference it cannot have produced -> 0."""
    records = [r for r in _records() if "choices" not in r]
    data = tmp_path / "open.json"
    data.write_text(json.dumps(records))
    first = _eval(ws["sharp"], ws, data)

    def with_answers(answers):
        out = json.loads(json.dumps(records))
        for r, answer in zip(out, answers):
            if "conversations" in r:
                r["conversations"][-1]["value"] = answer
            else:
                r["messages"][-1]["content"] = answer
        return out

    data.write_text(json.dumps(with_answers([p.prediction for p in first.predictions])))
    right = _eval(ws["sharp"], ws, data)
    assert [p.prediction for p in right.predictions] == [p.prediction for p in first.predictions]
    assert right.micro_accuracy == right.average == 1.0
    assert all(acc == 1.0 for acc in right.accuracy.values())

    data.write_text(json.dumps(with_answers([f"zzz {p.prediction}" for p in first.predictions])))
    wrong = _eval(ws["sharp"], ws, data)
    assert wrong.micro_accuracy == wrong.average == 0.0
    assert not any(p.correct for p in wrong.predictions)


def test_multiple_choice_letters_are_scored(ws, tmp_path):
    """A record whose choices contain the model's own answer, with that choice's letter as the reference."""
    records = [r for r in _records() if "choices" not in r and r["id"] != "multi"]
    data = tmp_path / "mc.json"
    data.write_text(json.dumps(records))
    first = _eval(ws["sharp"], ws, data)
    mc = []
    for r, p in zip(records, first.predictions):
        if extract_choice(p.prediction, ["zzz", p.prediction]) != "B":  # an answer that reads as a letter itself
            continue
        mc.append({**r, "choices": ["zzz", p.prediction], "conversations": [
            *r["conversations"][:-1], {"from": "gpt", "value": "B"}]})
    assert mc, "no prediction usable as a choice text"
    data.write_text(json.dumps(mc))
    assert _eval(ws["sharp"], ws, data).micro_accuracy == 1.0
    for r in mc:
        r["conversations"][-1]["value"] = "(A)"
    data.write_text(json.dumps(mc))
    assert _eval(ws["sharp"], ws, data).micro_accuracy == 0.0


@pytest.mark.parametrize("kind, architecture", [("llava", "LlavaForConditionalGeneration"),
                                                ("qwen2_vl", "Qwen2VLForConditionalGeneration")])
def test_hf_teacher(ws, kind, architecture):
    """HF LLaVA (16 patch tokens per 32 px image, CLS dropped) and Qwen2-VL (4x4 patches merged 2x2 -> 4 tokens,
    wrapped in <|vision_start|> ... <|vision_end|>, 3D positions from mm_token_type_ids) evaluate, batched or not."""
    path = ws[kind] if kind in ws else save_tiny_teacher(kind, ws["root"] / kind, AutoTokenizer.from_pretrained(
        ws["student"]), seed=1)
    adapter = load_for_eval(path)
    model, side = adapter.model, adapter.side
    assert type(model).__name__ == architecture and not model.training
    result = _eval(path, ws, ttft_runs=2, ttft_warmup=0, adapter=adapter)
    assert result.num_samples == 7
    assert result.vision_tokens_per_image == {"llava": 16.0, "qwen2_vl": 4.0}[kind]
    assert all(isinstance(p.prediction, str) for p in result.predictions)
    assert result.ttft_ms > 0
    sample = read_eval_samples(ws["bench"], ws["images"])[1]
    prompt = render_prompt(sample.prompt_record, load_images(sample.record, ws["images"]), side)
    inputs = batch_inputs(adapter, [prompt])  # the training adapter's model_inputs: M-RoPE ids exactly for Qwen2-VL
    assert ("mm_token_type_ids" in inputs) == (kind == "qwen2_vl")
    if kind == "qwen2_vl":
        assert "<|vision_start|><|image_pad|>" in side.tokenizer.decode(prompt.input_ids)
        assert inputs["mm_token_type_ids"].sum() == prompt.vision_tokens

    _sharpen(model)
    one = _eval(path, ws, max_new_tokens=5, adapter=adapter)
    four = _eval(path, ws, max_new_tokens=5, batch_size=4, adapter=adapter)
    answers = [p.prediction for p in one.predictions]
    assert answers == [p.prediction for p in four.predictions]
    assert len(set(answers)) >= 3


def test_every_checkpoint_loads_through_the_architecture_registry(ws, monkeypatch):
    """The student is one registered architecture among the teachers': evaluation has no branch of its own for it."""
    import emkd.models.teachers as teachers

    adapter = load_for_eval(ws["student"])
    model, side = adapter.model, adapter.side
    assert type(model).__name__ == "EfficientMLLMForCausalLM" and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert side.image_token_id == model.config.image_token_id
    monkeypatch.delitem(teachers.TEACHER_REGISTRY, "EfficientMLLMForCausalLM")
    with pytest.raises(ValueError, match="unsupported teacher architecture 'EfficientMLLMForCausalLM'"):
        load_for_eval(ws["student"])


def test_measure_ttft_restores_threads(ws):
    adapter = load_for_eval(ws["student"])
    sample = read_eval_samples(ws["bench"], ws["images"])[1]
    prompt = render_prompt(sample.prompt_record, load_images(sample.record, ws["images"]), adapter.side)
    before = torch.get_num_threads()
    times = measure_ttft(adapter, prompt, runs=4, warmup=1, num_threads=1)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert torch.get_num_threads() == before


def test_evaluate_rejects_bad_arguments(ws):
    for kwargs, message in [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"ttft_runs": -1}, "ttft_runs"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": 0}, "limit"),
    ]:
        with pytest.raises(ValueError, match=message):
            _eval(ws["student"], ws, **kwargs)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_for_eval(ws["root"])


# ---- report and command line ----------------------------------------------------------------------------------------
def _result(model, accuracy, ttft=None, vision=None):
    counts = {c: 2 for c in accuracy}
    correct = {c: round(a * 2) for c, a in accuracy.items()}
    return EvalResult(
        model=model, data="d.json", num_samples=2 * len(accuracy), accuracy=accuracy, counts=counts, correct=correct,
        average=sum(accuracy.values()) / len(accuracy), micro_accuracy=sum(correct.values()) / (2 * len(accuracy)),
        vision_tokens_per_image=vision, ttft_ms=ttft, ttft_samples_ms=[] if ttft is None else [ttft],
        ttft_threads=1, ttft_warmup=0, ttft_sample_id=None, ttft_method="m", max_new_tokens=8, batch_size=1,
    )


def test_format_table():
    a = _result("runs/student", {"colour": 0.5, "mc": 1.0}, ttft=12.345, vision=4)
    b = _result("ckpt/teacher", {"colour": 1.0, "count": 0.0}, vision=576)
    lines = format_table([a, b], ["student", "teacher"]).splitlines()
    assert lines[0].split() == ["model", "colour", "mc", "count", "avg", "micro", "TTFT", "ms", "vis", "tok/img"]
    assert lines[2].split() == ["student", "50.0", "100.0", "-", "75.0", "75.0", "12.3", "4.0"]
    assert lines[3].split() == ["teacher", "100.0", "-", "0.0", "50.0", "50.0", "-", "576.0"]
    assert format_table([a]).splitlines()[2].split()[0] == "student"  # default name: the directory's
    with pytest.raises(ValueError, match="2 results but 1 names"):
        format_table([a, b], ["x"])


def test_run_eval_writes_json_that_round_trips(ws, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "out" / "results.json"
    args = parser.parse_args([
        str(ws["student"]), str(ws["bench"]), "--images", str(ws["images"]), "--out", str(out), "--limit", "4",
        "--max-new-tokens", "3", "--ttft-runs", "2", "--ttft-warmup", "0", "--no-progress",
    ])
    assert run_eval(args) == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0].split()[:4] == ["model", "all", "colour", "mc"]
    assert f"wrote {out}" in stdout
    data = json.loads(out.read_text())
    result = EvalResult.from_dict(data)
    assert result.to_dict() == data
    assert result.num_samples == 4 and result.max_new_tokens == 3 and len(result.ttft_samples_ms) == 2
    assert all(isinstance(p, Prediction) for p in result.predictions)
    assert result.vision_tokens_per_image == 4.0

    bad = parser.parse_args([str(ws["student"]), str(ws["bench"]), "--no-progress"])  # images not found
    assert run_eval(bad) == 2
    assert "missing_image" in capsys.readouterr().err


def test_progress_bar_goes_to_stderr(ws, capsys):
    _eval(ws["student"], ws, limit=2, progress=True)
    captured = capsys.readouterr()
    assert "eval student" in captured.err and "2/2" in captured.err
    assert "eval student" not in captured.out


def test_eval_records_with_a_line_separator_inside_a_string_keep_their_category(tmp_path):
    """U+2028 inside a JSON string is not a line break: the record and its category are read whole."""
    path = tmp_path / "eval.jsonl"
    rows = [
        {"id": "a", "category": "ocr", "conversations": [
            {"from": "human", "value": "first\u2028line?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "b", "category": "chart", "conversations": [
            {"from": "human", "value": "second?"}, {"from": "gpt", "value": "no"}]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    samples = read_eval_samples(path)
    assert [(s.record.id, s.category) for s in samples] == [("a", "ocr"), ("b", "chart")]
    assert samples[0].question == "first\u2028line?"


def test_models_are_named_by_their_run(ws, tmp_path, capsys):
    from emkd.evaluation.evaluate import model_name

    assert model_name("runs/emkd_s0/final") == "emkd_s0"
    assert model_name("runs/emkd_s0/final/") == "emkd_s0"
    assert model_name("runs/emkd_s0/checkpoint-200") == "emkd_s0/checkpoint-200"
    assert model_name("ckpt/teacher") == "teacher"
    a, b = _result("runs/sft/final", {"c": 1.0}), _result("runs/emkd/final", {"c": 0.5})
    assert [line.split()[0] for line in format_table([a, b]).splitlines()[2:]] == ["sft", "emkd"]
    # emkd eval: the run's name by default, --name when given
    run = tmp_path / "my_run"
    shutil.copytree(ws["student"], run / "final")
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    common = [str(ws["bench"]), "--images", str(ws["images"]), "--limit", "1", "--max-new-tokens", "1",
              "--ttft-runs", "0", "--no-progress"]
    assert run_eval(parser.parse_args([str(run / "final"), *common])) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "my_run"
    assert run_eval(parser.parse_args([str(run / "final"), *common, "--name", "student-A"])) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "student-A"


def test_run_eval_warns_about_a_category_answered_with_a_constant(monkeypatch, capsys):
    """A model that gives every record of a category the same answer (a stalled run) gets one warning line per such
    category; a category whose references are all one answer does not."""
    module = sys.modules["emkd.evaluation.evaluate"]  # the package re-exports a function under the module's name

    def predictions(category, answers, predicted):
        return [Prediction(id=str(i), category=category, question="q", answer=a, prediction=p, correct=a == p)
                for i, (a, p) in enumerate(zip(answers, predicted))]

    digits = [str(i % 10) for i in range(20)]
    preds = predictions("ocr", digits, ["8"] * 20) + predictions("general", ["yes"] * 20, ["yes"] * 20)
    result = EvalResult(
        model="m", data="d.json", num_samples=40, accuracy={"ocr": 0.1, "general": 1.0}, counts={"ocr": 20, "general": 20},
        correct={"ocr": 2, "general": 20}, average=0.55, micro_accuracy=0.55, vision_tokens_per_image=16.0,
        ttft_ms=None, ttft_samples_ms=[], ttft_threads=1, ttft_warmup=0, ttft_sample_id=None, ttft_method="prefill",
        max_new_tokens=8, batch_size=1, predictions=preds,
    )
    monkeypatch.setattr(module, "evaluate", lambda *args, **kwargs: result)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert run_eval(parser.parse_args(["model", "data.json", "--no-progress"])) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["emkd eval: warning: every ocr record was answered '8': the model answers this category with a "
                   "constant (its prior), not from the input"]

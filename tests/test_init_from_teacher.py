"""``emkd init-student --from-teacher``: the efficient student of a given teacher, and the tokenizer it must share.

Teachers are the demo's shipped vanilla ``EfficientMLLMForCausalLM`` (an 8 x 8 patch grid: 64 image tokens) and a
tiny real ``LlavaForConditionalGeneration`` (a 4 x 4 CLIP grid). Each student is built through the command line,
saved, loaded back with :func:`load_student` and trained for a few steps against its teacher.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _workspace import build_workspace
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from emkd.cli import main
from emkd.models import check_same_tokenization, load_student, load_teacher
from emkd.models.tokenizer import build_tokenizer
from emkd.training.config import load_recipe
from emkd.training.irs import format_scores, irs_summary
from emkd.training.run import train

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "src" / "emkd" / "demo" / "assets" / "teacher"
FAST = ["batch_size=4", "learning_rate=0.003", "lr_scheduler=constant", "warmup_ratio=0", "max_steps=2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Images and records, a tiny LLaVA teacher, and a Qwen2 LM over its vocabulary saved next to a ``qwen2``
    config (where ``AutoTokenizer`` builds ``Qwen2Tokenizer`` from the same files, with another pre-tokenizer)."""
    out = build_workspace(tmp_path_factory.mktemp("from_teacher") / "ws", teacher_kind="llava")
    tokenizer = AutoTokenizer.from_pretrained(out["teacher"])
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(5)
    Qwen2ForCausalLM(config).save_pretrained(out["root"] / "lm")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(out["teacher"] / name, out["root"] / "lm" / name)
    out["lm"] = out["root"] / "lm"
    return out


def init(teacher, out, *args) -> int:
    return main(["init-student", "--from-teacher", str(teacher), "--out", str(out), *map(str, args)])


def tower_state(model) -> dict[str, torch.Tensor]:
    """The vision tower of a teacher of either kind (EfficientMLLM: ``vision_tower``; LLaVA: ``model.vision_tower``)."""
    tower = model.vision_tower if hasattr(model, "projector") else model.model.vision_tower
    return {k: v for k, v in tower.state_dict().items() if ".head." not in k}


def assert_student_of(student_dir: Path, teacher_dir: Path, tokens: int) -> tuple:
    model, side = load_student(student_dir)
    teacher = load_teacher(teacher_dir)
    want, got = tower_state(teacher.model), model.vision_tower.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model.num_image_tokens() == tokens
    assert side.num_image_tokens(side.image_inputs([_image()]), 0) == tokens
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (student_dir / name).read_bytes() == (teacher_dir / name).read_bytes(), name
    check_same_tokenization(side.tokenizer, teacher.side.tokenizer)
    return model, teacher


def _image():
    from PIL import Image

    return Image.new("RGB", (40, 48), (200, 30, 30))


def train_briefly(ws, student: Path, teacher: Path, out: Path, method: str) -> None:
    summary = train(load_recipe(None, [f"student={student}", f"teacher={teacher}", f"data.train={ws['train']}",
                                       f"data.images={ws['images']}", f"output_dir={out}", f"method={method}",
                                       *FAST]))
    assert summary["global_step"] == 2
    load_student(summary["final_model"])


# ---- the demo teacher ---------------------------------------------------------------------------------------------
def test_demo_teacher_truncated_llm(ws, tmp_path, capsys):
    out = tmp_path / "student"
    assert init(DEMO_TEACHER, out, "--pool-size", 4, "--layers", 2) == 0
    assert "8x8 patches -> 16 per image (the teacher: 64" in capsys.readouterr().out
    model, teacher = assert_student_of(out, DEMO_TEACHER, 16)
    assert model.config.text_config.num_hidden_layers == 2
    lm, source = model.language_model.state_dict(), teacher.model.language_model.state_dict()
    kept = {k: v for k, v in source.items() if not k.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(lm) == set(kept) and all(torch.equal(lm[k], kept[k]) for k in kept)
    train_briefly(ws, out, DEMO_TEACHER, tmp_path / "run", "emkd")


def test_demo_teacher_fresh_llm(ws, tmp_path):
    out = tmp_path / "student"
    assert init(DEMO_TEACHER, out, "--pool-size", 4, "--layers", 1, "--hidden", 64) == 0
    model, _ = assert_student_of(out, DEMO_TEACHER, 16)
    text = model.config.text_config
    teacher_vocab = json.loads((DEMO_TEACHER / "config.json").read_text())["text_config"]["vocab_size"]
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (1, 64, teacher_vocab)
    train_briefly(ws, out, DEMO_TEACHER, tmp_path / "run", "sft")


# ---- a LLaVA teacher ------------------------------------------------------------------------------------------------
def test_llava_teacher_with_an_llm_over_its_vocabulary(ws, tmp_path):
    lm_tokenizer = AutoTokenizer.from_pretrained(ws["lm"])
    teacher_tokenizer = AutoTokenizer.from_pretrained(ws["teacher"])
    assert type(lm_tokenizer).__name__ != type(teacher_tokenizer).__name__  # the trap of the issue
    out = tmp_path / "student"
    assert init(ws["teacher"], out, "--pool-size", 2, "--llm", ws["lm"]) == 0
    model, teacher = assert_student_of(out, ws["teacher"], 4)
    assert type(load_student(out)[1].tokenizer) is type(teacher.side.tokenizer)
    source = Qwen2ForCausalLM.from_pretrained(ws["lm"]).state_dict()
    lm = model.language_model.state_dict()
    assert all(torch.equal(lm[k], source[k]) for k in source)
    assert (out / "preprocessor_config.json").read_bytes() == (ws["teacher"] / "preprocessor_config.json").read_bytes()
    train_briefly(ws, out, ws["teacher"], tmp_path / "run", "emkd")


def test_llava_teacher_fresh_and_truncated(ws, tmp_path):
    assert init(ws["teacher"], tmp_path / "fresh", "--pool-size", 2, "--layers", 1, "--hidden", 32) == 0
    assert_student_of(tmp_path / "fresh", ws["teacher"], 4)
    assert init(ws["teacher"], tmp_path / "cut", "--pool-size", 1, "--layers", 1) == 0
    model, teacher = assert_student_of(tmp_path / "cut", ws["teacher"], 1)
    decoder = teacher.model.model.language_model.state_dict()
    lm = model.language_model.state_dict()
    assert torch.equal(lm["model.layers.0.mlp.up_proj.weight"], decoder["layers.0.mlp.up_proj.weight"])
    assert torch.equal(lm["lm_head.weight"], teacher.model.lm_head.weight)
    train_briefly(ws, tmp_path / "cut", ws["teacher"], tmp_path / "run", "sft")


# ---- refusals -------------------------------------------------------------------------------------------------------
def test_refusals_are_one_line_user_errors(ws, tmp_path, capsys):
    cases = [
        ([], "exactly one of --llm DIR, --layers N"),
        (["--layers", 1, "--llm", ws["lm"]], "exactly one of"),
        (["--layers", 9], "the teacher has 4"),
        (["--layers", 1, "--hidden", 30], "multiple of 8"),
        (["--layers", 1, "--vision", ws["lm"]], "--vision does not go with --from-teacher"),
    ]
    for args, message in cases:
        assert init(DEMO_TEACHER, tmp_path / "s", "--pool-size", 4, *args) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar, when the teacher loaded
        assert message in last and last.startswith("emkd init-student: error: "), last
    # an LLM numbered differently from the teacher's vocabulary
    assert init(DEMO_TEACHER, tmp_path / "s", "--pool-size", 4, "--llm", ws["lm"]) == 2
    assert "number their vocabularies differently" in capsys.readouterr().err
    # a teacher whose tower is not a square-grid ViT
    qwen = build_workspace(tmp_path / "q", num_samples=1, teacher_kind="qwen2_vl")["teacher"]
    assert init(qwen, tmp_path / "s", "--layers", 1) == 2
    assert "Qwen2VLForConditionalGeneration; --from-teacher takes" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_tokenizer_without_the_image_token_is_refused(ws, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(ws["teacher"], teacher)  # LLaVA marks images with config.image_token_id, not by the token
    data = json.loads((teacher / "tokenizer.json").read_text())
    for added in data["added_tokens"]:
        if added["content"] == "<image>":
            added["content"] = "<img>"
    vocab = data["model"]["vocab"]
    vocab["<img>"] = vocab.pop("<image>")
    (teacher / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = ["<img>" if t == "<image>" else t for t in config["extra_special_tokens"]]
    (teacher / "tokenizer_config.json").write_text(json.dumps(config))
    assert init(teacher, tmp_path / "s", "--pool-size", 2, "--layers", 1) == 2
    assert "has no '<image>' token" in capsys.readouterr().err


# ---- the tokenizer identity check -----------------------------------------------------------------------------------
def test_refusal_names_both_tokenizer_classes_and_pre_tokenizers():
    teacher = build_tokenizer(["the 3rd shape is 12 px wide; it is a dark-blue triangle"] * 4, vocab_size=320)
    backend = Tokenizer.from_str(teacher.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    student = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    student.chat_template = teacher.chat_template
    with pytest.raises(ValueError) as e:
        check_same_tokenization(student, teacher)
    message = str(e.value)
    assert "ids differ from position" in message
    assert f"the student's is {type(student).__name__} with pre-tokenizer Sequence(" in message
    assert f"the teacher's is {type(teacher).__name__} with pre-tokenizer ByteLevel(" in message
    assert "Digits(" in message and "config.json" in message
    check_same_tokenization(teacher, teacher)  # the same tokenizer passes


# ---- emkd irs -------------------------------------------------------------------------------------------------------
def test_irs_prints_near_equal_and_tiny_scores_apart():
    result = {"scores": [0.12345671, 0.12345678, 2e-6], "best_layer": 1, "num_pairs": 4, "num_samples": 8}
    line = irs_summary(result)
    assert "best layer 1 of 3 (IRS 0.1234568; next: layer 0, IRS 0.1234567)" in line
    assert format_scores([2e-6, 0.5], [0]) == ["2e-06"]  # never "0.0000"
    assert irs_summary({"scores": [0.25], "best_layer": 0, "num_pairs": 1, "num_samples": 2}).endswith("(IRS 0.25)")

"""Issue-level invariant: a student and every supported teacher load from disk, render the same LLaVA-format
samples with different vision token counts and identical text, and feed EMKDLoss."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from emkd import EMKDLoss
from emkd.data import PairCollator, PairDataset
from emkd.models import (
    EfficientMLLMAdapter,
    build_tokenizer,
    check_same_tokenization,
    load_student,
    load_teacher,
    save_tiny_teacher,
)
from emkd.models.tiny import save_tiny_student

CORPUS = [
    "what colour is the shape in the picture?",
    "the shape is a red circle on a white background",
    "how many dots are there? there are three dots",
    "describe the image briefly.",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    save_tiny_student(root / "student", tokenizer, seed=0)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i, size in enumerate([(40, 56), (48, 48), (64, 30)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    records = [
        {"id": "a", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "how many dots are there?"},
            {"from": "gpt", "value": "three"}]},
        {"id": "b", "image": "1.png", "conversations": [
            {"from": "human", "value": "describe the image briefly.<image>"},
            {"from": "gpt", "value": "a red circle on a white background"}]},
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root, tokenizer


@pytest.mark.parametrize("kind", ["student", "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_student_and_teacher_render_same_text_and_feed_emkd(workspace, kind):
    root, tokenizer = workspace
    teacher_dir = root / f"teacher_{kind}"
    if not teacher_dir.exists():
        if kind == "student":  # the project's own class as a vanilla teacher: every patch token, larger LLM
            save_tiny_student(teacher_dir, tokenizer, seed=1, compressor="none", text_hidden=48)
        else:
            save_tiny_teacher(kind, teacher_dir, tokenizer, seed=1)
    student_model, student_side = load_student(root / "student")
    student = EfficientMLLMAdapter(student_model, student_side)
    teacher = load_teacher(teacher_dir)
    check_same_tokenization(student_side.tokenizer, teacher.side.tokenizer)
    assert all(not p.requires_grad for p in teacher.model.parameters())

    data = PairDataset(root / "train.json", root / "images", student_side, teacher.side, template="chat", max_length=1024)
    batch = PairCollator(student_side, teacher.side)([data[0], data[1]])
    s_ids, t_ids = batch["student"]["input_ids"], batch["teacher"]["input_ids"]
    for b in range(2):
        s_real = s_ids[b][batch["student"]["attention_mask"][b].bool()]
        t_real = t_ids[b][batch["teacher"]["attention_mask"][b].bool()]
        s_img = s_real == student_side.image_token_id
        t_img = t_real == teacher.side.image_token_id
        assert torch.equal(s_real[~s_img], t_real[~t_img]), f"sample {b}: text tokens differ"
        assert int(s_img.sum()) < int(t_img.sum()), f"sample {b}: the teacher must see more vision tokens"

    with torch.no_grad():
        t_out = teacher(batch["teacher"])
    s_out = student(batch["student"])
    assert int(s_out.inputs.vision_mask.sum()) == int((s_ids == student_side.image_token_id).sum())
    assert int(t_out.inputs.vision_mask.sum()) == int((t_ids == teacher.side.image_token_id).sum())
    out = EMKDLoss()(s_out.inputs, t_out.inputs)
    assert torch.isfinite(out.loss)
    assert all(float(getattr(out, k).detach()) > 0 for k in ("sup", "rld", "vsd", "vlad"))
    for (idx_s, idx_t), b in zip(out.matches, range(2)):
        assert idx_s.numel() == int(s_out.inputs.vision_mask[b].sum())  # every student token is matched
        assert idx_t.unique().numel() == idx_t.numel()
    out.loss.backward()
    assert student_model.projector is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_model.projector.parameters())
    assert all(p.grad is None for p in teacher.model.parameters())

"""The data pipeline: reading, validation, rendering for a student/teacher pair, collation and `emkd data check`."""

from __future__ import annotations

import os
import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

import emkd
from emkd.data import (
    PairCollator,
    PairDataset,
    SampleError,
    add_check_arguments,
    check_file,
    read_records,
    render_pair,
    render_side,
    render_text,
    run_check,
    validate_record,
)
from emkd.data.records import Part, Record, Source, Turn, load_images
from emkd.inputs import IGNORE_INDEX
from emkd.models import VisionSide, build_tokenizer

CORPUS = [
    "Describe the image. A red square on a white background.",
    "What colour is the shape? It is blue. How big is it? It is small.",
    "You are a helpful assistant. Give a brief description of the image.",
    "The cat sat on the mat. Two circles and one triangle.",
]


class FakeSide(VisionSide):
    """A vision side with a fixed number of image tokens per image and 16x16 pixel tensors."""

    def __init__(self, tokenizer, image_token: str, tokens_per_image: int, image_wrapper=("", "")):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_wrapper = image_wrapper
        self.tokens_per_image = tokens_per_image

    def image_inputs(self, images):
        arrays = [np.asarray(im.resize((16, 16)), dtype=np.float32) / 255 for im in images]  # (16, 16, 3) each
        pixels = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
        return {"pixel_values": torch.stack(pixels)}  # (n, 3, 16, 16)

    def num_image_tokens(self, image_inputs, index):
        assert index < image_inputs["pixel_values"].shape[0]
        return self.tokens_per_image

    def collate_image_inputs(self, items):
        pixels = [it["pixel_values"] for it in items if it]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def sides(tok):
    student = FakeSide(tok, "<image>", 4)
    teacher = FakeSide(tok, "<image>", 16)
    qwen = FakeSide(tok, "<|image_pad|>", 16, ("<|vision_start|>", "<|vision_end|>"))
    return student, teacher, qwen


@pytest.fixture()
def images_dir(tmp_path):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 12), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(d / "sub" / "blue.png")
    Image.new("L", (10, 10), 128).save(d / "gray.png")
    (d / "broken.png").write_bytes(b"this is not a png file")
    return d


def write_jsonl(path, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def llava(rid, turns, image=None, images=None):
    rec = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        rec["image"] = image
    if images is not None:
        rec["images"] = images
    return rec


MULTI_TURN = llava(
    "multi",
    [
        ("system", "You are a helpful assistant."),
        ("human", "<image>\nWhat colour is the shape?"),
        ("gpt", "It is red."),
        ("human", "And this one? <image>"),
        ("gpt", "It is blue. It is small."),
    ],
    images=["red.png", "sub/blue.png"],
)
CAPTION = llava(
    "cap", [("human", "Give a brief description of the image.\n<image>"), ("gpt", "A red square.")], image="red.png"
)
TEXT_ONLY = llava("text", [("human", "How big is it?"), ("gpt", "It is small.")])


def one_record(tmp_path, rec, name="one.jsonl"):
    items = list(read_records(write_jsonl(tmp_path / name, [rec])))
    assert len(items) == 1 and isinstance(items[0], Record), items
    return items[0]


def runs(ids, mask):
    """Contiguous runs of ``ids`` where ``mask`` is True, as lists."""
    out, cur = [], []
    for i, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


# ---- reading ---------------------------------------------------------------------------------------------------------
def test_json_list_and_jsonl_give_the_same_records(tmp_path):
    rows = [MULTI_TURN, CAPTION, TEXT_ONLY]
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    from_list = list(read_records(tmp_path / "d.json"))
    from_lines = list(read_records(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert [r.messages for r in from_list] == [r.messages for r in from_lines]
    assert [r.image_paths for r in from_list] == [("red.png", "sub/blue.png"), ("red.png",), ()]
    assert [(r.source.index, r.source.line) for r in from_list] == [(0, None), (1, None), (2, None)]
    assert [r.source.line for r in from_lines] == [1, 2, 3]
    assert from_list[0].messages[1] == Turn("user", (Part("image"), Part("text", "\nWhat colour is the shape?")))
    assert from_list[0].messages[3].text == "And this one? <image>"  # the marker is not moved, nothing is stripped


def test_hf_messages_format_is_the_same_record_as_llava(tmp_path, sides, images_dir):
    hf = {
        "id": "multi",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat colour is the shape?"}]},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": "And this one? <image>"},
            {"role": "assistant", "content": [{"type": "text", "text": "It is blue. It is small."}]},
        ],
        "images": ["red.png", "sub/blue.png"],
    }
    a, b = one_record(tmp_path, MULTI_TURN, "a.jsonl"), one_record(tmp_path, hf, "b.jsonl")
    assert a.messages == b.messages and a.image_paths == b.image_paths
    student, _, qwen = sides
    ra = render_pair(a, load_images(a, images_dir), student, qwen)
    rb = render_pair(b, load_images(b, images_dir), student, qwen)
    for x, y in zip(ra, rb):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


# ---- rendering -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_kind", ["plain", "qwen"])
@pytest.mark.parametrize("rec", [MULTI_TURN, CAPTION, TEXT_ONLY], ids=["multi", "caption", "text"])
def test_pair_text_tokens_identical_image_counts_differ(tmp_path, tok, sides, images_dir, teacher_kind, rec):
    student, teacher, qwen = sides
    teacher = qwen if teacher_kind == "qwen" else teacher
    record = one_record(tmp_path, rec)
    s, t = render_pair(record, load_images(record, images_dir), student, teacher)
    s_vis, t_vis = s["input_ids"] == student.image_token_id, t["input_ids"] == teacher.image_token_id
    n_images = len(record.image_paths)
    assert int(s_vis.sum()) == 4 * n_images and int(t_vis.sum()) == 16 * n_images
    assert torch.equal(s["input_ids"][~s_vis], t["input_ids"][~t_vis])  # same text ids, same order
    assert torch.equal(s["labels"][~s_vis], t["labels"][~t_vis])
    assert torch.equal(s["instruction_mask"][~s_vis], t["instruction_mask"][~t_vis])
    assert not (s["labels"][s_vis] != IGNORE_INDEX).any() and not s["instruction_mask"][s_vis].any()
    for side in (s, t):
        assert side["input_ids"].dtype == torch.long and side["attention_mask"].sum() == side["input_ids"].numel()
    if n_images:
        assert s["image_inputs"]["pixel_values"].shape == (n_images, 3, 16, 16)
        if teacher_kind == "qwen":  # the teacher's wrapper is used on both sides
            start = tok.convert_tokens_to_ids("<|vision_start|>")
            assert int((s["input_ids"] == start).sum()) == n_images == int((t["input_ids"] == start).sum())
    else:
        assert s["image_inputs"] == {} and t["image_inputs"] == {}


def test_labels_supervise_exactly_the_assistant_turns(tmp_path, tok, sides, images_dir):
    student, _, qwen = sides
    record = one_record(tmp_path, MULTI_TURN)
    s, t = render_pair(record, load_images(record, images_dir), student, qwen)
    for side in (s, t):
        supervised = runs(side["input_ids"], side["labels"] != IGNORE_INDEX)
        assert [tok.decode(r) for r in supervised] == ["It is red.<|im_end|>", "It is blue. It is small.<|im_end|>"]
        sup = side["labels"] != IGNORE_INDEX
        assert torch.equal(side["labels"][sup], side["input_ids"][sup])
        instruction = runs(side["input_ids"], side["instruction_mask"])
        assert [tok.decode(r) for r in instruction] == ["\nWhat colour is the shape?", "And this one? "]
    # the system prompt and role headers are present but neither supervised nor instruction
    text = tok.decode(t["input_ids"])
    header = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
    assert text.startswith(header)


def test_chat_tokens_equal_whole_string_tokenization(tmp_path, tok, sides, images_dir):
    """Piecewise tokenization at content boundaries gives the ids of tokenizing the whole rendered conversation."""
    student = sides[0]
    for rec in (TEXT_ONLY, MULTI_TURN):
        record = one_record(tmp_path, rec)
        messages = [{"role": m.role, "content": m.text} for m in record.messages]
        whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        out = render_side(record, load_images(record, images_dir), student, image_wrapper=("", ""))
        image = student.image_token_id
        assert [i for i in out["input_ids"].tolist() if i != image] == [i for i in whole if i != image]


def test_plain_template_is_image_caption_eos(tmp_path, tok, sides, images_dir):
    student, _, qwen = sides
    record = one_record(tmp_path, CAPTION)
    rendered = render_text(record, tok, "plain")
    assert rendered.text == "<image>A red square." + tok.eos_token  # the human text is dropped
    s, t = render_pair(record, load_images(record, images_dir), student, qwen, template="plain")
    expected = "<|vision_start|>" + "<|image_pad|>" * 16 + "<|vision_end|>A red square.<|im_end|>"
    assert tok.decode(t["input_ids"]) == expected
    for side in (s, t):
        supervised = runs(side["input_ids"], side["labels"] != IGNORE_INDEX)
        assert [tok.decode(r) for r in supervised] == ["A red square.<|im_end|>"]
        assert not side["instruction_mask"].any()
    bad = validate_record(one_record(tmp_path, MULTI_TURN), images_dir, template="plain")
    assert [p.kind for p in bad] == ["template"]


def test_truncation_cuts_the_response_only_and_equally(tmp_path, tok, sides, images_dir):
    student, _, qwen = sides
    record = one_record(tmp_path, CAPTION)
    images = load_images(record, images_dir)
    s_full, t_full = render_pair(record, images, student, qwen)
    first = int((t_full["labels"] != IGNORE_INDEX).nonzero()[0])
    max_length = first + 2  # the prompt, the images and two response tokens
    s, t = render_pair(record, images, student, qwen, max_length=max_length)
    assert t["input_ids"].numel() == max_length
    assert s["input_ids"].numel() == max_length - 12  # 16 - 4 image tokens fewer
    assert torch.equal(t["input_ids"], t_full["input_ids"][:max_length])
    assert int((t["labels"] != IGNORE_INDEX).sum()) == 2 == int((s["labels"] != IGNORE_INDEX).sum())
    with pytest.raises(SampleError) as err:
        render_pair(record, images, student, qwen, max_length=first)  # no response token fits
    assert err.value.kind == "too_long"
    # an image in a later turn may not be cut: the sample is bad even though the first response fits
    multi = one_record(tmp_path, MULTI_TURN)
    _, t_multi = render_pair(multi, load_images(multi, images_dir), student, qwen)
    last_image = int((t_multi["input_ids"] == qwen.image_token_id).nonzero()[-1])
    with pytest.raises(SampleError, match="too_long|max_length"):
        render_pair(multi, load_images(multi, images_dir), student, qwen, max_length=last_image)


def test_render_refuses_what_it_cannot_label(tmp_path, tok, sides, images_dir):
    student, _, qwen = sides
    # text that tokenizes to the teacher's image token
    rec = one_record(tmp_path, llava("pad", [("human", "say <|image_pad|>"), ("gpt", "no")]))
    with pytest.raises(SampleError) as err:
        render_pair(rec, [], student, qwen)
    assert err.value.kind == "image_token_in_text"
    # a chat template that strips contents would misplace labels
    stripping = build_tokenizer(CORPUS)
    template = stripping.chat_template
    stripping.chat_template = template.replace("{{ message['content'] }}", "{{ message['content'] | trim }}")
    spaced = one_record(tmp_path, llava("sp", [("human", "hi "), ("gpt", " there")]))
    with pytest.raises(SampleError) as err:
        render_text(spaced, stripping)
    assert err.value.kind == "template"
    # student and teacher tokenizers that disagree break the pair invariant: a configuration bug, not a sample's
    other = FakeSide(build_tokenizer(["completely different words here"]), "<image>", 4)
    with pytest.raises(ValueError, match="text tokens differ"):
        render_pair(one_record(tmp_path, TEXT_ONLY), [], other, qwen)


# ---- batches ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def good_file(tmp_path):
    hf = {
        "id": "hf",
        "messages": [
            {"role": "user", "content": "<image>What is it?"},
            {"role": "assistant", "content": "A gray square."},
        ],
        "images": ["gray.png"],
    }
    return write_jsonl(tmp_path / "good.jsonl", [MULTI_TURN, CAPTION, TEXT_ONLY, hf])


def test_collator_pads_each_side(good_file, tok, sides, images_dir):
    student, _, qwen = sides
    ds = PairDataset(good_file, images_dir, student, qwen, max_length=256)
    items = [ds[i] for i in range(len(ds))]
    batch = PairCollator(student, qwen, tok.pad_token_id)(items)
    assert set(batch) == {"student", "teacher"}
    for name in ("student", "teacher"):
        side = batch[name]
        lengths = [it[name]["input_ids"].numel() for it in items]
        B, L = len(items), max(lengths)
        assert {k: tuple(v.shape) for k, v in side.items()} == {
            "input_ids": (B, L), "attention_mask": (B, L), "labels": (B, L), "instruction_mask": (B, L),
            "pixel_values": (4, 3, 16, 16),  # 2 + 1 + 0 + 1 images
        }
        assert side["attention_mask"].sum(1).tolist() == lengths
        pad = side["attention_mask"] == 0
        assert (side["input_ids"][pad] == tok.pad_token_id).all() and (side["labels"][pad] == IGNORE_INDEX).all()
        assert not side["instruction_mask"][pad].any() and side["instruction_mask"].dtype == torch.bool
        for b, it in enumerate(items):
            assert torch.equal(side["input_ids"][b, : lengths[b]], it[name]["input_ids"])
    assert batch["teacher"]["input_ids"].shape[1] > batch["student"]["input_ids"].shape[1]


def test_collated_batch_feeds_the_emkd_loss(good_file, tok, sides, images_dir):
    student, _, qwen = sides
    ds = PairDataset(good_file, images_dir, student, qwen)
    batch = PairCollator(student, qwen, tok.pad_token_id)([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    V = len(tok)
    built = {}
    for name, side, D in (("student", student, 8), ("teacher", qwen, 12)):
        b = batch[name]
        B, L = b["input_ids"].shape
        built[name] = emkd.DistillInputs(
            hidden=torch.randn(B, L, D, requires_grad=name == "student"),
            head_weight=torch.randn(V, D),
            vision_mask=b["input_ids"] == side.image_token_id,
            attention_mask=b["attention_mask"],
            labels=b["labels"],
            instruction_mask=b["instruction_mask"],
        )
    out = emkd.EMKDLoss()(built["student"], built["teacher"])
    assert torch.isfinite(out.loss) and out.vsd > 0 and out.vlad > 0
    assert [len(idx_s) for idx_s, _ in out.matches] == [8, 4, 0, 4]  # min(4, 16) per image
    out.loss.backward()


# ---- validation and `emkd data check` --------------------------------------------------------------------------------
LONG_PROMPT = "Describe the image in great detail, every shape, every colour, and the cat on the mat. " * 4
BROKEN = [
    llava("ok1", [("human", "<image>\nDescribe the image."), ("gpt", "A red square.")], image="red.png"),  # 1
    llava("missing", [("human", "<image>Describe."), ("gpt", "Blue.")], image="nowhere.png"),  # 2
    llava("unreadable", [("human", "<image>Describe."), ("gpt", "Blue.")], image="broken.png"),  # 3
    llava("count", [("human", "<image> and <image>"), ("gpt", "Two.")], image="red.png"),  # 4
    llava("noanswer", [("human", "<image>Describe.")], image="red.png"),  # 5
    llava("twousers", [("human", "Hi."), ("human", "<image>Describe."), ("gpt", "Red.")], image="red.png"),  # 6
    llava("asstfirst", [("system", "Be brief."), ("gpt", "Hello."), ("human", "Hi."), ("gpt", "Red.")]),  # 7
    llava("long", [("human", "<image>" + LONG_PROMPT), ("gpt", "Red.")], image="red.png"),  # 8
    '{"id": "json", "conversations": [',  # 9
    TEXT_ONLY,  # 10
    "",  # 11: blank lines are not records
    {  # 12
        "id": "hf",
        "messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "Gray."}],
        "images": ["gray.png"],
    },
]
EXPECTED = {  # line -> the one problem kind reported
    2: "missing_image", 3: "unreadable_image", 4: "image_count", 5: "no_assistant",
    6: "roles", 7: "roles", 8: "too_long", 9: "malformed_json",
}  # fmt: skip
MAX_LENGTH = 96


def test_check_reports_every_bad_record_with_its_line(tmp_path, sides, images_dir):
    path = write_jsonl(tmp_path / "broken.jsonl", BROKEN)
    student, _, qwen = sides
    report = check_file(path, images_dir, student, qwen, max_length=MAX_LENGTH)
    assert {bad.source.line: bad.kinds for bad in report.bad} == {line: [kind] for line, kind in EXPECTED.items()}
    assert [r.id for r in report.records] == ["ok1", "text", "hf"] and report.num_records == 11
    by_line = {bad.source.line: bad for bad in report.bad}
    assert by_line[2].record_id == "missing" and "nowhere.png" in str(by_line[2])
    assert str(by_line[8]).startswith(f"{path}:8 (id 'long'): [too_long]")
    text = report.format()
    for line in EXPECTED:
        assert f"{path}:{line} " in text
    assert f"{path}:1 " not in text and "11 records, 8 bad" in text
    # without sides the structural rules still apply; the length rule needs the sides
    structural = check_file(path, images_dir)
    assert {bad.source.line for bad in structural.bad} == set(EXPECTED) - {8}
    with pytest.raises(ValueError, match="max_length needs"):
        check_file(path, images_dir, max_length=MAX_LENGTH)


def test_check_reads_json_lists_by_index(tmp_path, images_dir):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([CAPTION, BROKEN[1], {"conversations": "nope"}]))
    report = check_file(path, images_dir)
    assert [(b.source.index, b.kinds) for b in report.bad] == [(1, ["missing_image"]), (2, ["malformed_record"])]
    assert str(report.bad[0]).startswith(f"{path}[1] (id 'missing')")
    path.write_text('[{"id": 1},\n  {"id": 2,,}]')
    (bad,) = check_file(path, images_dir).bad
    assert bad.kinds == ["malformed_json"] and bad.source.line == 2


def test_structural_rules(tmp_path, images_dir):
    rows = [
        llava("sys-mid", [("human", "Hi."), ("system", "Be brief."), ("gpt", "Red.")]),
        llava("img-answer", [("human", "Draw."), ("gpt", "<image>")], image="red.png"),
        llava("unanswered", [("human", "Hi."), ("gpt", "Hello."), ("human", "Bye.")]),
        llava("bot", [("human", "Hi."), ("bot", "Hello.")]),
        {"id": "part", "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        {"id": "both", "conversations": [], "messages": []},
        {"id": "vid", "video": "a.mp4", "conversations": [{"from": "human", "value": "<video>"}]},
        [1, 2],
        llava("two-keys", [("human", "<image>"), ("gpt", "Red.")], image="red.png", images=["red.png"]),
    ]
    report = check_file(write_jsonl(tmp_path / "s.jsonl", rows), images_dir)
    assert [b.kinds for b in report.bad] == [["roles"], ["image_in_response"], ["roles"]] + [["malformed_record"]] * 6
    assert "only the first turn may be system" in str(report.bad[0]) and "no answer" in str(report.bad[2])
    assert not report.records


def test_run_check_exit_codes(tmp_path, tok, images_dir, capsys):
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    tok.save_pretrained(tmp_path / "tok")
    broken = write_jsonl(tmp_path / "broken.jsonl", BROKEN)
    good = write_jsonl(tmp_path / "good.jsonl", [BROKEN[0], TEXT_ONLY])
    length = ["--max-length", str(MAX_LENGTH), "--tokenizer", str(tmp_path / "tok"), "--image-tokens", "16",
              "--image-wrapper", "<|vision_start|>", "<|vision_end|>"]  # fmt: skip
    assert run_check(parser.parse_args([str(broken), "--images", str(images_dir), *length])) == 1
    out = capsys.readouterr().out
    assert f"{broken}:8 (id 'long'): [too_long]" in out and "11 records, 8 bad" in out
    assert run_check(parser.parse_args([str(good), "--images", str(images_dir), *length])) == 0
    assert run_check(parser.parse_args([str(good), "--images", str(images_dir), "--max-length", "9"])) == 2


def test_pair_dataset_skip_and_error(tmp_path, sides, images_dir):
    path = write_jsonl(tmp_path / "broken.jsonl", BROKEN)
    student, _, qwen = sides
    ds = PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH, on_bad_sample="skip")
    assert len(ds) == 3 and len(ds.skipped) == len(EXPECTED)
    assert [b.source.line for b in ds.skipped] == sorted(EXPECTED) and ds.skipped[0].kinds == ["missing_image"]
    assert ds[0]["id"] == "ok1" and ds[0]["teacher"]["input_ids"].numel() <= MAX_LENGTH
    with pytest.raises(ValueError, match=f"{path}:2 \\(id 'missing'\\)") as err:
        PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH)
    assert "8 of 11 records" in str(err.value)
    with pytest.raises(ValueError, match="on_bad_sample"):
        PairDataset(path, images_dir, student, qwen, on_bad_sample="ignore")


def test_source_formats():
    assert str(Source("a.jsonl", line=3)) == "a.jsonl:3" and str(Source("a.json", index=0)) == "a.json[0]"


def test_pair_dataset_reuses_its_scan_until_the_file_changes(tmp_path, sides, images_dir, monkeypatch):
    import emkd.data.dataset as dataset

    monkeypatch.setenv("EMKD_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "broken.jsonl", BROKEN)
    student, _, qwen = sides
    first = PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH, on_bad_sample="skip")
    calls = []
    real_scan = dataset.scan_file
    monkeypatch.setattr(dataset, "scan_file", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    again = PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH, on_bad_sample="skip")
    assert calls == []  # the second run read the cache
    assert [r.id for r in again.records] == [r.id for r in first.records]
    assert [(b.source, b.record_id, b.problems) for b in again.skipped] == [
        (b.source, b.record_id, b.problems) for b in first.skipped]
    with pytest.raises(ValueError, match=f"{path}:2 \\(id 'missing'\\)"):  # cached bad records still stop "error"
        PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH)
    # another max_length, or an edited file, is a new scan
    PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH + 1, on_bad_sample="skip")
    assert len(calls) == 1
    write_jsonl(path, BROKEN[:5])
    os.utime(path, ns=(1, 1))
    PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH, on_bad_sample="skip")
    assert len(calls) == 2
    monkeypatch.setenv("EMKD_CACHE", "0")
    PairDataset(path, images_dir, student, qwen, max_length=MAX_LENGTH, on_bad_sample="skip")
    assert len(calls) == 3


def test_check_says_once_that_the_images_folder_is_probably_wrong(tmp_path, images_dir, capsys):
    """The images are in images_dir but no --images is given: every record's image is looked for beside the file."""
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    path = write_jsonl(tmp_path / "data.jsonl", [CAPTION, MULTI_TURN, CAPTION, TEXT_ONLY])
    assert run_check(parser.parse_args([str(path)])) == 1
    out = capsys.readouterr().out
    hints = [line for line in out.splitlines() if line.startswith("hint:")]
    assert hints == [f"hint: 3 of 4 records have missing images, looked for in {tmp_path}; the images folder is "
                     "probably wrong: pass --images DIR (the folder the records' image paths start from)"]
    assert run_check(parser.parse_args([str(path), "--images", str(images_dir)])) == 0
    assert "hint:" not in capsys.readouterr().out
    # one missing image among several records is a bad record, not a wrong folder
    absent = llava("x", [("human", "<image>"), ("gpt", "A square.")], image="absent.png")
    some = write_jsonl(tmp_path / "some.jsonl", [CAPTION, absent, TEXT_ONLY])
    assert check_file(some, images_dir).images_dir_hint is None

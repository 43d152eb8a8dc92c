"""The demo's data: deterministic, valid for the data pipeline, balanced, cached, and fine-grained where it says so.

The pooling tests are the point of the suite: for each fine-grained family, a meaningful fraction of samples has a
twin with another answer whose pooled view (what a 2 x 2-pooled token of a linear patch embedding sees) is the same,
while the full-resolution images, which the teacher sees, differ.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emkd.data.check import check_file
from emkd.demo.datasets import (
    FAMILIES,
    FAMILY_GROUPS,
    _rng,
    build_demo_data,
    caption_record,
    convert_easy_vqa,
    make_chart,
    make_counting,
    make_family,
    make_grid,
    make_ocr,
    pooled_view,
    sample_key,
)

SMALL = dict(easy_vqa_train=40, easy_vqa_test=12, per_family_train=24, per_family_test=12)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0, **SMALL)


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---- the built data set ---------------------------------------------------------------------------------------------
def test_build_is_deterministic(built, tmp_path):
    again = build_demo_data(tmp_path / "again", seed=0, **SMALL)
    for key in ("train", "test", "captions"):
        assert again[key].read_bytes() == built[key].read_bytes(), key
    names = sorted(p.relative_to(built["images"]) for p in built["images"].rglob("*.png"))
    assert names == sorted(p.relative_to(again["images"]) for p in again["images"].rglob("*.png"))
    for name in names:
        assert np.array_equal(_pixels(built["images"] / name), _pixels(again["images"] / name)), name

    other = build_demo_data(tmp_path / "other", seed=1, **SMALL)
    assert other["train"].read_bytes() != built["train"].read_bytes()


@pytest.mark.parametrize("key, template", [("train", "chat"), ("test", "chat"), ("captions", "plain")])
def test_records_pass_the_data_check(built, key, template):
    report = check_file(built[key], built["images"], template=template)
    assert report.bad == [], report.format(limit=5)
    assert report.num_records == len(_records(built[key]))


def test_contents_and_sizes(built):
    train, test = _records(built["train"]), _records(built["test"])
    assert Counter(r["category"] for r in train) == {"general": 40, **{f: 24 for f in FAMILIES}}
    assert Counter(r["category"] for r in test) == {"general": 12, **{f: 12 for f in FAMILIES}}
    assert set(FAMILY_GROUPS) == {"general", *FAMILIES}
    assert len({r["id"] for r in train + test}) == len(train) + len(test)
    for r in train + test:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"] and " " not in gpt["value"]  # one short word or number
        assert _pixels(built["images"] / r["image"]).shape == (64, 64, 3)


def test_test_split_is_held_out(built):
    train, test = _records(built["train"]), _records(built["test"])
    seen = {sample_key(r["category"], r["meta"]) for r in train if r["category"] in FAMILIES}
    assert not any(sample_key(r["category"], r["meta"]) in seen for r in test if r["category"] in FAMILIES)
    assert all(r["image"].startswith("easyvqa_test/") for r in test if r["category"] == "general")
    assert not {r["image"] for r in train} & {r["image"] for r in test}


def test_captions_cover_every_train_image_once(built):
    captions = _records(built["captions"])
    assert Counter(c["image"] for c in captions) == Counter({r["image"]: 1 for r in _records(built["train"])})
    for c in captions:
        assert [t["value"] for t in c["conversations"][:1]] == ["<image>"]
        assert c["conversations"][1]["value"]


def test_meta_redraws_every_saved_image(built):
    for r in _records(built["train"]) + _records(built["test"]):
        if r["category"] in FAMILIES:
            family = FAMILIES[r["category"]]
            assert np.array_equal(family.render(r["meta"]), _pixels(built["images"] / r["image"])), r["id"]
            assert r["conversations"][1]["value"] == family.answer(r["meta"])


def test_build_is_cached_and_rebuilds_on_new_arguments(tmp_path):
    paths = build_demo_data(tmp_path, seed=0, **SMALL)
    stamps = {k: paths[k].stat().st_mtime_ns for k in ("train", "test", "captions", "manifest")}
    assert build_demo_data(tmp_path, seed=0, **SMALL) == paths
    assert {k: paths[k].stat().st_mtime_ns for k in stamps} == stamps

    smaller = {**SMALL, "per_family_train": 12}
    build_demo_data(tmp_path, seed=0, **smaller)
    assert Counter(r["category"] for r in _records(paths["train"]))["grid"] == 12
    assert len(list((paths["images"] / "grid_train").glob("*.png"))) == 12  # the old images are gone
    assert json.loads(paths["manifest"].read_text())["args"]["per_family_train"] == 12


# ---- the generators -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, name", [(make_counting, "counting"), (make_ocr, "ocr"), (make_grid, "grid"),
                                        (make_chart, "chart")])
def test_answers_are_balanced_and_phrasings_few(make, name, tmp_path):
    family = FAMILIES[name]
    assert len(family.answers) <= 12
    records = make(3 * len(family.answers), np.random.default_rng(0), tmp_path / name)
    assert Counter(r["conversations"][1]["value"] for r in records) == {a: 3 for a in family.answers}
    assert {r["category"] for r in records} == {name}
    questions = {r["conversations"][0]["value"] for r in records}
    assert len(questions) <= 8, questions


def test_make_family_is_deterministic_and_honours_exclude(tmp_path):
    a = make_family("grid", 18, np.random.default_rng(7), tmp_path / "a")
    b = make_family("grid", 18, np.random.default_rng(7), tmp_path / "b")
    assert [r["meta"] for r in a] == [r["meta"] for r in b]
    seen = {sample_key("grid", r["meta"]) for r in a}
    c = make_family("grid", 18, np.random.default_rng(7), tmp_path / "c", exclude=seen)
    assert not seen & {sample_key("grid", r["meta"]) for r in c}


def test_easy_vqa_spread_and_meta(tmp_path):
    records = convert_easy_vqa(tmp_path, "test", limit=1200, seed=0)  # 1,000 test images
    per_image = Counter(r["image"] for r in records)
    assert len(records) == 1200 and len(per_image) == 1000 and set(per_image.values()) == {1, 2}
    assert records == convert_easy_vqa(tmp_path, "test", limit=1200, seed=0)
    checked = 0
    for r in records:  # the captions' metadata agrees with easy-VQA's own answers
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if question.endswith(("what color is the shape?", "what is the color of the shape?")):
            assert r["meta"]["color"] == answer, r["id"]
            checked += 1
        if "what shape" in question:
            assert r["meta"]["shape"] == answer, r["id"]
            checked += 1
    assert checked > 50
    assert caption_record(records[0])["conversations"][1]["value"].startswith(f"a {records[0]['meta']['color']} ")


def test_caption_record_examples_and_errors():
    grid = {"orient": "h", "colors": ["red", "blue"]}
    assert caption_record({"id": "g", "image": "g.png", "category": "grid", "meta": grid})["conversations"] == [
        {"from": "human", "value": "<image>"},
        {"from": "gpt", "value": "a red square left of a blue square"},
    ]
    ocr = caption_record({"id": "o", "image": "o.png", "category": "ocr", "meta": {"number": "31"}})
    assert ocr["conversations"][1]["value"] == "the number 31"
    general = {"id": "e", "image": "e.png", "category": "general", "meta": {"color": "teal", "shape": None}}
    assert caption_record(general)["conversations"][1]["value"] == "a teal shape"
    with pytest.raises(ValueError, match="category 'video'.*expected 'general'"):
        caption_record({"id": "x", "image": "x.png", "category": "video", "meta": {}})
    with pytest.raises(ValueError, match="no 'meta'"):
        caption_record({"id": "x", "image": "x.png", "category": "grid"})


# ---- pooling: the point of the suite --------------------------------------------------------------------------------
def test_pooled_view_is_what_a_pooled_linear_token_sees():
    """Patch embedding (conv, stride 8) then 2 x 2 average pooling gives the same tokens for an image and its view."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (64, 64, 3), generator=g).numpy().astype(np.uint8)
    embed = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
    pos = torch.randn(1, 16, 8, 8, generator=g)  # position embeddings: the same mean for every 2 x 2 block

    def pooled_tokens(x: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(x)).float().permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, 64, 64)
        return F.avg_pool2d(embed(pixels) + pos, 2)  # (1, 16, 4, 4)

    with torch.no_grad():
        torch.testing.assert_close(pooled_tokens(pooled_view(image)), pooled_tokens(image), atol=1e-4, rtol=1e-4)
    assert not np.allclose(pooled_view(image), image)


@pytest.mark.parametrize("name, min_fraction", [("counting", 0.4), ("ocr", 0.4), ("grid", 0.4), ("chart", 0.5)])
def test_pooling_leaves_a_fraction_of_answers_ambiguous(name, min_fraction):
    family = FAMILIES[name]
    rng = _rng(123, name, "pooling-test")
    n, twins = 240, 0
    for i in range(n):
        meta = family.sample(rng, family.answers[i % len(family.answers)])
        twin = family.twin(meta)
        if twin is None:
            continue
        twins += 1
        image, other = family.render(meta), family.render(twin)
        assert family.answer(twin) != family.answer(meta) and family.answer(twin) in family.answers
        assert np.abs(pooled_view(image) - pooled_view(other)).max() <= 1.0, meta  # the student's view: the same
        assert np.abs(image.astype(int) - other.astype(int)).max() >= 50, meta  # the teacher's view: different
    assert twins / n >= min_fraction, f"{name}: only {twins}/{n} samples are ambiguous after pooling"


def _first_of_pair(name: str, meta: dict, twin: dict) -> tuple[str, bool]:
    """(question kind, whether the answer is the canonically first of the two candidates a pooled view leaves)."""
    family = FAMILIES[name]
    answer, other = family.answer(meta), family.answer(twin)
    if name == "grid":
        kind = f"{meta['orient']}{meta['ask']}"  # left, right, top, bottom
    elif name == "chart":
        kind = "tallest" if meta["ask"] == "tallest" else "value"
    else:
        kind = name
    return kind, answer < other


@pytest.mark.parametrize("name", ["ocr", "grid", "chart"])
def test_a_pooled_student_can_only_guess_on_twins(name):
    """No rule on the pooled view beats a coin flip on twins: the generator draws each twin as often as its original,
    so the answer is the smaller of the two candidates half the time, for every kind of question."""
    family = FAMILIES[name]
    rng = _rng(9, name, "coin")
    first: dict[str, list[bool]] = {}
    for i in range(1800):
        meta = family.sample(rng, family.answers[i % len(family.answers)])
        twin = family.twin(meta)
        if twin is not None:
            kind, is_first = _first_of_pair(name, meta, twin)
            first.setdefault(kind, []).append(is_first)
    for kind, flags in first.items():
        assert len(flags) > 150 and 0.4 <= np.mean(flags) <= 0.6, (kind, len(flags), np.mean(flags))


def test_a_pooled_student_cannot_count_dots_sharing_a_block():
    """The pooled view of a counting image shows which blocks hold ink, not how many dots share it; the best guess
    from the number of occupied blocks is right for about half of the images (the teacher sees every dot)."""
    family = FAMILIES["counting"]
    rng = _rng(9, "counting", "ceiling")
    joint = Counter()
    for i in range(3000):
        meta = family.sample(rng, family.answers[i % 6])
        blocks = len({(r // 2, c // 2) for r, c, _ in meta["dots"]})
        joint[(blocks, family.answer(meta))] += 1
    best = sum(max(v for (k, _), v in joint.items() if k == blocks) for blocks in {k for k, _ in joint})
    assert best / 3000 <= 0.6

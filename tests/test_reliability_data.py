"""Reliability of the data pipeline and the teacher cache: each test injects one fault and checks that emkd names it
(file, line or index, record id, reason), follows ``on_bad_sample`` where a record is at fault, and never trains on it
silently.

Faults: a byte that is not UTF-8 (JSONL and JSON list), a truncated data file, image paths that leave the image
folder, an image changed after the scan was cached, an image that disappears while training, empty answers, an empty
file; a cache shard or LM head corrupted at the same size, a truncated shard, a broken ``index.json``, shard names
with ``..`` or an absolute path, staging folders of a killed ``emkd cache-teacher``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from _workspace import build_workspace
from emkd.cli import main
from emkd.data import PairDataset, add_check_arguments, check_file, read_records, run_check
from emkd.data.records import BadRecord, Record, load_images
from emkd.errors import UserError
from emkd.models import VisionSide, build_tokenizer
from emkd.cache import INDEX_FILE, TeacherCache, cache_teacher

CORPUS = [
    "Describe the image. A red square on a white background.",
    "What colour is the shape? It is blue. How big is it? It is small.",
]


class FakeSide(VisionSide):
    """A fixed number of image tokens per image, 8x8 pixel tensors."""

    def __init__(self, tokenizer, tokens_per_image: int):
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        self.image_wrapper = ("", "")
        self.tokens_per_image = tokens_per_image

    def image_inputs(self, images):
        pixels = [torch.frombuffer(bytearray(im.resize((8, 8)).tobytes()), dtype=torch.uint8).float().reshape(8, 8, 3)
                  .permute(2, 0, 1) for im in images]
        return {"pixel_values": torch.stack(pixels)}  # (n, 3, 8, 8)

    def num_image_tokens(self, image_inputs, index):
        return self.tokens_per_image

    def collate_image_inputs(self, items):
        pixels = [it["pixel_values"] for it in items if it]
        return {"pixel_values": torch.cat(pixels)} if pixels else {}


@pytest.fixture(scope="module")
def sides():
    tok = build_tokenizer(CORPUS)
    return FakeSide(tok, 2), FakeSide(tok, 5)


@pytest.fixture()
def images_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (12, 12), (255, 0, 0)).save(d / "red.png")
    Image.new("RGB", (12, 12), (0, 0, 255)).save(d / "blue.png")
    return d


def record(rid, answer="It is red.", image="red.png", question="<image>What colour is the shape?"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


def write_lines(path, rows):
    """JSONL from dicts (``json.dumps``) and raw ``bytes`` lines."""
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def check_args(*argv):
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


# ---- bytes that are not UTF-8 ----------------------------------------------------------------------------------------
LATIN1 = json.dumps(record("latin", answer="It is rouge fonc\u00e9."), ensure_ascii=False).encode()
LATIN1 = LATIN1.replace("\u00e9".encode(), b"\xe9")  # the Latin-1 byte of the letter


def test_a_non_utf8_byte_in_jsonl_costs_its_record_only(tmp_path, sides, images_dir):
    separator = json.dumps(record("d", answer="Red.\u2028Square."), ensure_ascii=False).encode()  # valid UTF-8
    rows = [record("a"), LATIN1, record("c", image="blue.png", answer="Blue."), separator]
    path = write_lines(tmp_path / "d.jsonl", rows)
    items = list(read_records(path))
    assert [type(x) for x in items] == [Record, BadRecord, Record, Record]
    bad = items[1]
    assert bad.source.line == 2 and bad.kinds == ["encoding"] and bad.record_id == "latin"
    assert "byte 0xe9 at line 2, column" in str(bad) and "UTF-8" in str(bad)
    assert items[3].source.line == 4 and items[3].messages[1].text == "Red.\u2028Square."  # lines end at \n only
    data = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert [r.id for r in data.records] == ["a", "c", "d"] and [b.source.line for b in data.skipped] == [2]
    with pytest.raises(UserError, match=rf"{path}:2 \(id 'latin'\): \[encoding\] byte 0xe9"):
        PairDataset(path, images_dir, *sides)
    assert run_check(check_args(path, "--images", images_dir)) == 1


def test_a_non_utf8_byte_in_a_json_list_costs_its_record_only(tmp_path, sides, images_dir):
    rows = [record("a"), record("latin", answer="It is rouge fonc\u00e9."), record("c")]
    raw = json.dumps(rows, indent=1, ensure_ascii=False).encode().replace("\u00e9".encode(), b"\xe9")
    path = tmp_path / "d.json"
    path.write_bytes(raw)
    line = raw[: raw.index(b"\xe9")].count(b"\n") + 1
    items = list(read_records(path))
    assert [type(x) for x in items] == [Record, BadRecord, Record]
    assert items[1].source.index == 1 and items[1].kinds == ["encoding"] and items[1].record_id == "latin"
    assert f"byte 0xe9 at line {line}, column" in str(items[1])
    data = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert [r.id for r in data.records] == ["a", "c"] and [b.source.index for b in data.skipped] == [1]


def test_a_truncated_file_names_where_it_stops(tmp_path, sides, images_dir):
    """Already handled before this change (kept as a regression test): a JSONL file cut inside its last record
    loses that record only; a JSON list cut anywhere is one bad record at the line where the parser stopped."""
    rows = [record("a"), record("b"), record("c")]
    cut = write_lines(tmp_path / "cut.jsonl", rows).read_bytes()[:-20]
    (tmp_path / "cut.jsonl").write_bytes(cut)
    data = PairDataset(tmp_path / "cut.jsonl", images_dir, *sides, on_bad_sample="skip")
    assert [r.id for r in data.records] == ["a", "b"] and data.skipped[0].kinds == ["malformed_json"]
    assert data.skipped[0].source.line == 3
    listed = tmp_path / "cut.json"
    listed.write_text(json.dumps(rows, indent=1)[:-30])
    (bad,) = list(read_records(listed))
    assert bad.kinds == ["malformed_json"] and bad.source.line == listed.read_text().count("\n") + 1


# ---- image paths -----------------------------------------------------------------------------------------------------
def test_image_paths_outside_the_images_folder_are_refused(tmp_path, sides, images_dir):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (12, 12), (0, 255, 0)).save(secret)
    (images_dir / "sub").mkdir()
    rows = [record("up", image="../secret.png"), record("abs", image=str(secret)),
            record("inside", image="sub/../red.png")]
    path = write_lines(tmp_path / "d.jsonl", rows)
    report = check_file(path, images_dir)
    assert {b.record_id: b.kinds for b in report.bad} == {"up": ["image_outside"], "abs": ["image_outside"]}
    assert [r.id for r in report.records] == ["inside"]
    assert f"outside the images folder {images_dir}" in str(report.bad[0]) and "allow_outside_images" in str(
        report.bad[0])
    data = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert [r.id for r in data.records] == ["inside"]
    (up,) = [r for r in read_records(path) if r.id == "up"]
    with pytest.raises(UserError, match=rf"{path}:1 \(id 'up'\): \[image_outside\]"):
        load_images(up, images_dir)
    # the recipe's data.allow_outside_images: true (--allow-outside-images) reads them
    assert check_file(path, images_dir, allow_outside_images=True).ok
    assert len(PairDataset(path, images_dir, *sides, allow_outside_images=True)) == 3
    assert run_check(check_args(path, "--images", images_dir)) == 1
    assert run_check(check_args(path, "--images", images_dir, "--allow-outside-images")) == 0


# ---- images that change ----------------------------------------------------------------------------------------------
def test_the_scan_cache_notices_a_changed_image(tmp_path, sides, images_dir, monkeypatch):
    import emkd.data.dataset as dataset

    monkeypatch.setenv("EMKD_CACHE", str(tmp_path / "cache"))
    path = write_lines(tmp_path / "d.jsonl", [record("r"), record("b", image="blue.png", answer="Blue.")])
    assert len(PairDataset(path, images_dir, *sides, on_bad_sample="skip")) == 2
    calls = []
    real_scan = dataset.scan_file
    monkeypatch.setattr(dataset, "scan_file", lambda *a, **k: calls.append(1) or real_scan(*a, **k))
    assert len(PairDataset(path, images_dir, *sides, on_bad_sample="skip")) == 2 and calls == []  # cached
    # the image is replaced by one of the same size: a new scan
    stat = os.stat(images_dir / "blue.png")
    os.utime(images_dir / "blue.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert len(calls) == 1
    # the image is broken: the new scan finds it and skip drops it upfront (it used to crash mid-epoch)
    (images_dir / "blue.png").write_bytes(b"not an image any more")
    data = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert len(calls) == 2 and [r.id for r in data.records] == ["r"]
    assert data.skipped[0].kinds == ["unreadable_image"] and data.skipped[0].source.line == 2


def test_an_image_that_breaks_while_training_follows_on_bad_sample(tmp_path, sides, images_dir):
    rows = [record("r"), record("b", image="blue.png", answer="Blue."), record("t", image="red.png")]
    path = write_lines(tmp_path / "d.jsonl", rows)
    skip = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    error = PairDataset(path, images_dir, *sides, on_bad_sample="error")
    (images_dir / "blue.png").unlink()  # after the scan, as if removed mid-epoch
    with pytest.raises(UserError, match=rf"sample 1: {path}:2 \(id 'b'\): \[missing_image\] image 'blue.png'"):
        error[1]
    with pytest.warns(RuntimeWarning, match=rf"skipped sample 1, {path}:2 \(id 'b'\)"):
        item = skip[1]
    assert item["id"] == "t" and item["index"] == 2  # the next good sample, under its own index
    assert [b.source.line for b in skip.skipped] == [2] and skip.skipped[0].kinds == ["missing_image"]
    assert [skip[i]["index"] for i in range(len(skip))] == [0, 2, 2] and len(skip.skipped) == 1  # warned once


# ---- answers and files that are empty --------------------------------------------------------------------------------
def test_empty_answers_are_flagged(tmp_path, sides, images_dir):
    multi = {"id": "multi", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": " "},
        {"from": "human", "value": "Size?"}, {"from": "gpt", "value": "Small."}]}
    path = write_lines(tmp_path / "d.jsonl", [record("empty", answer=""), record("blank", answer=" \n\t"), multi,
                                              record("good")])
    report = check_file(path, images_dir)
    assert {b.record_id: b.kinds for b in report.bad} == {
        "empty": ["empty_response"], "blank": ["empty_response"], "multi": ["empty_response"]}
    assert "turn 1 (assistant) is empty" in str(report.bad[2])
    data = PairDataset(path, images_dir, *sides, on_bad_sample="skip")
    assert [r.id for r in data.records] == ["good"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b" [\n ]\n"], ids=["empty", "blank", "list", "list-ws"])
def test_an_empty_file_fails_the_check(tmp_path, sides, images_dir, content, capsys):
    path = tmp_path / ("d.json" if b"[" in content else "d.jsonl")
    path.write_bytes(content)
    assert run_check(check_args(path, "--images", images_dir)) == 1
    assert "0 records: the file is empty" in capsys.readouterr().out
    with pytest.raises(UserError, match="holds no records"):
        PairDataset(path, images_dir, *sides, on_bad_sample="skip")


# ---- data errors reach the command line as one line ------------------------------------------------------------------
def test_data_errors_are_user_errors(tmp_path, sides, images_dir, capsys):
    from emkd.data import SampleError
    from emkd.data.records import RecordError

    assert issubclass(RecordError, UserError) and issubclass(SampleError, UserError)
    path = write_lines(tmp_path / "d.jsonl", [record("missing", image="nowhere.png")])
    for policy in ("error", "skip"):
        with pytest.raises(UserError, match=rf"{path}:1 \(id 'missing'\): \[missing_image\]"):
            PairDataset(path, images_dir, *sides, on_bad_sample=policy)
    assert main(["data", "check", str(tmp_path / "nothing.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emkd data check: error: ") and "nothing.jsonl" in err and "\n" not in err


def test_training_on_a_bad_byte_is_one_line_and_exit_2(ws, tmp_path, capsys):
    path = write_lines(tmp_path / "train.jsonl", [json.loads(ws["train"].read_text())[0], LATIN1])
    overrides = [f"student={ws['student']}", f"data.train={path}", f"data.images={ws['images']}",
                 f"output_dir={tmp_path / 'out'}", "method=sft", "max_steps=1"]
    code = main(["train", *(arg for o in overrides for arg in ("--set", o))])
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("emkd train: error: ")]
    assert code == 2 and f"1 of 2 records of {path} are bad (encoding: 1; on_bad_sample='error')" in err
    assert f"the first: {path}:2 (id 'latin'): [encoding] byte 0xe9 at line 2" in err


# ---- the teacher cache -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    ws = build_workspace(root / "ws")
    ws["cache"] = root / "cache"
    ws["index"] = cache_teacher(ws["teacher"], ws["train"], ws["images"], ws["cache"], batch_size=2,
                                shard_bytes=8_000, progress=False)
    assert len(ws["index"]["shards"]) > 1
    return ws


@pytest.fixture()
def copy(ws, tmp_path):
    """A fresh copy of the cache, to damage."""
    out = tmp_path / "cache"
    shutil.copytree(ws["cache"], out)
    return out


def flip_last_bytes(path, n=8):
    """Change the last ``n`` bytes of a file (tensor data, not the safetensors header); the size stays."""
    data = bytearray(path.read_bytes())
    for k in range(1, n + 1):
        data[-k] ^= 0x5A
    path.write_bytes(bytes(data))


def test_same_size_corruption_is_refused_before_a_sample_is_used(ws, copy):
    shard = ws["index"]["shards"][-1]
    last = ws["index"]["num_samples"] - 1
    good = TeacherCache(ws["cache"]).sample(last)["hidden"]
    flip_last_bytes(copy / shard)
    cache = TeacherCache(copy)  # sizes match: opening is cheap and passes
    cache.sample(0)  # another shard, intact
    with pytest.raises(UserError, match=rf"{shard} has SHA-256 .*same size: its bytes were changed"):
        cache.sample(last)
    assert good.shape[0] == ws["index"]["samples"]["length"][last]
    flip_last_bytes(copy / "head.safetensors")
    with pytest.raises(UserError, match="head.safetensors has SHA-256"):
        TeacherCache(copy).head()


def test_a_truncated_shard_is_a_user_error(ws, copy):
    shard = copy / ws["index"]["shards"][0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=rf"{shard.name} has 100 bytes, index.json recorded \d+ \(a truncated"):
        TeacherCache(copy)


def test_verify_checks_every_file_and_sample(ws, copy, capsys):
    from safetensors.torch import load_file, save_file

    from emkd.cache import file_sha256

    assert main(["cache-teacher", "--verify", str(copy)]) == 0
    assert "verified" in capsys.readouterr().out
    # a shard rewritten without one tensor, its size and checksum updated in the index: only the full pass sees it
    name = ws["index"]["shards"][0]
    tensors = load_file(str(copy / name))
    del tensors["s0.vision"]
    save_file(tensors, str(copy / name))
    index = json.loads((copy / INDEX_FILE).read_text())
    index["shard_sizes"][0] = (copy / name).stat().st_size
    index["shard_sha256"][0] = file_sha256(copy / name)
    (copy / INDEX_FILE).write_text(json.dumps(index))
    flip_last_bytes(copy / ws["index"]["shards"][1])
    assert main(["cache-teacher", "--verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert f"{name}: sample 0 has no tensor 's0.vision'" in out
    assert f"{ws['index']['shards'][1]} has SHA-256" in out and "2 problem(s)" in out


def _edit(index, how):
    if how == "no samples":
        del index["samples"]
    elif how == "bad shard number":
        index["samples"]["shard"][2] = "x"
    elif how == "sizes too short":
        index["shard_sizes"] = index["shard_sizes"][:1]
    elif how == "no version":
        del index["version"]
    return index


@pytest.mark.parametrize("how, message", [
    ("truncated", r"index.json is not valid JSON \(.* at line 1, column \d+\); the file is damaged or truncated"),
    ("not utf-8", r"index.json is not UTF-8 text"),
    ("no samples", r"index.json: expected samples to be an object, found nothing \(the key is missing\)"),
    ("bad shard number", r"expected samples.shard\[2\] to be a list of 4 shard numbers in \[0, \d+\), found 'x'"),
    ("sizes too short", r"expected shard_sizes to be a list of byte counts, one per shard"),
    ("no version",
     r"expected format 'emkd-teacher-cache' version 1, 2 or 3, found 'emkd-teacher-cache' version nothing"),
])
def test_a_broken_index_is_named(ws, copy, capsys, how, message):
    text = (copy / INDEX_FILE).read_text()
    if how == "truncated":
        (copy / INDEX_FILE).write_text(text[: len(text) // 2])
    elif how == "not utf-8":
        (copy / INDEX_FILE).write_bytes(b"\xff" + text.encode())
    else:
        (copy / INDEX_FILE).write_text(json.dumps(_edit(json.loads(text), how)))
    with pytest.raises(UserError, match=message):
        TeacherCache(copy)
    assert main(["cache-teacher", "--verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"emkd cache-teacher: error: teacher cache {copy}: index.json") and "\n" not in err


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_names_cannot_leave_the_cache_folder(ws, copy, where):
    name = ws["index"]["shards"][0]
    outside = copy.parent / name
    shutil.move(copy / name, outside)  # the right bytes, the right size, outside the cache
    index = json.loads((copy / INDEX_FILE).read_text())
    index["shards"][0] = f"../{name}" if where == "parent" else str(outside)
    (copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"shard name .* is not a file name inside the cache folder"):
        TeacherCache(copy)


def test_staging_folders_of_killed_runs_are_removed_by_the_next_run(ws, tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    dead = finished.pid  # a process that no longer runs
    parent = tmp_path / "caches"
    parent.mkdir()
    staging = {
        f".cache.partial-{dead}": ["cache-00000.safetensors"],  # killed while writing shards: removed
        f".other.partial-{dead}": ["cache-00000-of-00001.safetensors", "head.safetensors", "index.json.tmp"],  # removed
        ".cache.partial-1": ["cache-00000.safetensors"],  # process 1 runs: kept
        f".notes.partial-{dead}": ["notes.txt"],  # not a cache's files: kept
    }
    for folder, files in staging.items():
        (parent / folder).mkdir()
        for f in files:
            (parent / folder / f).write_bytes(b"x")
    cache_teacher(ws["teacher"], ws["train"], ws["images"], parent / "cache", progress=False)
    assert sorted(p.name for p in parent.iterdir()) == sorted(["cache", ".cache.partial-1", f".notes.partial-{dead}"])


def test_a_cache_without_checksums_still_loads_with_a_warning(ws, copy, capsys):
    index = json.loads((copy / INDEX_FILE).read_text())
    index.pop("shard_sha256", None), index.pop("head_sha256", None)
    index["version"] = 1
    (copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="has no checksums"):
        cache = TeacherCache(copy)
    assert torch.equal(cache.sample(0)["hidden"], TeacherCache(ws["cache"]).sample(0)["hidden"])
    assert main(["cache-teacher", "--verify", str(copy)]) == 1
    assert "has no checksums (version 1)" in capsys.readouterr().out

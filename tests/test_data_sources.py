"""Data as shipped: parquet files with embedded images, mixture files, streamed JSONL (emkd.data.sources)."""

from __future__ import annotations

import argparse
import io
import json

import pyarrow as pa  # in the dev extra: a missing pyarrow fails these tests instead of skipping them
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emkd.data import PairDataset, add_check_arguments, check_file, read_objects, read_records, run_check
from emkd.data import sources
from emkd.data.records import BadRecord, Record, load_images  # noqa: E402
from emkd.errors import UserError  # noqa: E402
from emkd.models import build_tokenizer  # noqa: E402
from test_data import CORPUS, FakeSide  # noqa: E402


@pytest.fixture(scope="module")
def sides():
    """(student, unused, teacher) as tests/test_data.py's ``sides``: 4 and 16 image tokens, the teacher's wrapped."""
    tok = build_tokenizer(CORPUS)
    return (FakeSide(tok, "<image>", 4), None,
            FakeSide(tok, "<|image_pad|>", 16, ("<|vision_start|>", "<|vision_end|>")))


def png(color, size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def conv(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def ov_parquet(path, row_group_size=2):
    """A LLaVA-OneVision-like file: id, conversations (list of structs), image ({bytes, path} struct)."""
    rows = [
        ("red", conv("<image>\nWhat colour?", "Red."), {"bytes": png(RED), "path": "red.png"}),
        ("text", conv("How big?", "Small."), None),
        ("broken", conv("<image>\nWhat?", "Nothing."), {"bytes": b"not a png", "path": "broken.png"}),
        ("nopath", conv("<image>\nColour?", "Blue."), {"bytes": png(BLUE, (3, 5)), "path": None}),
        ("count", conv("<image><image>\nTwo?", "One."), {"bytes": png(GREEN), "path": "g.png"}),
    ]
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    table = pa.table({
        "id": pa.array([r[0] for r in rows]),
        "conversations": pa.array([r[1] for r in rows], type=pa.list_(turn)),
        "image": pa.array([r[2] for r in rows], type=STRUCT),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_records_sources_and_embedded_images(tmp_path):
    path = ov_parquet(tmp_path / "ov.parquet")
    items = list(read_records(path))
    assert [i.id for i in items] == ["red", "text", "broken", "nopath", "count"]
    assert all(isinstance(i, Record) for i in items)
    assert [str(i.source) for i in items][:2] == [f"{path}:row 0", f"{path}:row 1"]
    red, text, _, nopath, _ = items
    assert red.embedded and red.image_paths == ("red.png",) and not text.embedded and text.image_paths == ()
    assert nopath.image_paths == ("image 0",)
    sources._PARQUET_IMAGES.groups.clear()  # read back from the file, not from the scan's row group
    [im] = load_images(nopath, images_dir=tmp_path / "nowhere")
    assert im.size == (3, 5) and im.getpixel((0, 0)) == BLUE
    assert load_images(red, None)[0].getpixel((1, 1)) == RED

    report = check_file(path, None)
    assert [str(b) for b in report.bad] == [
        f"{path}:row 2 (id 'broken'): [unreadable_image] embedded image 'broken.png' cannot be decoded "
        "(UnidentifiedImageError: cannot identify image file its bytes)",
        f"{path}:row 4 (id 'count'): [image_count] 2 <image> markers but 1 images",
    ]
    assert [r.id for r in report.records] == ["red", "text", "nopath"]


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    path = ov_parquet(tmp_path / "ov.parquet", row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, *a, **k: reads.append(i) or original(self, i, *a, **k))
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    items = read_records(path)
    assert next(items).id == "red" and reads == [0]
    assert [i.id for i in items] == ["text", "broken", "nopath", "count"] and reads == [0, 1, 2]


def test_parquet_raw_bytes_lists_paths_and_json_strings(tmp_path, images_dir_png):
    table = pa.table({
        "messages": pa.array([
            json.dumps([{"role": "user", "content": "<image><image> Same?"}, {"role": "assistant", "content": "No."}]),
            json.dumps([{"role": "user", "content": "<image> Colour?"}, {"role": "assistant", "content": "Red."}]),
            "[not json",
            json.dumps([{"role": "user", "content": "<image> Colour?"}, {"role": "assistant", "content": "Red."}]),
        ]),
        "images": pa.array([[png(RED), png(BLUE)], None, None, None], type=pa.list_(pa.binary())),
    })
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path)
    first, no_image, bad_json, _ = read_records(path)
    assert first.embedded and first.image_paths == ("image 0", "image 1")
    assert [im.getpixel((0, 0)) for im in load_images(first, None)] == [RED, BLUE]
    assert isinstance(bad_json, BadRecord) and bad_json.kinds == ["malformed_json"]
    assert str(bad_json).startswith(f"{path}:row 2 (id ?): [malformed_json] column 'messages'")

    # an image column of path strings: paths, resolved as a JSON record's are
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"conversations": pa.array([json.dumps(conv("<image> Colour?", "Red."))] * 2),
                             "image": pa.array(["red.png", "../outside.png"])}), paths)
    report = check_file(paths, images_dir_png)
    assert [r.embedded for r in report.records] == [False]
    assert report.bad[0].kinds == ["image_outside"] and str(report.bad[0]).startswith(f"{paths}:row 1 ")
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"conversations": pa.array([json.dumps(conv("<image><image> ?", "x"))]),
                             "image": pa.array([[{"bytes": png(RED), "path": "a"}, {"bytes": None, "path": "b"}]],
                                               type=pa.list_(STRUCT))}), mixed)
    [bad] = read_records(mixed)
    assert str(bad) == (f"{mixed}:row 0 (id ?): [malformed_record] column 'image': the images mix embedded bytes and "
                        "file paths; use one kind per record")


@pytest.fixture()
def images_dir_png(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (6, 4), RED).save(d / "red.png")
    Image.new("RGB", (6, 4), GREEN).save(d / "green.png")
    return d


def test_pair_dataset_trains_on_parquet(tmp_path, sides, monkeypatch):
    monkeypatch.setenv("EMKD_CACHE", str(tmp_path / "cache"))
    path = ov_parquet(tmp_path / "ov.parquet")
    student, _, qwen = sides
    ds = PairDataset(path, None, student, qwen, on_bad_sample="skip")
    assert [r.id for r in ds.records] == ["red", "text", "nopath"] and len(ds.skipped) == 2
    sources._PARQUET_IMAGES.groups.clear()
    sample = ds[2]
    assert sample["id"] == "nopath" and sample["teacher"]["input_ids"].numel() > 0
    again = PairDataset(path, None, student, qwen, on_bad_sample="skip")  # from the scan cache
    assert [r.id for r in again.records] == ["red", "text", "nopath"] and again[0]["id"] == "red"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llava(rid, image=None):
    rec = {"id": rid, "conversations": conv(("<image>\n" if image else "") + "Describe.", f"It is {rid}.")}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture()
def mixture(tmp_path, images_dir_png):
    write_jsonl(tmp_path / "a.jsonl", [llava(f"a{k}") for k in range(10)])
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "b.jsonl", [llava("b0", "red.png"), llava("b1", "green.png"), llava("b2", "no.png")])
    ov_parquet(tmp_path / "ov.parquet")
    path = tmp_path / "mix.yaml"
    path.write_text(
        "datasets:\n"
        "  - json_path: a.jsonl\n    sampling_strategy: \"random:50%\"\n"
        "  - json_path: b/b.jsonl\n    sampling_strategy: \"end:2\"\n    image_folder: images\n"
        "  - json_path: ov.parquet\n    sampling_strategy: \"first:2\"\n"
        "  - json_path: a.jsonl\n    sampling_strategy: all\n"
    )
    return path


def test_mixture_samples_each_source_deterministically(tmp_path, mixture):
    items = list(read_records(mixture))
    ids = [i.id for i in items]
    assert len(ids) == 5 + 2 + 2 + 10
    randoms = ids[:5]
    assert all(r.startswith("a") for r in randoms) and randoms == sorted(randoms, key=lambda r: int(r[1:]))
    assert ids[5:9] == ["b1", "b2", "red", "text"] and ids[9:] == [f"a{k}" for k in range(10)]
    assert [i.id for i in read_records(mixture)] == ids  # the same seed, the same sample
    mixture.write_text("seed: 7\n" + mixture.read_text())
    others = [[i.id for i in read_records(mixture)][:5]]
    for seed in (8, 9, 10):
        mixture.write_text(mixture.read_text().replace(f"seed: {seed - 1}", f"seed: {seed}"))
        others.append([i.id for i in read_records(mixture)][:5])
    assert any(o != randoms for o in others)
    b1 = items[5]
    assert str(b1.source) == f"{tmp_path / 'b' / 'b.jsonl'}:2" and b1.images_dir == str(tmp_path / "images")
    assert load_images(b1, None)[0].getpixel((0, 0)) == GREEN

    report = check_file(mixture, None)
    assert [str(b).split(": [")[0] for b in report.bad] == [f"{tmp_path / 'b' / 'b.jsonl'}:3 (id 'b2')"]
    assert report.bad[0].kinds == ["missing_image"] and report.num_records == 19


def test_mixture_percent_and_counts(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [llava(f"a{k}") for k in range(7)])
    mix = tmp_path / "m.yml"
    for spec, expected in [("first:50%", ["a0", "a1", "a2"]), ("end:30%", ["a5", "a6"]), ("first:100", None),
                           ("random:0", []), ("end:0%", [])]:
        mix.write_text(f"datasets:\n  - json_path: a.jsonl\n    sampling_strategy: '{spec}'\n")
        ids = [i.id for i in read_records(mix)]
        assert ids == (expected if expected is not None else [f"a{k}" for k in range(7)]), spec


@pytest.mark.parametrize("body, message", [
    ("datasets:\n  - json_path: a.jsonl\n    sampling_strategy: 'top:5'\n",
     "m.yaml: datasets[0].sampling_strategy: 'top:5' is not one of"),
    ("datasets:\n  - json_path: a.jsonl\n  - json_path: b.jsonl\n",
     "m.yaml: datasets[1].json_path: {tmp}/b.jsonl not found"),
    ("datasets:\n  - json_path: a.jsonl\n    sampling_strategy: 'first:150%'\n",
     "m.yaml: datasets[0].sampling_strategy: '150%' is not a record count or a percent"),
    ("datasets:\n  - json_path: a.jsonl\n    samples: 3\n", "m.yaml: datasets[0]: unknown key(s) ['samples']"),
    ("datasets:\n  - sampling_strategy: all\n", "m.yaml: datasets[0].json_path: missing"),
    ("datasets: []\n", "m.yaml: a mixture file needs a non-empty list 'datasets'"),
    ("seed: x\ndatasets:\n  - json_path: a.jsonl\n", "m.yaml: seed: must be an integer"),
    ("datasets:\n  - json_path: m.yaml\n", "m.yaml: datasets[0].json_path: {tmp}/m.yaml is a mixture file"),
])
def test_mixture_errors_name_file_entry_and_key(tmp_path, body, message):
    write_jsonl(tmp_path / "a.jsonl", [llava("a0")])
    mix = tmp_path / "m.yaml"
    mix.write_text(body)
    with pytest.raises(UserError) as err:
        list(read_records(mix))
    assert str(err.value).startswith(f"{tmp_path}/" + message.format(tmp=tmp_path)), str(err.value)
    assert "\n" not in str(err.value)


def test_emkd_data_check_on_parquet_and_mixtures(tmp_path, mixture, capsys):
    parser = argparse.ArgumentParser()
    add_check_arguments(parser)
    assert run_check(parser.parse_args([str(tmp_path / "ov.parquet")])) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'ov.parquet'}:row 2 (id 'broken'): [unreadable_image]" in out
    assert "5 records, 2 bad (unreadable_image: 1, image_count: 1)" in out
    assert run_check(parser.parse_args([str(mixture)])) == 1
    assert "19 records, 1 bad (missing_image: 1)" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("datasets:\n  - json_path: a.jsonl\n    sampling_strategy: random\n")
    assert run_check(parser.parse_args([str(tmp_path / "bad.yaml")])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"emkd data check: error: {tmp_path}/bad.yaml: datasets[0].sampling_strategy: 'random' is not "
                   "one of 'all', 'first:N', 'end:N', 'random:N' (N a count or a percent such as 50%)"]


def test_mixture_scan_cache_sees_a_changed_source(tmp_path, sides, mixture, monkeypatch):
    monkeypatch.setenv("EMKD_CACHE", str(tmp_path / "cache"))
    student, _, qwen = sides
    ds = PairDataset(mixture, None, student, qwen, on_bad_sample="skip")
    assert len(ds) == 18 and [b.source.line for b in ds.skipped] == [3]
    assert ds[5]["id"] == "b1"
    write_jsonl(tmp_path / "b" / "b.jsonl", [llava("b0", "red.png"), llava("b1", "green.png"), llava("b2", "red.png")])
    again = PairDataset(mixture, None, student, qwen, on_bad_sample="skip")
    assert len(again) == 19 and not again.skipped


def test_jsonl_is_streamed_line_by_line(tmp_path, monkeypatch):
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(llava("a")).encode() + b"\n\n"
                     + b'{"id": "b\xff", "conversations": []}\n' + b"{broken\n")
    items = list(read_objects(path))
    assert [i.source.line for i in items] == [1, 3, 4]
    assert str(items[1]).startswith(f"{path}:3 (id 'b\\\\xff'): [encoding] byte 0xff at line 3, column 10 ")
    assert items[2].problems[0].kind == "malformed_json"
    import builtins

    real_open = builtins.open

    class NoWholeRead:
        def __init__(self, fh):
            self.fh = fh

        def read(self, n=-1):
            assert 0 < n <= 65536, "the whole file was read"
            return self.fh.read(n)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __iter__(self):
            return iter(self.fh)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: NoWholeRead(real_open(f, *a, **k)))
    assert [i.source.line for i in read_objects(path)] == [1, 3, 4]


def save_to_disk_folder(path, table, batch_rows=1):
    """The layout `datasets.Dataset.save_to_disk` writes (checked against datasets 5.2.0): state.json listing Arrow
    stream files."""
    path.mkdir()
    with pa.ipc.new_stream(path / "data-00000-of-00001.arrow", table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                 "_fingerprint": "0", "_split": None}))
    return path


def test_datasets_save_to_disk_folders(tmp_path):
    table = pq.read_table(ov_parquet(tmp_path / "ov.parquet"))
    folder = save_to_disk_folder(tmp_path / "ds", table)
    items = list(read_records(folder))
    assert [i.id for i in items] == ["red", "text", "broken", "nopath", "count"]
    assert str(items[3].source) == f"{folder}:row 3" and items[3].embedded
    assert load_images(items[3], None)[0].getpixel((0, 0)) == BLUE
    report = check_file(folder, None)
    assert [str(b).split(": [")[0] for b in report.bad] == [f"{folder}:row 2 (id 'broken')",
                                                            f"{folder}:row 4 (id 'count')"]
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    save_to_disk_folder(tmp_path / "dd" / "train", table)
    with pytest.raises(UserError, match=f"{tmp_path}/dd holds several splits \\(train\\), not one data set: give "
                                        f"one split's folder, e.g. {tmp_path}/dd/train"):
        list(read_records(tmp_path / "dd"))
    mix = tmp_path / "m.yaml"
    mix.write_text("datasets:\n  - json_path: ds\n    sampling_strategy: end:1\n")
    assert [i.id for i in read_records(mix)] == ["count"]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    import sys

    path = ov_parquet(tmp_path / "ov.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UserError, match=r"reading parquet data needs pyarrow: pip install 'emkd\[data\]'"):
        list(read_records(path))


def test_count_records_matches_what_is_read(tmp_path, mixture):
    table = pq.read_table(tmp_path / "ov.parquet")
    folder = save_to_disk_folder(tmp_path / "ds", table)
    for path in (tmp_path / "ov.parquet", folder, tmp_path / "a.jsonl", mixture):
        assert sources.count_records(str(path)) == len(list(read_objects(path)))

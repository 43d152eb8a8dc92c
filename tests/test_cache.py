"""`emkd cache-teacher`: the cached teacher gives the live teacher's inputs, losses and training logs; a cache that does
not match its data, or whose writing did not finish, is refused; a cache of version 2 with Align-TI's IVA weights
still opens."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _workspace import build_workspace
from emkd.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_FILE,
    CachedTeacher,
    TeacherCache,
    cache_teacher,
    file_sha256,
    load_cached_teacher,
    storage_summary,
)
from emkd.cache.adapter import teacher_inputs
from emkd.cli import main
from emkd.data import PairCollator, PairDataset
from emkd.models import EfficientMLLMAdapter, load_student, load_teacher
from emkd.training.config import load_recipe
from emkd.training.methods import build_method
from emkd.training.run import build_trainer, train

# responses of different lengths, so that batches are padded
RESPONSES = ["red", "the square is green", "a small square on a grey background", "one two three"]
ORDERS = ([0, 1, 2], [3], [2, 0, 3, 1])


def _write_data(ws, name, responses):
    records = json.loads(ws["train"].read_text())
    for record, response in zip(records, responses):
        record["conversations"][1]["value"] = response
    path = ws["root"] / name
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module", params=["student", "llava"])
def ws(request, tmp_path_factory):
    """A workspace (the teacher is the student class, or a Hugging Face LLaVA), its data and float32/bf16 caches."""
    root = tmp_path_factory.mktemp(f"cache-{request.param}")
    ws = build_workspace(root / "ws", teacher_kind=request.param)
    ws["data"] = _write_data(ws, "var.json", RESPONSES)
    common = dict(teacher_dir=ws["teacher"], data=ws["data"], images=ws["images"], batch_size=3, progress=False)
    ws["index"] = cache_teacher(out_dir=root / "f32", shard_bytes=12_000, **common)
    ws["cache"] = root / "f32"
    cache_teacher(out_dir=root / "bf16", dtype="bfloat16", **common)
    ws["cache_bf16"] = root / "bf16"
    return ws


@pytest.fixture(scope="module")
def models(ws):
    teacher = load_teacher(ws["teacher"])
    teacher.return_logits = False
    student_model, student_side = load_student(ws["student"])
    student = EfficientMLLMAdapter(student_model, student_side, return_logits=False)
    data = PairDataset(ws["data"], ws["images"], student_side, teacher.side)
    return {"teacher": teacher, "student": student, "data": data,
            "collate": PairCollator(student_side, teacher.side, with_index=True)}


def _batch(models, order):
    return models["collate"]([models["data"][i] for i in order])


def test_index_records_what_was_cached(ws):
    index = ws["index"]
    cache = TeacherCache(ws["cache"])
    assert index["num_samples"] == cache.num_samples == 4
    assert len(index["shards"]) > 1 and all(f"-of-{len(index['shards']):05d}" in s for s in index["shards"])
    assert len(set(index["samples"]["length"])) > 1  # padded batches
    assert index["data"]["template"] == "chat" and index["data"]["max_length"] == 2048
    assert index["teacher"]["dir"] == str(Path(ws["teacher"]).resolve())
    assert index["version"] == CACHE_VERSION == 3 and "attention_layer" not in index
    weight, bias = cache.head()
    assert (cache.vocab_size, cache.hidden_size) == tuple(weight.shape)
    for i, n in enumerate(index["samples"]["length"]):
        sample = cache.sample(i)
        assert sample["hidden"].shape == (n, cache.hidden_size) and sample["vision"].dtype == torch.bool
        assert int(sample["vision"].sum()) == index["samples"]["vision_tokens"][i]
    stored = {key for name in index["shards"] for key in load_file(str(ws["cache"] / name))}
    assert stored == {f"s{i}.{key}" for i in range(4) for key in ("hidden", "vision")}  # what training reads
    assert not list(ws["cache"].parent.glob(".*partial*"))


@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_cached_inputs_equal_the_live_teachers(ws, models, order):
    batch = _batch(models, order)
    live = models["teacher"](batch["teacher"]).inputs
    for path, exact in ((ws["cache"], True), (ws["cache_bf16"], False)):
        cached = load_cached_teacher(path)(batch["teacher"]).inputs
        real = live.attention_mask
        for name in ("vision_mask", "attention_mask", "labels", "instruction_mask", "head_weight"):
            assert torch.equal(getattr(cached, name), getattr(live, name)), name
        assert (cached.head_bias is None) == (live.head_bias is None)
        assert cached.hidden.shape == live.hidden.shape
        assert not cached.hidden[~real].any()  # padding
        if exact:
            assert cached.hidden.dtype == torch.float32 and torch.equal(cached.hidden[real], live.hidden[real])
        else:
            assert cached.hidden.dtype == torch.bfloat16
            torch.testing.assert_close(cached.hidden[real].float(), live.hidden[real], rtol=2**-8, atol=1e-6)


def test_a_cached_teacher_gives_no_attention(ws, models):
    batch = _batch(models, [2, 0, 3])
    with pytest.raises(NotImplementedError, match="holds no attention maps.*TPA"):
        load_cached_teacher(ws["cache"])(batch["teacher"], attention_layer=1)


def _with_iva_weights(src, dst):
    """A copy of cache ``src`` as version 2 wrote it with ``attention_layer=1``: ``attention_layer`` in the index
    and each sample's Align-TI IVA weights ``s{i}.iva`` ``[Nv_i]`` float32 in its shard."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_FILE).read_text())
    for k, name in enumerate(index["shards"]):
        tensors = load_file(str(dst / name))
        for i in (i for i, shard in enumerate(index["samples"]["shard"]) if shard == k):
            nv = index["samples"]["vision_tokens"][i]
            tensors[f"s{i}.iva"] = torch.full((nv,), 1.0 / max(nv, 1))
        save_file(tensors, str(dst / name), metadata={"format": CACHE_FORMAT})
        index["shard_sizes"][k] = (dst / name).stat().st_size
        index["shard_sha256"][k] = file_sha256(dst / name)
    index.update(version=2, attention_layer=1)
    (dst / INDEX_FILE).write_text(json.dumps(index))
    return index


def test_a_cache_with_iva_weights_still_opens(ws, models, tmp_path, capsys):
    old = tmp_path / "v2-iva"
    index = _with_iva_weights(ws["cache"], old)
    assert "s0.iva" in load_file(str(old / index["shards"][0]))
    cache = TeacherCache(old)
    assert set(cache.sample(0)) == {"hidden", "vision"}  # the IVA weights are ignored
    assert cache.verify() == []
    assert main(["cache-teacher", "--verify", str(old)]) == 0
    batch = _batch(models, [2, 0, 3])
    cached, new = (load_cached_teacher(path)(batch["teacher"]).inputs for path in (old, ws["cache"]))
    assert torch.equal(cached.hidden, new.hidden) and torch.equal(cached.vision_mask, new.vision_mask)
    # from version 3 on, a shard holds nothing else: the same tensors are strays
    (old / INDEX_FILE).write_text(json.dumps({**index, "version": 3}))
    assert any("tensors no sample of it owns" in p for p in TeacherCache(old).verify())


@pytest.mark.parametrize("method", ["emkd", "kd", "rkl", "llava_kd"])
def test_losses_from_the_cache_equal_the_live_teachers(ws, models, method):
    batch = _batch(models, [3, 1, 2, 0])
    fn = build_method(method)
    cached_teacher = load_cached_teacher(ws["cache"])
    live = fn(models["student"], models["teacher"], batch)
    cached = fn(models["student"], cached_teacher, batch)
    assert live.components.keys() == cached.components.keys()
    for key, value in live.components.items():
        assert cached.components[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert float(cached.loss.detach()) == pytest.approx(float(live.loss.detach()), rel=1e-6)


def _recipe(ws, out, *extra):
    return load_recipe(None, [
        f"student={ws['student']}", f"data.train={ws['data']}", f"data.images={ws['images']}", f"output_dir={out}",
        "method=emkd", "max_steps=3", "batch_size=2", "learning_rate=0.003", "lr_scheduler=constant",
        "warmup_ratio=0", *extra])


def _logs(out):
    return [r for r in map(json.loads, open(Path(out) / "log.jsonl")) if "objective" in r]


@pytest.mark.parametrize("ws", ["student"], indirect=True)  # one teacher is enough for the end-to-end run
def test_training_from_the_cache_logs_what_the_live_run_logs(ws, tmp_path):
    train(_recipe(ws, tmp_path / "live", f"teacher={ws['teacher']}"))
    summary = train(_recipe(ws, tmp_path / "cached", f"teacher_cache={ws['cache']}"))  # no teacher= at all
    assert summary["global_step"] == 3
    live, cached = _logs(tmp_path / "live"), _logs(tmp_path / "cached")
    assert len(live) == len(cached) == 3
    for a, b in zip(live, cached):
        for key in ("objective", "sup", "rld", "vsd", "vlad", "loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=2e-6), (a["step"], key)


def test_align_ti_refuses_a_cache(ws, tmp_path):
    with pytest.raises(ValueError, match="align_ti.*TPA"):
        _recipe(ws, tmp_path, f"teacher_cache={ws['cache']}", "method=align_ti", "irs_layer=1")


def test_a_cache_of_other_data_is_refused(ws, models):
    cached = load_cached_teacher(ws["cache"])
    side = models["student"].side
    other = PairDataset(ws["train"], ws["images"], side, cached.side)  # the original responses
    with pytest.raises(ValueError, match="has other content"):
        cached.cache.check_dataset(other)
    batch = PairCollator(side, cached.side, with_index=True)([other[i] for i in range(4)])
    n0 = ws["index"]["samples"]["length"][0]
    with pytest.raises(ValueError, match=rf"sample 0 \(batch row 0\) has cached hidden states of shape \({n0}, "):
        cached(batch["teacher"])
    # same lengths, other tokens: sample 1 answers "blue" instead of "green"
    swapped = PairDataset(_write_data(ws, "swapped.json", ["red", "the square is blue"]), ws["images"], side,
                          cached.side)
    batch = PairCollator(side, cached.side, with_index=True)([swapped[1]])
    with pytest.raises(ValueError, match="sample 1 .*token ids differ"):
        cached(batch["teacher"])
    with pytest.raises(ValueError, match="different teacher"):
        cached.cache.check_teacher(ws["student"])
    with pytest.raises(ValueError, match="no 'index'"):
        cached(PairCollator(side, cached.side)([swapped[1]])["teacher"])


def test_cached_vision_positions_must_be_the_image_tokens(ws, models):
    """The image-token positions are checked once for the batch; a sample whose cached vision positions are not its
    image tokens is refused by name (here: the token id looked for is the response's first token, not the image's)."""
    cached = load_cached_teacher(ws["cache"])
    order = [2, 0, 3]
    batch = _batch(models, order)
    side = batch["teacher"]
    inputs = teacher_inputs(cached.cache, side, cached.model.weight, cached.model.bias, cached.side.image_token_id)
    assert torch.equal(inputs.vision_mask, (side["input_ids"] == cached.side.image_token_id) & side["attention_mask"].bool())
    other_id = int(side["input_ids"][1][side["labels"][1] != -100][0])  # a text token of batch row 1 (sample 0)
    with pytest.raises(ValueError, match=rf"sample {order[0]} \(batch row 0\) has \d+ cached vision positions"):
        teacher_inputs(cached.cache, side, cached.model.weight, cached.model.bias, other_id)


def test_adapters_say_what_they_need_from_the_data(ws, models):
    """A model that runs on the batch needs no sample index and accepts any data set; a cached teacher needs the
    index and refuses data its cache was not built from."""
    side = models["student"].side
    other = PairDataset(ws["train"], ws["images"], side, models["teacher"].side)  # the original responses
    for adapter in (models["student"], models["teacher"]):
        assert adapter.needs_sample_index is False
        assert adapter.check_dataset(other) is None
    cached = load_cached_teacher(ws["cache"])
    assert cached.needs_sample_index is True
    cached.check_dataset(PairDataset(ws["data"], ws["images"], side, cached.side))
    with pytest.raises(ValueError, match="has other content"):
        cached.check_dataset(other)


@pytest.mark.parametrize("ws", ["student"], indirect=True)
def test_a_run_collates_indices_only_for_a_cached_teacher(ws, tmp_path):
    live = build_trainer(_recipe(ws, tmp_path / "live", f"teacher={ws['teacher']}"))
    cached = build_trainer(_recipe(ws, tmp_path / "cached", f"teacher_cache={ws['cache']}"))
    assert live.data_collator.with_index is False and cached.data_collator.with_index is True
    with pytest.raises(ValueError, match="has other content"):  # checked before training starts
        build_trainer(_recipe(ws, tmp_path / "other", f"teacher_cache={ws['cache']}", f"data.train={ws['train']}"))


def test_a_cache_of_other_teacher_weights_is_refused(ws, models, tmp_path):
    """Same architecture and config, other weights: the fingerprint covers the weight files too."""
    cached = load_cached_teacher(ws["cache"], ws["teacher"])
    other = tmp_path / "other_teacher"
    shutil.copytree(ws["teacher"], other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    cached.cache.check_teacher(ws["teacher"])
    with pytest.raises(ValueError, match="different teacher"):
        cached.cache.check_teacher(other)


def test_a_cache_of_another_max_length_is_refused(ws, models):
    cached = load_cached_teacher(ws["cache"])
    lengths = ws["index"]["samples"]["length"]
    short = max(lengths) - 1  # truncates the longest sample's response by one token
    data = PairDataset(ws["data"], ws["images"], models["student"].side, cached.side, max_length=short)
    with pytest.raises(ValueError, match=f"max_length=2048, the training data with max_length={short}"):
        cached.cache.check_dataset(data)
    longest = lengths.index(max(lengths))
    batch = PairCollator(models["student"].side, cached.side, with_index=True)([data[longest]])
    with pytest.raises(ValueError, match=rf"sample {longest} .*shape \({max(lengths)}, \d+\) but {short} real tokens"):
        cached(batch["teacher"])


def test_an_unfinished_cache_is_refused(ws, tmp_path, monkeypatch):
    import emkd.cache.writer as module

    # a crash after the shards were written: nothing is left behind, no cache appears
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(module, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        cache_teacher(ws["teacher"], ws["data"], ws["images"], tmp_path / "crash", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a copy without its index, or with a truncated shard, does not load
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ws["index"]["shards"] + ["head.safetensors"]:
        (broken / name).write_bytes((ws["cache"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="not a complete teacher cache"):
        TeacherCache(broken)
    (broken / INDEX_FILE).write_text((ws["cache"] / INDEX_FILE).read_text())
    TeacherCache(broken)
    first = broken / ws["index"]["shards"][0]
    first.write_bytes(first.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        TeacherCache(broken)
    with pytest.raises(FileExistsError, match="not an empty directory"):
        cache_teacher(ws["teacher"], ws["data"], ws["images"], broken, progress=False)
    cache_teacher(ws["teacher"], ws["data"], ws["images"], broken, progress=False, overwrite=True)
    assert isinstance(load_cached_teacher(broken), CachedTeacher)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("ws", ["student"], indirect=True)
def test_cli_prints_bytes_per_sample(ws, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["cache-teacher", str(ws["teacher"]), str(ws["data"]), "--images", str(ws["images"]), "--out",
                 str(out), "--batch-size", "2", "--dtype", "bfloat16"])
    assert code == 0
    printed = capsys.readouterr().out
    index = json.loads((out / INDEX_FILE).read_text())
    size = storage_summary(index)
    assert f"bytes per sample: {size['bytes_per_sample']:,.0f}" in printed
    assert "cached 4 samples" in printed and "k=100" in printed
    assert index["dtype"] == "bfloat16" and "attention_layer" not in index
    # hidden states in bfloat16 are 2 bytes per value
    assert size["bytes_per_sample"] >= 2 * index["hidden_size"] * size["positions_per_sample"]


def test_collator_carries_dataset_indices_only_when_asked(models):
    items = [models["data"][i] for i in (2, 0)]
    batch = models["collate"](items)
    assert batch["student"]["index"].tolist() == batch["teacher"]["index"].tolist() == [2, 0]
    plain = PairCollator(models["student"].side, models["teacher"].side)(items)
    assert "index" not in plain["student"] and "index" not in plain["teacher"]
    with pytest.raises(ValueError, match=r"items \[0\] of the batch have no 'index'"):
        models["collate"]([{k: v for k, v in items[0].items() if k != "index"}])

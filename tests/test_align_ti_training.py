"""Align-TI with real (tiny) models: TPA's candidates, the augmented ribbon pass, IRS over teacher layers, and the
full ``CE + IVA + KD + TPA`` step.

The key invariant: one augmented pass under the ribbon mask gives, at every candidate ``c_k^(u)``, the same logits
as running ``prefix + y_<k + c_k^(u)`` on its own, and at every ground-truth token the logits of the normal pass;
checked for the student class and for LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision teachers.
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from emkd.cache import CachedTeacher
from emkd.data import PairCollator, PairDataset
from emkd.losses.align_ti import (
    instruction_relevance_score,
    instruction_vision_attention,
    ribbon_attention_mask,
)
from emkd.losses.divergence import forward_kl
from emkd.models import (
    DistillAdapter,
    EfficientMLLMAdapter,
    build_tokenizer,
    load_student,
    load_teacher,
    save_tiny_teacher,
)
from emkd.models.tiny import save_tiny_student
from emkd.training.align_ti import (
    TPAOptions,
    align_ti_step,
    augmented_hidden,
    build_tpa_batch,
    check_tpa_support,
    sample_candidates,
    tpa_losses,
)
from emkd.training.irs import add_irs_arguments, compute_irs, run_irs, write_irs

IGNORE_INDEX = -100
CORPUS = [
    "what colour is the shape in the picture?",
    "the shape is a red circle on a white background",
    "how many dots are there? there are three dots",
    "describe the image briefly. is the square blue? yes it is",
]
RECORDS = [
    ("0.png", ["what colour is the shape?", "red", "how many dots are there?", "three"]),  # multi-turn
    ("1.png", ["describe the image briefly.", "a red circle on a white background"]),
    ("2.png", ["how many dots are there?", "there are three dots"]),
    ("3.png", ["is the square blue?", "yes it is"]),
    ("0.png", ["what colour is the circle in the picture?", "white"]),
    ("2.png", ["describe the shape.", "a blue square"]),
]
TPA_KINDS = ["student", "llava", "llava_next", "llava_onevision"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("align_ti")
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    save_tiny_student(root / "student", tokenizer, seed=0)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i, size in enumerate([(40, 56), (48, 48), (64, 30), (32, 32)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    records = []
    for i, (image, turns) in enumerate(RECORDS):
        conv = [{"from": "human" if t % 2 == 0 else "gpt", "value": text} for t, text in enumerate(turns)]
        conv[0]["value"] = "<image>\n" + conv[0]["value"]
        records.append({"id": str(i), "image": image, "conversations": conv})
    (root / "train.json").write_text(json.dumps(records))
    return root, tokenizer


@pytest.fixture(scope="module")
def student(workspace):
    root, _ = workspace
    model, side = load_student(root / "student")
    return EfficientMLLMAdapter(model, side)


def _teacher(workspace, kind):
    root, tokenizer = workspace
    directory = root / f"teacher_{kind}"
    if not directory.exists():
        if kind == "student":  # the project's own class as a vanilla teacher: every patch token, larger LLM
            save_tiny_student(directory, tokenizer, seed=1, compressor="none", text_hidden=48)
        else:
            save_tiny_teacher(kind, directory, tokenizer, seed=1)
    return load_teacher(directory)


@pytest.fixture(scope="module")
def llava(workspace):
    return _teacher(workspace, "llava")


def _pair_batch(workspace, student, teacher, indices=(0, 1)):
    root, _ = workspace
    data = PairDataset(root / "train.json", root / "images", student.side, teacher.side, template="chat",
                       max_length=1024)
    items = [data[i] for i in indices]
    return items, PairCollator(student.side, teacher.side)(items)


# ---- candidates -------------------------------------------------------------------------------------------------
def test_greedy_candidates_are_topk_and_skip_excluded_ids():
    logits = torch.randn(7, 53, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(sample_candidates(logits, 5, sampling="greedy"), logits.topk(5, dim=-1).indices)
    top = logits.argmax(-1).tolist()
    got = sample_candidates(logits, 5, sampling="greedy", exclude_ids=top[:2])
    assert not torch.isin(got, torch.tensor(top[:2])).any()
    drawn = sample_candidates(logits, 50, top_p=1.0, exclude_ids=top, generator=torch.Generator().manual_seed(1))
    assert not torch.isin(drawn, torch.tensor(top)).any()


@pytest.mark.parametrize("top_p", [0.3, 0.9])
def test_nucleus_never_leaves_the_nucleus(top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 41, generator=gen) * 2.5
    logits[0] = -10.0
    logits[0, 7] = 10.0  # one token holds > top_p of the mass: every draw is it
    drawn = sample_candidates(logits, 400, sampling="nucleus", top_p=top_p, generator=gen)
    assert drawn.shape == (9, 400) and drawn.dtype == torch.long
    probs = logits.softmax(-1)
    for r in range(9):
        p, order = probs[r].sort(descending=True)
        size = int((p.cumsum(0) < top_p).sum()) + 1  # smallest prefix whose mass reaches top_p
        nucleus = set(order[:size].tolist())
        assert set(drawn[r].tolist()) <= nucleus, f"row {r} drew outside its nucleus of {size} tokens"
        if size > 1:
            assert len(set(drawn[r].tolist())) > 1  # it does sample, not argmax
    assert set(drawn[0].tolist()) == {7}
    again = sample_candidates(logits, 400, sampling="nucleus", top_p=top_p, generator=torch.Generator().manual_seed(5))
    same = sample_candidates(logits, 400, sampling="nucleus", top_p=top_p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, same)


# ---- the augmented batch ----------------------------------------------------------------------------------------
def test_build_tpa_batch_layout_by_hand():
    # sample 0: prefix [11, 12, 13], response [21, 22(unsupervised), 23]; sample 1: prefix [31, 32], response [41]
    side = {
        "input_ids": torch.tensor([[11, 12, 13, 21, 22, 23], [31, 32, 41, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]),
        "labels": torch.tensor([[-100, -100, -100, 21, -100, 23], [-100, -100, 41, -100, -100, -100]]),
        "pixel_values": torch.zeros(1, 3, 2, 2),
    }
    d = 2
    cands = [torch.tensor([[101, 102], [103, 104]]), torch.tensor([[105, 106]])]
    aug = build_tpa_batch(side, cands, d, pad_token_id=0)
    assert aug["input_ids"].tolist() == [
        [11, 12, 13, 101, 102, 21, 0, 0, 22, 103, 104, 23],
        [31, 32, 105, 106, 41, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert aug["position_ids"][0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert aug["position_ids"][1, :5].tolist() == [0, 1, 2, 2, 2]
    assert aug["labels"][0].tolist() == [-100] * 5 + [21] + [-100] * 5 + [23]
    assert aug["labels"][1].tolist() == [-100] * 4 + [41] + [-100] * 7
    assert aug["index_map"].tolist() == [[0, 1, 2, 5, 8, 11], [0, 1, 4, 0, 0, 0]]
    assert aug["candidate_batch"].tolist() == [0, 0, 1]
    assert aug["candidate_index"].tolist() == [[3, 4], [9, 10], [2, 3]]
    assert torch.equal(aug["input_ids"][aug["candidate_batch"][:, None], aug["candidate_index"]], torch.cat(cands))
    assert aug["prefix_len"].tolist() == [3, 2] and aug["response_len"].tolist() == [3, 1]
    assert aug["real_mask"].sum(1).tolist() == [12, 5]
    assert aug["pixel_values"] is side["pixel_values"]

    mask = aug["attention_mask"]
    assert mask.shape == (2, 1, 12, 12) and mask.dtype == torch.float32
    allowed = mask[:, 0] == 0
    for b, (P, L) in enumerate([(3, 3), (2, 1)]):
        ribbon, _ = ribbon_attention_mask(P, L, d)
        T_b = ribbon.shape[0]
        assert torch.equal(allowed[b, :T_b, :T_b], ribbon)
        assert not allowed[b, :T_b, T_b:].any()  # real queries never see padding
        for q in range(T_b, 12):  # padding queries see themselves only
            assert allowed[b, q].nonzero().flatten().tolist() == [q]
    assert torch.isfinite(torch.softmax(mask, -1)).all()
    with pytest.raises(ValueError, match="sample 1: expected candidates"):
        build_tpa_batch(side, [cands[0], torch.zeros(2, 2, dtype=torch.long)], d)


def _logits(adapter, hidden):
    head = adapter.model.get_output_embeddings()
    out = hidden.float() @ head.weight.float().T
    return out if getattr(head, "bias", None) is None else out + head.bias.float()


def _separate_runs(adapter, side_name, items, batch, aug):
    """Logits of ``prefix + y_<k + c_k^(u)`` run on its own (one right-padded batch), in candidate order."""
    ids = batch[side_name]["input_ids"]
    d = aug["num_candidates"]
    seqs, owners = [], []
    for r in range(aug["candidates"].shape[0]):
        b = int(aug["candidate_batch"][r])
        P = int(aug["prefix_len"][b])
        for u in range(d):
            k = (int(aug["candidate_index"][r, u]) - P) // (d + 1)  # 0-based k of y_{k+1}
            seqs.append(torch.cat([ids[b, : P + k], aug["candidates"][r, u : u + 1]]))
            owners.append(b)
    n = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), n, dtype=torch.long)
    m = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)], m[i, : len(s)] = s, 1
    side = {"input_ids": x, "attention_mask": m, "labels": torch.full_like(x, IGNORE_INDEX)}
    side.update(adapter.side.collate_image_inputs([items[b][side_name]["image_inputs"] for b in owners]))
    with torch.no_grad():
        hidden = adapter(side).inputs.hidden
    last = torch.tensor([len(s) - 1 for s in seqs])
    return _logits(adapter, hidden[torch.arange(len(seqs)), last])  # (R d, V)


@pytest.mark.parametrize("kind", TPA_KINDS)
def test_one_augmented_pass_equals_separate_runs(workspace, student, kind):
    model = student if kind == "student" else _teacher(workspace, kind)
    side_name = "student" if kind == "student" else "teacher"
    items, batch = _pair_batch(workspace, student, model)
    with torch.no_grad():
        normal = student(batch["student"]).inputs
        sampled = normal.logits(normal.response_hidden())  # (R, V)
    d = 3
    cands = sample_candidates(sampled, d, top_p=0.95, generator=torch.Generator().manual_seed(0))
    aug = build_tpa_batch(batch[side_name], list(cands.split(normal.response_mask.sum(1).tolist())), d)
    assert aug["candidates"].shape[0] > 10  # both samples, both turns of the multi-turn one
    with torch.no_grad():
        hidden = augmented_hidden(model, aug)  # (B, T, D)
        reference = model(batch[side_name])

    # ground-truth tokens: the normal pass's logits at every real position
    real = batch[side_name]["attention_mask"].bool()
    gathered = hidden.gather(1, aug["index_map"][..., None].expand(-1, -1, hidden.shape[-1]))
    torch.testing.assert_close(_logits(model, gathered[real]), _logits(model, reference.inputs.hidden[real]),
                               atol=1e-4, rtol=0)
    # candidates: P(. | x, y_<k, c_k^(u)) as if run alone
    got = _logits(model, hidden[aug["candidate_batch"][:, None], aug["candidate_index"]].reshape(-1, hidden.shape[-1]))
    want = _separate_runs(model, side_name, items, batch, aug)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    # the check has teeth: a plain causal mask over the same layout gives other candidate logits
    T = aug["input_ids"].shape[1]
    future = ~torch.ones(T, T, dtype=torch.bool).tril()
    causal = torch.zeros(1, 1, T, T).masked_fill_(future, torch.finfo(torch.float32).min)
    with torch.no_grad():
        wrong = augmented_hidden(model, dict(aug, attention_mask=causal.expand(len(items), 1, T, T)))
    wrong = _logits(model, wrong[aug["candidate_batch"][:, None], aug["candidate_index"]].reshape(-1, hidden.shape[-1]))
    assert (wrong - want).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_teachers_are_refused(workspace, kind):
    teacher = _teacher(workspace, kind)
    architecture = type(teacher.model).__name__
    with pytest.raises(NotImplementedError, match=architecture) as error:
        check_tpa_support(teacher)
    assert "set tpa: false under the recipe's loss:" in str(error.value)  # the refusal names the switch


def test_align_ti_without_tpa_reads_ce_iva_kd_from_normal_passes(workspace, student, llava):
    """``tpa=False`` gives the CE, IVA and KD of the full step (whose augmented pass equals a normal pass at the
    ground-truth tokens) and a TPA of exactly 0."""
    _, batch = _pair_batch(workspace, student, llava)
    full_loss, full = align_ti_step(student, llava, batch, iva_layer=-1, num_candidates=2, sampling="greedy")
    loss, parts = align_ti_step(student, llava, batch, iva_layer=-1, tpa=False)
    for name in ("ce", "iva", "kd"):
        assert float(parts[name].detach()) > 0, name
        torch.testing.assert_close(parts[name], full[name], atol=1e-5, rtol=1e-5)
    assert float(parts["tpa"].detach()) == 0.0 and parts["candidates"].shape[1] == 0
    torch.testing.assert_close(loss, parts["ce"] + parts["iva"] + parts["kd"])
    loss.backward()
    assert all(p.grad is None for p in llava.model.parameters())
    with pytest.raises(ValueError, match="tpa must be true or false"):
        align_ti_step(student, llava, batch, iva_layer=-1, tpa="no")


@pytest.mark.parametrize("kind", ["qwen2_vl"])
def test_align_ti_without_tpa_trains_on_an_mrope_teacher(tmp_path, kind):
    """The switch the refusal names: Align-TI with ``loss.tpa=false`` trains end to end (``emkd train``'s
    :func:`train`) on a Qwen2-VL teacher, whose TPA is refused."""
    from _workspace import build_workspace
    from emkd.training.config import load_recipe
    from emkd.training.run import train

    ws = build_workspace(tmp_path / "ws", teacher_kind=kind)
    out = tmp_path / "run"
    sets = [f"student={ws['student']}", f"teacher={ws['teacher']}", f"data.train={ws['train']}",
            f"data.images={ws['images']}", f"output_dir={out}", "batch_size=4", "learning_rate=0.003",
            "lr_scheduler=constant", "warmup_ratio=0", "method=align_ti", "irs_layer=1", "max_steps=4"]
    with pytest.raises(NotImplementedError, match="set tpa: false"):
        train(load_recipe(None, [*sets[:4], f"output_dir={tmp_path / 'refused'}", *sets[5:]]))
    summary = train(load_recipe(None, [*sets, "loss.tpa=false"]))
    assert summary["global_step"] == 4
    logs = [json.loads(line) for line in open(out / "log.jsonl")]
    logs = [r for r in logs if "objective" in r]
    assert len(logs) == 4 and all(r["tpa"] == 0.0 and r["iva"] > 0 and r["kd"] > 0 for r in logs)
    assert logs[-1]["objective"] < logs[0]["objective"]


# ---- losses -----------------------------------------------------------------------------------------------------
def test_tpa_losses_match_normal_passes(workspace, student, llava):
    _, batch = _pair_batch(workspace, student, llava)
    out = tpa_losses(student, llava, batch, TPAOptions(num_candidates=2), generator=torch.Generator().manual_seed(0))
    s = student(batch["student"]).inputs
    with torch.no_grad():
        t = llava(batch["teacher"]).inputs
    z_s, z_t = s.logits(s.response_hidden()), t.logits(t.response_hidden())
    ce = torch.nn.functional.cross_entropy(z_s, s.response_targets)
    torch.testing.assert_close(out.ce, ce, atol=1e-5, rtol=0)  # CE of the augmented pass = of a normal pass
    torch.testing.assert_close(out.kd, forward_kl(z_s, z_t).mean(), atol=1e-5, rtol=0)
    R = int(s.response_mask.sum())
    assert out.candidates.shape == (R, 2) and out.sampling_logits.shape == (R, s.vocab_size)
    assert torch.isfinite(out.tpa) and float(out.tpa.detach()) > 0
    assert out.tpa.requires_grad and out.kd.requires_grad
    assert out.teacher_attention is None
    torch.testing.assert_close(out.tpa, out.totals.tpa / (R * 2), atol=0, rtol=0)


def test_tpa_options_are_checked():
    for field, value, message in [
        ("num_candidates", 0, "num_candidates must be >= 1, got 0"),
        ("sampling", "beam", "sampling must be one of ('nucleus', 'greedy'), got 'beam'"),
        ("top_p", 0.0, "top_p must lie in (0, 1], got 0.0"),
        ("temperature", 0.0, "temperature must be > 0, got 0.0"),
        ("vocab", "all", "vocab must be one of ('strict', 'crop'), got 'all'"),
        ("implementation", "fast", "implementation must be one of"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TPAOptions(**{field: value})


def test_align_ti_step_trains_the_student_only(workspace, llava):
    root, _ = workspace
    model, side = load_student(root / "student")  # a fresh copy: this test changes its weights
    model.train()
    student = EfficientMLLMAdapter(model, side)
    _, batch = _pair_batch(workspace, student, llava)
    loss, parts = align_ti_step(student, llava, batch, iva_layer=-1, num_candidates=2,
                                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    for name in ("ce", "iva", "kd", "tpa"):
        assert torch.isfinite(parts[name]) and float(parts[name].detach()) > 0, name
    torch.testing.assert_close(loss, parts["ce"] + parts["iva"] + parts["kd"] + parts["tpa"])
    loss.backward()
    for name in ("projector", "language_model"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in llava.model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss, _ = align_ti_step(student, llava, batch, iva_layer=-1, num_candidates=2, sampling="greedy")
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses


# ---- IRS --------------------------------------------------------------------------------------------------------
def _reference_irs(teacher, side_batch, num_pairs):
    """One forward per layer through the adapter's own attention recording."""
    per_layer = []
    for layer in range(teacher.num_layers):
        with torch.no_grad():
            out = teacher(side_batch, attention_layer=layer)
        vectors = instruction_vision_attention(out.attention, out.inputs.vision_mask, out.inputs.instruction_mask)
        per_layer.append(torch.stack(vectors))  # (N, Nv)
    return instruction_relevance_score(torch.stack(per_layer), num_pairs=num_pairs)


@pytest.fixture(scope="module")
def sharp_llava(workspace):
    """The tiny LLaVA teacher with its query/key projections scaled up (x4 in layer 0, x16 in layer 1).

    At random initialisation attention is nearly uniform, so every ``a_l(x)`` points the same way and IRS is ~1e-6,
    float noise. Sharper logits make the attention depend on the image and the instruction (IRS ~0.3 in layer 1).
    """
    teacher = _teacher(workspace, "llava")
    with torch.no_grad():
        for scale, layer in zip((4.0, 16.0), teacher.model.get_decoder().layers):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(scale)
                proj.bias.mul_(scale)
    return teacher


def test_compute_irs_scores_every_layer_and_writes_files(workspace, student, sharp_llava, tmp_path):
    root, _ = workspace
    llava = sharp_llava
    n = len(RECORDS)
    _, batch = _pair_batch(workspace, student, llava, indices=range(n))
    side = batch["teacher"]
    halves = [{k: v[i : i + 3] for k, v in side.items()} for i in (0, 3)]  # 2 batches of 3 (one image per sample)
    result = compute_irs(llava, halves, num_pairs=256, seed=0)
    assert len(result["scores"]) == llava.num_layers == 2
    assert result["best_layer"] == int(np.argmax(result["scores"])) == 1
    assert result["scores"][1] > 0.1 > result["scores"][0] > 0
    assert result["num_samples"] == n and result["num_pairs"] == n * (n - 1) // 2
    assert result["groups"] == {"16": n}
    # all layers recorded in one forward = one forward per layer through the adapter's own recording
    torch.testing.assert_close(torch.tensor(result["scores"]), _reference_irs(llava, side, 256), atol=0, rtol=1e-4)

    few = compute_irs(llava, halves, num_pairs=4, seed=0)
    assert few["num_pairs"] == 4 and len(few["scores"]) == 2
    capped = compute_irs(llava, halves, max_samples=3)
    assert capped["num_samples"] == 3 and capped["num_pairs"] == 3

    json_path, png_path = write_irs(result, tmp_path / "irs")
    assert json.loads(json_path.read_text()) == result
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parser = argparse.ArgumentParser()
    add_irs_arguments(parser)
    for extra in ([], ["--student", str(root / "student")]):
        out_dir = tmp_path / f"cli{len(extra)}"
        args = parser.parse_args(["--teacher", str(root / "teacher_llava"), "--data", str(root / "train.json"),
                                  "--images", str(root / "images"), "--out", str(out_dir), *extra])
        assert run_irs(args) == 0
        written = json.loads((out_dir / "irs.json").read_text())
        assert written["num_samples"] == n and len(written["scores"]) == llava.num_layers
        assert (out_dir / "irs.png").is_file()


def test_irs_pairs_only_equal_vision_token_counts(workspace, student):
    """OneVision's AnyRes gives each image size its own Nv: IRS is the pair-weighted mean over the Nv groups."""
    teacher = _teacher(workspace, "llava_onevision")
    _, batch = _pair_batch(workspace, student, teacher, indices=range(len(RECORDS)))
    side = batch["teacher"]
    result = compute_irs(teacher, [side])
    per_layer = []
    for layer in range(teacher.num_layers):
        with torch.no_grad():
            out = teacher(side, attention_layer=layer)
        per_layer.append(instruction_vision_attention(out.attention, out.inputs.vision_mask,
                                                      out.inputs.instruction_mask))
    groups: dict[int, list[int]] = {}
    for b, vector in enumerate(per_layer[0]):
        groups.setdefault(vector.numel(), []).append(b)
    assert len(groups) > 1 and result["groups"] == {str(nv): len(bs) for nv, bs in sorted(groups.items())}
    total, pairs = torch.zeros(teacher.num_layers), 0
    for members in groups.values():
        if len(members) < 2:
            continue
        vectors = torch.stack([torch.stack([per_layer[l][b] for b in members]) for l in range(teacher.num_layers)])
        p = len(members) * (len(members) - 1) // 2
        total += p * instruction_relevance_score(vectors)
        pairs += p
    assert result["num_pairs"] == pairs > 0
    torch.testing.assert_close(torch.tensor(result["scores"]), total / pairs, atol=1e-7, rtol=1e-4)


def test_irs_needs_two_samples_with_equal_vision_tokens(workspace, student, llava):
    _, batch = _pair_batch(workspace, student, llava, indices=[0])
    with pytest.raises(ValueError, match="two samples with the same number of vision tokens"):
        compute_irs(llava, [batch["teacher"]])


@pytest.mark.parametrize("kind", ["student", "llava"])
def test_ivas_attention_from_the_augmented_pass_equals_a_normal_pass(workspace, student, sharp_llava, kind):
    """The teacher runs once per step: IVA's weights read from its augmented pass (ground-truth rows, original
    columns) are those of a normal pass, because the ribbon mask gives candidates exactly zero weight there."""
    teacher = sharp_llava if kind == "llava" else _teacher(workspace, "student")
    _, batch = _pair_batch(workspace, student, teacher)
    out = tpa_losses(student, teacher, batch, TPAOptions(num_candidates=2, teacher_attention_layer=-1),
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        normal = teacher(batch["teacher"], attention_layer=-1)
    t = normal.inputs
    mask = t.attention_mask.bool()
    pair = mask[:, :, None] & mask[:, None, :]
    torch.testing.assert_close(out.teacher_attention[pair], normal.attention[pair], atol=1e-5, rtol=1e-4)
    got = instruction_vision_attention(out.teacher_attention, t.vision_mask, t.instruction_mask)
    want = instruction_vision_attention(normal.attention, t.vision_mask, t.instruction_mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.teacher.hidden[mask], t.hidden[mask], atol=1e-4, rtol=1e-4)
    assert teacher.model.get_decoder().config._attn_implementation == "sdpa"  # eager for the recorded pass only


# ---- through the adapter interface ------------------------------------------------------------------------------
class Forwarding(DistillAdapter):
    """An adapter class Align-TI does not know, which forwards the interface's methods to another adapter: Align-TI
    must reach the models through those methods alone."""

    def __init__(self, inner: DistillAdapter) -> None:
        self.inner, self.model, self.side = inner, inner.model, inner.side

    def __call__(self, batch, attention_layer=None):
        return self.inner(batch, attention_layer)

    def recording_attention(self, layer):
        return self.inner.recording_attention(layer)

    def check_augmented_forward(self):
        self.inner.check_augmented_forward()

    def augmented_forward(self, batch, model=None):
        return self.inner.augmented_forward(batch, model)


class Bare(DistillAdapter):
    """An adapter with nothing but ``__call__``, counting its forwards."""

    def __init__(self, inner: DistillAdapter) -> None:
        self.inner, self.model, self.side = inner, inner.model, inner.side
        self.calls = 0

    def __call__(self, batch, attention_layer=None):
        self.calls += 1
        return self.inner(batch, attention_layer)


@pytest.mark.parametrize("kind", ["student", "llava"])
def test_align_ti_runs_through_the_adapter_interface(workspace, student, kind):
    """Both models behind adapters of an unknown class give the step of the concrete adapters, bit for bit."""
    teacher = _teacher(workspace, kind)
    _, batch = _pair_batch(workspace, student, teacher)
    options = dict(iva_layer=-1, num_candidates=2, sampling="greedy")
    loss, parts = align_ti_step(student, teacher, batch, **options)
    wrapped_loss, wrapped = align_ti_step(Forwarding(student), Forwarding(teacher), batch, **options)
    assert torch.equal(wrapped_loss, loss) and float(parts["iva"].detach()) > 0
    for name in ("ce", "iva", "kd", "tpa", "candidates"):
        assert torch.equal(wrapped[name], parts[name]), name


def test_an_adapter_without_align_ti_support_refuses_in_one_line(workspace, student, llava):
    _, batch = _pair_batch(workspace, student, llava)
    refusal = "Bare does not support the augmented forward of Align-TI's TPA (an additive 4D mask with position ids)"
    for pair in ((Bare(student), llava), (student, Bare(llava))):
        with pytest.raises(NotImplementedError) as error:
            align_ti_step(*pair, batch, iva_layer=-1, num_candidates=2)
        assert str(error.value) == refusal
        assert all(adapter.calls == 0 for adapter in pair if isinstance(adapter, Bare))  # before any model ran
    with pytest.raises(NotImplementedError) as error:
        Bare(llava).recording_attention(0)
    assert str(error.value) == "Bare does not support recording attention probabilities (Align-TI's IRS and IVA)"


def test_a_cached_teacher_refuses_tpa(workspace, student, llava):
    class HeadOnly:  # what CachedTeacher reads of a cache when it is built
        path = "cache"

        def head(self):
            return llava.model.get_output_embeddings().weight.detach(), None

    cached = CachedTeacher(HeadOnly(), llava.side)
    _, batch = _pair_batch(workspace, student, llava)
    with pytest.raises(NotImplementedError, match="^CachedTeacher does not support the augmented forward") as error:
        tpa_losses(student, cached, batch)
    assert "\n" not in str(error.value)
    with pytest.raises(NotImplementedError, match="^CachedTeacher does not support recording attention"):
        cached.recording_attention(-1)

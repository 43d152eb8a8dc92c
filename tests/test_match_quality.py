"""Does the matching match? ``match_in_window`` (emkd.matching.quality): windows, measure, baseline, geometry, plot.

The windows are checked against torch's own adaptive pooling on one-hot inputs; the random baseline against every
one-to-one matching of a small case; the measure end to end through EM-KD's loss on an oracle student whose vision
tokens are exact pools of the teacher's (far above the baseline, by a bound computed from the data) and on the same
input with the teacher's tokens shuffled (the baseline). The geometry is read from tiny real-class models.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessorPil

from conftest import SampleSpec, make_pair, permute_vision
from emkd import EMKDLoss, LlavaKDLoss
from emkd.data import PairCollator, PairDataset
from emkd.demo.report import plot_match_quality, runs_with_matches
from emkd.matching import hungarian_match, l1_cost
from emkd.matching.quality import (
    WindowHits,
    adaptive_segments,
    avgpool_pairing,
    batch_window_hits,
    pooling_geometry,
    pooling_windows,
    random_hit_rate,
    window_hit_rate,
)
from emkd.models import EfficientMLLMAdapter, EfficientMLLMSide, HFTeacherAdapter, build_tokenizer
from emkd.models.student import pool_patch_grid
from emkd.models.teachers import LlavaSide
from emkd.models.tiny import build_tiny_student, tiny_image_processor
from emkd.models.tiny_teachers import TINY_TEACHERS

# (p, g): divisible, overlapping windows, p == g, p == 1, the paper's SigLIP 27 -> 12, and p > g (upsampling)
GRIDS = [(1, 1), (1, 5), (2, 4), (3, 5), (4, 7), (5, 5), (12, 24), (12, 27), (7, 4)]
CORPUS = [
    "describe the image briefly. a red circle on a white background",
    "what colour is the shape? it is blue",
    "how many dots are there? there are three dots",
] * 3


def segment_sum(p: int, g: int) -> int:
    """``sum_i h_i`` of the module docstring, written from the formula rather than from the windows."""
    return sum(math.ceil((i + 1) * g / p) - (i * g) // p for i in range(p))


# ---- windows ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,g", GRIDS)
def test_adaptive_segments_are_adaptive_avg_pool1d(p, g):
    pooled = F.adaptive_avg_pool1d(torch.eye(g, dtype=torch.float64)[None], p)[0]  # (g, p): weight of input c in i
    assert torch.equal(adaptive_segments(g, p), pooled.T > 0)


@pytest.mark.parametrize("p,g", GRIDS)
def test_pooling_windows_are_adaptive_avg_pool2d_of_one_hot_grids(p, g):
    windows = pooling_windows(p, g)
    assert windows.shape == (p * p, g * g) and windows.dtype == torch.bool
    one_hot = torch.eye(g * g, dtype=torch.float64).reshape(g * g, 1, g, g)  # grid t holds a 1 at token t only
    pooled = F.adaptive_avg_pool2d(one_hot, p).reshape(g * g, p * p).T  # (p*p, g*g): weight of token t in k
    assert torch.equal(windows, pooled > 0)
    # ... and each student token is the plain mean of its window
    torch.testing.assert_close(pooled, windows.double() / windows.sum(1, keepdim=True))


@pytest.mark.parametrize("p,g", [(2, 4), (3, 5), (12, 27)])
def test_pooling_windows_are_the_students_own_pooling(p, g):
    # pool_patch_grid is the student's compressor: its [T, g*g, C] -> [T, p*p, C] with one channel per token
    pooled = pool_patch_grid(torch.eye(g * g, dtype=torch.float64)[None], g, p)[0]  # (p*p, g*g)
    assert torch.equal(pooling_windows(p, g), pooled > 0)


# ---- random baseline --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,g", GRIDS)
def test_random_hit_rate_closed_form(p, g):
    windows = pooling_windows(p, g)
    assert random_hit_rate(windows) == pytest.approx((segment_sum(p, g) / (p * g)) ** 2, rel=1e-12)
    if g % p == 0:
        assert random_hit_rate(windows) == pytest.approx(1 / p**2, rel=1e-12)


def test_random_hit_rate_of_siglip_384_pooled_to_12():
    assert segment_sum(12, 27) == 36  # every window is 3 x 3 (they overlap: 12 * 3 > 27)
    assert random_hit_rate(pooling_windows(12, 27)) == pytest.approx(1 / 81, rel=1e-12)
    assert random_hit_rate(pooling_windows(12, 24)) == pytest.approx(1 / 144, rel=1e-12)


def test_random_hit_rate_is_the_mean_over_every_one_to_one_matching():
    # Ns <= Nt: 2 x 2 pooling of a 3 x 3 grid; every injective map of the 4 student tokens into the 9 teacher tokens
    windows = pooling_windows(2, 3)  # (4, 9)
    maps = torch.tensor(list(itertools.permutations(range(9), 4)))  # (3024, 4)
    hits = windows[torch.arange(4), maps].double().mean(1)  # (3024,)
    assert float(hits.mean()) == pytest.approx(random_hit_rate(windows), rel=1e-12)
    assert window_hit_rate((torch.arange(4), maps[17]), windows) == pytest.approx(float(hits[17]))
    # Ns > Nt, any window matrix: every injective map of the 3 teacher tokens into the 5 student tokens
    windows = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    maps = torch.tensor(list(itertools.permutations(range(5), 3)))  # (60, 3): student token of teacher token j
    hits = windows[maps, torch.arange(3)].double().mean(1)
    assert float(hits.mean()) == pytest.approx(random_hit_rate(windows), rel=1e-12)


# ---- the measure ------------------------------------------------------------------------------------------------
def test_window_hit_rate_of_index_pairs():
    windows = pooling_windows(2, 4)  # windows: {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
    pairs = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 5, 15]))
    assert window_hit_rate(pairs, windows) == 0.75
    assert window_hit_rate((torch.tensor([2, 0]), torch.tensor([13, 8])), windows) == 0.5  # any order, any M
    assert window_hit_rate((torch.arange(4), torch.tensor([5, 7, 13, 10])), windows) == 1.0


def test_window_hit_rate_of_avgpool_segments():
    # avgpool pools the raster sequence 16 -> 4: pair j averages grid row j (4 tokens), whose 2 tokens in the
    # columns of student token j's window are the ones inside it: 1/2 for every pair
    windows = pooling_windows(2, 4)
    student, teacher = avgpool_pairing(4, 16)
    assert torch.equal(student, torch.arange(4)) and teacher.shape == (4, 16)
    assert torch.equal(teacher, torch.arange(16)[None, :] // 4 == torch.arange(4)[:, None])  # row j: tokens 4j..4j+3
    assert window_hit_rate((student, teacher), windows) == 0.5
    # the student as the longer side: its segments are averaged the same way
    assert window_hit_rate(avgpool_pairing(16, 4), windows.T.contiguous()) == 0.5
    # equal counts: avgpool pools nothing
    assert all(torch.equal(side, torch.arange(16)) for side in avgpool_pairing(16, 16))
    # SigLIP 384 / 14 pooled to 12: a segment is ~5 tokens of one grid row, a window 3 columns of it
    assert window_hit_rate(avgpool_pairing(144, 729), pooling_windows(12, 27)) == pytest.approx(1 / 9)


def test_window_hit_rate_is_the_mean_over_each_pairs_tokens():
    # the definition, pair by pair, for every combination of index and segment sides
    gen = torch.Generator().manual_seed(0)
    windows = pooling_windows(3, 5)  # (9, 25), overlapping windows
    seg_s, seg_t = torch.rand(6, 9, generator=gen) < 0.3, torch.rand(6, 25, generator=gen) < 0.2
    seg_s[:, 0] = seg_t[:, 0] = True
    idx_s, idx_t = torch.randperm(9, generator=gen)[:6], torch.randperm(25, generator=gen)[:6]
    for student, teacher in [(idx_s, idx_t), (idx_s, seg_t), (seg_s, idx_t), (seg_s, seg_t)]:
        a = torch.nn.functional.one_hot(student, 9).bool() if student.dim() == 1 else student
        b = torch.nn.functional.one_hot(teacher, 25).bool() if teacher.dim() == 1 else teacher
        expected = sum(float(windows[a[m]][:, b[m]].double().mean()) for m in range(6)) / 6
        assert window_hit_rate((student, teacher), windows) == pytest.approx(expected, rel=1e-12)


def test_window_hit_rate_refuses_malformed_pairs():
    windows = pooling_windows(2, 4)
    with pytest.raises(ValueError, match=r"teacher token index out of range \[0, 16\): min 0, max 16"):
        window_hit_rate((torch.arange(2), torch.tensor([0, 16])), windows)
    with pytest.raises(ValueError, match="teacher side has 3 pairs, the other side 2"):
        window_hit_rate((torch.arange(2), torch.arange(3)), windows)
    with pytest.raises(ValueError, match="teacher segment 1 is empty"):
        window_hit_rate((torch.arange(2), torch.tensor([[True] + [False] * 15, [False] * 16])), windows)
    with pytest.raises(ValueError, match=r"token indices \[M\] \(integer\) or segments \[M, 16\] \(bool\)"):
        window_hit_rate((torch.arange(2), torch.zeros(2)), windows)
    with pytest.raises(ValueError, match="at least one pair"):
        window_hit_rate((torch.arange(0), torch.arange(0)), windows)
    with pytest.raises(ValueError, match=r"\[Ns, Nt\] bool"):
        window_hit_rate((torch.arange(2), torch.arange(2)), windows.float())


def test_batch_window_hits_measures_single_tile_samples_and_counts_the_others():
    windows = pooling_windows(2, 4)  # (4, 16)
    empty = torch.empty(0, dtype=torch.long)
    matches = [
        (torch.arange(4), torch.tensor([0, 3, 5, 15])),  # 0.75
        (empty, empty),  # text-only
        (torch.arange(20), torch.arange(20)),  # an AnyRes image: 20 student, 80 teacher tokens
        (torch.arange(4), torch.tensor([1, 2, 9, 11])),  # 1.0
    ]
    hits = batch_window_hits(matches, torch.tensor([4, 0, 20, 4]), torch.tensor([16, 0, 80, 16]), windows)
    assert (hits.samples, hits.skipped) == (2, 2) and hits.rate == pytest.approx(0.875)
    # per-sample matchings, "auto" (LLaVA-KD: Hungarian when the counts differ) among them
    same = batch_window_hits(matches, [4, 0, 20, 4], [16, 0, 80, 16], windows,
                             ["auto", "identity", "avgpool", "hungarian_hidden"])
    assert same == hits
    # avgpool's (arange, arange) are positions in the pooled sequences: the pairs come from the counts
    pooled = batch_window_hits([(torch.arange(4), torch.arange(4))], [4], [16], windows, "avgpool")
    assert (pooled.rate, pooled.samples) == (0.5, 1)
    # identity on equal counts (p == g): the student token is its own window
    assert batch_window_hits([(torch.arange(9), torch.arange(9))], [9], [9], pooling_windows(3, 3), "auto").rate == 1
    # nothing measured
    assert batch_window_hits([(empty, empty)], [0], [0], windows).rate is None


def test_batch_window_hits_errors_name_the_sample():
    windows = pooling_windows(2, 4)
    matches = [(torch.arange(4), torch.tensor([0, 1, 2, 3])), (torch.arange(3), torch.tensor([0, 1, 2]))]
    with pytest.raises(ValueError, match=r"sample 1: matching 'hungarian_logits' of 4 student and 16 .* 4 pairs"):
        batch_window_hits(matches, [4, 4], [16, 16], windows)
    with pytest.raises(ValueError, match=r"sample 0: teacher token index out of range"):
        batch_window_hits([(torch.arange(4), torch.tensor([0, 1, 2, 99]))], [4], [16], windows)
    with pytest.raises(ValueError, match="2 matches, 1 student counts, 2 teacher counts and 2 matchings"):
        batch_window_hits(matches, [4], [16, 16], windows)
    with pytest.raises(ValueError, match="matching must be one of"):
        batch_window_hits(matches[:1], [4], [16], windows, "nearest")


def test_window_hits_add_up_over_micro_batches():
    a, b = WindowHits(1.5, 2, 1), WindowHits(0.25, 1, 0)
    assert a + b == WindowHits(1.75, 3, 1) and (a + b).rate == pytest.approx(1.75 / 3)
    assert WindowHits().rate is None
    assert a.all_reduce() == a  # without a process group, the process's own sums


def test_batch_window_hits_of_the_losses_matches():
    # counts from the vision masks, as a trainer reads them; the avgpool value is fixed by the geometry
    student, teacher = make_pair([SampleSpec(2, 4, 16, 3, 4), SampleSpec(2, 0, 0, 3, 4), SampleSpec(1, 4, 16, 2, 3)])
    counts = (student.vision_mask.sum(1), teacher.vision_mask.sum(1))
    windows = pooling_windows(2, 4)
    out = EMKDLoss(matching="avgpool")(student, teacher)
    hits = batch_window_hits(out.matches, *counts, windows, "avgpool")
    assert (hits.rate, hits.samples, hits.skipped) == (0.5, 2, 1)
    out = LlavaKDLoss(matching="auto")(student, teacher)
    hits = batch_window_hits(out.matches, *counts, windows, "auto")
    assert hits.samples == 2 and 0.0 <= hits.rate <= 1.0


# ---- the measure means what it says: an oracle student ----------------------------------------------------------
def oracle_pair(samples: int, p: int = 12, g: int = 27, seed: int = 0, noise: float = 0.05):
    """EM-KD inputs whose student vision tokens are the exact ``p x p`` pools of a ``g x g`` teacher grid.

    Teacher token ``(r, c)`` of each sample is ``r*u + c*v + o`` plus Gaussian noise (``noise`` per coordinate,
    relative to a unit step on the grid), with ``u, v, o`` drawn per sample; both sides share one LM head, so a
    student token's logits are the mean of its window's teacher logits. For 27 -> 12 and 9 -> 4 every window is
    3 x 3, so a student token is (up to the noise) its window's centre token and any token outside the window is at
    least two grid steps away.
    """
    d = 16
    student, teacher = make_pair([SampleSpec(2, p * p, g * g, 3, 4)] * samples, ds=d, dt=d, vs=64, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    rc = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2).float()
    t_hidden, s_hidden = teacher.hidden.clone(), student.hidden.clone()
    for b in range(samples):
        basis = torch.randn(3, d, generator=gen)  # u, v, o
        grid = rc @ basis[:2] + basis[2] + noise * torch.randn(g * g, d, generator=gen)  # (g*g, D), raster order
        t_hidden[b, teacher.vision_mask[b]] = grid
        s_hidden[b, student.vision_mask[b]] = pool_patch_grid(grid[None], g, p)[0]  # (p*p, D), the student's pooling
    teacher = dataclasses.replace(teacher, hidden=t_hidden, head_weight=student.head_weight, head_bias=None)
    return dataclasses.replace(student, hidden=s_hidden), teacher


def hit_rate_bound(student, teacher, windows: torch.Tensor, b: int) -> float:
    """A lower bound on the hit rate of the Hungarian matching of sample ``b``, computed from its costs.

    With ``C_in`` the cost of the cheapest one-to-one matching inside the windows (one exists: module docstring of
    emkd.matching.quality) and ``d_out`` the cheapest pair outside them, the optimum costs at most ``C_in`` and at
    least ``d_out`` per pair outside a window, so it has at most ``C_in / d_out`` of them among its ``M`` pairs.
    """
    zs = student.logits(student.vision_tokens(b)).detach().double()  # (Ns, V)
    zt = teacher.logits(teacher.vision_tokens(b)).detach().double()  # (Nt, V)
    cost = l1_cost(zs, zt)  # (Ns, Nt)
    d_out = float(cost[~windows].min())
    fenced = torch.where(windows, cost, cost.max() * cost.shape[0] + 1.0)  # no pair outside a window is cheaper
    idx_s, idx_t = hungarian_match(fenced)
    assert bool(windows[idx_s, idx_t].all())
    c_in = float(cost[idx_s, idx_t].sum())
    return 1.0 - c_in / (d_out * windows.shape[0])


@pytest.mark.parametrize("implementation", ["fused", "naive"])
def test_hungarian_matching_of_an_oracle_student_lands_in_its_windows(implementation):
    student, teacher = oracle_pair(2)
    windows = pooling_windows(12, 27)
    bounds = [hit_rate_bound(student, teacher, windows, b) for b in range(2)]
    assert min(bounds) >= 0.9, f"the input is not the oracle it should be: bounds {bounds}"
    out = EMKDLoss(implementation=implementation)(student, teacher)
    rates = [window_hit_rate(pair, windows) for pair in out.matches]
    assert all(rate >= bound for rate, bound in zip(rates, bounds)), (rates, bounds)
    hits = batch_window_hits(out.matches, student.vision_mask.sum(1), teacher.vision_mask.sum(1), windows)
    assert hits.samples == 2 and hits.rate >= 0.9
    assert hits.rate > 50 * random_hit_rate(windows)


@pytest.mark.parametrize("p,g,samples", [(12, 27, 4), (4, 9, 64)])
def test_matching_an_oracle_student_to_shuffled_teacher_tokens_is_random(p, g, samples):
    # the oracle with each sample's teacher tokens in a random order: features no longer follow positions
    student, teacher = oracle_pair(samples, p, g, seed=1)
    windows = pooling_windows(p, g)
    assert batch_window_hits(EMKDLoss()(student, teacher).matches, [p * p] * samples, [g * g] * samples,
                             windows).rate >= 0.9
    gen = torch.Generator().manual_seed(1)
    teacher = permute_vision(teacher, [torch.randperm(g * g, generator=gen).tolist() for _ in range(samples)])
    hits = batch_window_hits(EMKDLoss()(student, teacher).matches, [p * p] * samples, [g * g] * samples, windows)
    baseline = random_hit_rate(windows)  # 1/81 and 1/9: every window is 3 x 3
    # a sample's rate has variance at most baseline * (1 - baseline) / p**2 (the pairs of a random one-to-one
    # matching are negatively correlated): the mean of the samples is within 4 standard deviations of the baseline
    sd = math.sqrt(baseline * (1 - baseline) / (p * p) / samples)
    assert hits.samples == samples and abs(hits.rate - baseline) < 4 * sd, (hits.rate, baseline, sd)


# ---- geometry of tiny real models -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS, vocab_size=300)


def adapter(tok, processor=None, **config):
    model = build_tiny_student(tok, **config)
    processor = processor or tiny_image_processor(model.config.tile_size)
    return EfficientMLLMAdapter(model, EfficientMLLMSide(tok, processor, model.config))


def test_pooling_geometry_of_a_pooled_student_and_a_vanilla_teacher(tok):
    student = adapter(tok)  # 32 px / 8 px: a 4 x 4 grid pooled to 2 x 2
    teacher = adapter(tok, compressor="none", text_hidden=48, seed=1)
    assert torch.equal(pooling_geometry(student, teacher), pooling_windows(2, 4))
    overlapping = adapter(tok, pool_size=3)
    assert torch.equal(pooling_geometry(overlapping, teacher), pooling_windows(3, 4))
    # a teacher known by its vision side alone, as a CachedTeacher is
    assert torch.equal(pooling_geometry(student, SimpleNamespace(side=teacher.side)), pooling_windows(2, 4))


def test_pooling_geometry_is_none_when_the_tokens_are_not_pools_of_one_grid(tok, caplog):
    student = adapter(tok)
    teacher = adapter(tok, compressor="none", seed=1)
    clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cases = {
        "compressor is 'none', not 'pool'": (adapter(tok, compressor="none"), teacher),
        "teacher's compressor is 'pool'": (student, adapter(tok, seed=1)),
        "AnyRes": (adapter(tok, anyres=True), teacher),
        r"\(image_size, patch_size\) differ: student \(32, 8\), teacher \(32, 4\)":
            (student, adapter(tok, compressor="none", patch_size=4)),
        r"student \(32, 8\), teacher \(64, 16\)": (student, adapter(tok, compressor="none", image_size=64,
                                                                   patch_size=16)),  # same 4 x 4 grid
        "resize, crop or pad differently": (student, adapter(tok, clip, compressor="none")),
    }
    with caplog.at_level(logging.INFO, logger="emkd.matching.quality"):
        for reason, (s, t) in cases.items():
            caplog.clear()
            assert pooling_geometry(s, t) is None, reason
            assert any(re.search(reason, r.getMessage()) for r in caplog.records), reason


def test_pooling_geometry_is_none_for_a_hugging_face_teacher(tok, caplog):
    model, image_processor, _ = TINY_TEACHERS["llava"](tok)
    teacher = HFTeacherAdapter(model, LlavaSide(None, model.config, tokenizer=tok, image_processor=image_processor))
    with caplog.at_level(logging.INFO, logger="emkd.matching.quality"):
        assert pooling_geometry(adapter(tok), teacher) is None
    assert "teacher's vision side is LlavaSide" in caplog.text


def test_match_in_window_of_tiny_models_on_rendered_data(tok, tmp_path):
    # the trainer's wiring: windows once from the adapters, counts from each side's vision mask, matches from the loss
    student = adapter(tok)
    teacher = adapter(tok, compressor="none", text_hidden=48, seed=1)
    windows = pooling_geometry(student, teacher)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    records = [
        {"id": "image", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the shape?"}, {"from": "gpt", "value": "it is blue"}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "how many dots are there?"}, {"from": "gpt", "value": "three dots"}]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    data = PairDataset(tmp_path / "train.json", tmp_path, student.side, teacher.side, max_length=256)
    batch = PairCollator(student.side, teacher.side)([data[0], data[1]])
    with torch.no_grad():
        s, t = student(batch["student"]).inputs, teacher(batch["teacher"]).inputs
        out = EMKDLoss()(s, t)
    hits = batch_window_hits(out.matches, s.vision_mask.sum(1), t.vision_mask.sum(1), windows)
    assert (hits.samples, hits.skipped) == (1, 1) and 0.0 <= hits.rate <= 1.0
    assert hits.rate == window_hit_rate(out.matches[0], windows)


# ---- the plot ---------------------------------------------------------------------------------------------------
def write_log(path, rates, random=None):
    lines = []
    for step, rate in enumerate(rates, start=1):
        record = {"step": step, "loss": 1.0, "objective": 1.0, "match_in_window": rate}
        if random is not None and step == 1:
            record["match_in_window_random"] = random
        lines.append(json.dumps(record))
    lines.insert(1, json.dumps({"step": 1, "train_runtime": 0.5}))  # a record without the key
    path.write_text("\n".join(lines) + '\n{"step": 9, "match_in_wi')  # cut short by a crash
    return path


def test_plot_match_quality_writes_a_png(tmp_path):
    logs = {
        "hungarian_logits": write_log(tmp_path / "a.jsonl", [0.1, 0.3, 0.6, 0.8], random=1 / 81),
        "avgpool": write_log(tmp_path / "b.jsonl", [1 / 9] * 4, random=1 / 81),
        "missing": tmp_path / "none.jsonl",
    }
    for baseline in (None, 1 / 81):
        out = plot_match_quality(logs, tmp_path / f"quality-{baseline}.png", baseline)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # runs that logged different baselines (different geometries) each get their own line
    logs["other"] = write_log(tmp_path / "c.jsonl", [0.2, 0.4], random=1 / 144)
    assert plot_match_quality(logs, tmp_path / "mixed.png", None).is_file()


def test_plot_match_quality_needs_a_logged_rate(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 1, "objective": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no 'match_in_window' record"):
        plot_match_quality({"kd": tmp_path / "log.jsonl"}, tmp_path / "q.png", None)


def test_runs_with_matches_are_those_that_logged_a_rate(tmp_path):
    """The demo draws the matching of the first run whose method paired vision tokens, whatever its name."""
    (tmp_path / "sft.jsonl").write_text(json.dumps({"step": 1, "objective": 1.0}) + "\n")
    (tmp_path / "kd.jsonl").write_text(json.dumps({"step": 1, "objective": 1.0, "match_in_window_random": 1 / 16}))
    logs = {
        "sft": tmp_path / "sft.jsonl",
        "kd": tmp_path / "kd.jsonl",  # the baseline alone: no pairs were matched
        "missing": tmp_path / "none.jsonl",
        "mine": write_log(tmp_path / "mine.jsonl", [0.2, 0.4]),
        "emkd": write_log(tmp_path / "emkd.jsonl", [0.3]),
    }
    assert runs_with_matches(logs) == ["mine", "emkd"]
    assert runs_with_matches({"sft": logs["sft"], "missing": logs["missing"]}) == []

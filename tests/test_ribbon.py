"""Align-TI's model-free pieces (SPEC §6): the ribbon attention mask of parallel TPA, the additive mask fed to
Hugging Face models, the instruction-to-vision attention ``a_l(x)`` and the Instruction Relevance Score."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import emkd
from emkd.losses import additive_attention_mask, instruction_relevance_score, instruction_vision_attention
from reference import ref_instruction_vision_attention, ref_irs

# ---- the ribbon mask ----------------------------------------------------------------------------------------------
# P = 2 prefix tokens, L = 2 response tokens, d = 2 candidates, laid out as
#   index:  0   1   2       3       4    5       6       7
#   token:  p0  p1  c1(1)   c1(2)   y1   c2(1)   c2(2)   y2
# prefix: causal; y_k: prefix + y_1..y_k; c_k(u): prefix + y_1..y_{k-1} + itself.
RIBBON_2_2_2 = [
    # p0 p1 c11 c12 y1 c21 c22 y2
    [1, 0, 0, 0, 0, 0, 0, 0],  # p0
    [1, 1, 0, 0, 0, 0, 0, 0],  # p1
    [1, 1, 1, 0, 0, 0, 0, 0],  # c1(1)
    [1, 1, 0, 1, 0, 0, 0, 0],  # c1(2)
    [1, 1, 0, 0, 1, 0, 0, 0],  # y1
    [1, 1, 0, 0, 1, 1, 0, 0],  # c2(1)
    [1, 1, 0, 0, 1, 0, 1, 0],  # c2(2)
    [1, 1, 0, 0, 1, 0, 0, 1],  # y2
]


def test_ribbon_mask_hand_written_table():
    allowed, position_ids = emkd.ribbon_attention_mask(prefix_len=2, response_len=2, num_candidates=2)
    assert allowed.dtype == torch.bool and allowed.shape == (8, 8)
    assert allowed.tolist() == [[bool(x) for x in row] for row in RIBBON_2_2_2]
    assert position_ids.dtype == torch.long
    assert position_ids.tolist() == [0, 1, 2, 2, 2, 3, 3, 3]


def roles(prefix_len: int, response_len: int, num_candidates: int) -> list[tuple[str, int]]:
    """``("prefix", i)``, ``("cand", k)`` or ``("gt", k)`` (k = 1..L) of every index of the augmented layout."""
    out = [("prefix", i) for i in range(prefix_len)]
    for k in range(1, response_len + 1):
        out += [("cand", k)] * num_candidates + [("gt", k)]
    return out


@pytest.mark.parametrize(
    ("P", "L", "d"), [(0, 3, 2), (3, 1, 4), (1, 4, 1), (4, 3, 3), (2, 0, 3), (5, 2, 4), (0, 0, 0), (3, 0, 0)]
)
def test_ribbon_mask_properties(P, L, d):
    allowed, position_ids = emkd.ribbon_attention_mask(P, L, d)
    T = P + L * (d + 1)
    assert allowed.shape == (T, T) and position_ids.shape == (T,)
    layout = roles(P, L, d)
    assert len(layout) == T
    gt_index = {k: q for q, (role, k) in enumerate(layout) if role == "gt"}
    for q, (role, k) in enumerate(layout):
        seen = set(allowed[q].nonzero().flatten().tolist())
        if role == "prefix":
            assert seen == set(range(q + 1))
            assert position_ids[q] == q
            continue
        assert position_ids[q] == P + k - 1
        prefix = set(range(P))
        if role == "gt":
            assert not any(layout[j][0] == "cand" for j in seen), f"y_{k} sees a candidate"
            assert seen == prefix | {gt_index[j] for j in range(1, k + 1)}
        else:
            assert seen == prefix | {gt_index[j] for j in range(1, k)} | {q}
    # no query sees the future, and everybody sees itself
    assert not torch.triu(allowed, diagonal=1).any()
    assert allowed.diagonal().all()


@pytest.mark.parametrize(("P", "L"), [(0, 4), (3, 5), (2, 1)])
def test_ribbon_mask_without_candidates_is_causal(P, L):
    allowed, position_ids = emkd.ribbon_attention_mask(P, L, 0)
    T = P + L
    assert torch.equal(allowed, torch.tril(torch.ones(T, T, dtype=torch.bool)))
    assert torch.equal(position_ids, torch.arange(T))


def test_ribbon_mask_rejects_negative_sizes():
    for args in [(-1, 2, 2), (2, -1, 2), (2, 2, -1)]:
        with pytest.raises(ValueError, match="non-negative"):
            emkd.ribbon_attention_mask(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_additive_mask(dtype):
    allowed, _ = emkd.ribbon_attention_mask(2, 2, 2)
    mask = additive_attention_mask(allowed, dtype)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == dtype
    assert (mask[0, 0][allowed] == 0).all()
    assert (mask[0, 0][~allowed] == torch.finfo(dtype).min).all()


def test_ribbon_mask_gives_parallel_causal_paths():
    """One masked attention pass over the augmented layout equals a separate causal pass per path."""
    P, L, d, D = 3, 3, 2, 8
    allowed, _ = emkd.ribbon_attention_mask(P, L, d)
    T = allowed.shape[0]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_attention_mask(allowed, torch.float64))
    layout = roles(P, L, d)
    gt = [i for i, (role, _) in enumerate(layout) if role == "gt"]
    for i, (role, step) in enumerate(layout):
        if role == "prefix":
            path = list(range(i + 1))
        elif role == "gt":
            path = list(range(P)) + gt[:step]
        else:
            path = list(range(P)) + gt[: step - 1] + [i]
        idx = torch.tensor(path)
        ref = F.scaled_dot_product_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], is_causal=True)[0, 0, -1]
        torch.testing.assert_close(out[0, 0, i], ref)


# ---- instruction -> vision attention ------------------------------------------------------------------------------
def test_instruction_vision_attention_hand_built():
    # one sample, L = 5: [system text, vision, vision, instruction, instruction]; two heads
    attention = torch.full((1, 2, 5, 5), 9.0)  # rows of non-instruction queries must be ignored
    attention[0, 0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    attention[0, 0, 4] = torch.tensor([0.0, 0.5, 0.1, 0.2, 0.2])
    attention[0, 1, 3] = torch.tensor([0.2, 0.4, 0.2, 0.2, 0.0])
    attention[0, 1, 4] = torch.tensor([0.1, 0.1, 0.3, 0.3, 0.2])
    vision = torch.tensor([[0, 1, 1, 0, 0]], dtype=torch.bool)
    instruction = torch.tensor([[0, 0, 0, 1, 1]], dtype=torch.bool)
    # key 1: (0.2 + 0.5 + 0.4 + 0.1) / 4 = 0.3; key 2: (0.3 + 0.1 + 0.2 + 0.3) / 4 = 0.225
    (a,) = instruction_vision_attention(attention, vision, instruction)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor([0.3, 0.225]))
    (a3,) = instruction_vision_attention(attention.mean(1), vision, instruction)  # head-averaged input
    torch.testing.assert_close(a3, torch.tensor([0.3, 0.225]))


def test_instruction_vision_attention_matches_reference():
    gen = torch.Generator().manual_seed(1)
    B, H, L = 3, 4, 12
    attention = torch.softmax(torch.randn(B, H, L, L, generator=gen), -1)
    vision = torch.zeros(B, L, dtype=torch.bool)
    instruction = torch.zeros(B, L, dtype=torch.bool)
    vision[0, 1:5], instruction[0, 5:9] = True, True
    vision[1, 3:9], instruction[1, 9:11] = True, True
    vision[2, 0:4] = True  # sample 2: vision tokens but no instruction
    out = instruction_vision_attention(attention, vision, instruction)
    ref = ref_instruction_vision_attention(attention, vision, instruction)
    for b in range(2):
        assert out[b].shape == (int(vision[b].sum()),)
        torch.testing.assert_close(out[b].double(), ref[b], rtol=1e-6, atol=1e-7)
    assert out[2].numel() == 0 and ref[2].numel() == 0  # no instruction tokens: an empty vector


# ---- instruction relevance score ----------------------------------------------------------------------------------
def test_irs_of_identical_inputs_is_zero():
    gen = torch.Generator().manual_seed(2)
    layer_vectors = torch.rand(4, 1, 9, generator=gen).expand(4, 6, 9)  # every input has the same a_l(x)
    torch.testing.assert_close(instruction_relevance_score(layer_vectors), torch.zeros(4), rtol=0, atol=1e-6)


def test_irs_hand_computed():
    layer_vectors = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # cos: 0, 1/sqrt2, 1/sqrt2 -> IRS = 1 - sqrt2 / 3
            [[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]],  # parallel -> IRS = 0
            [[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]],  # cos: -1, 0, 0 -> IRS = 4 / 3
        ]
    )
    irs = instruction_relevance_score(layer_vectors)
    assert irs.dtype == torch.float32 and irs.shape == (3,)
    torch.testing.assert_close(irs, torch.tensor([1 - math.sqrt(2) / 3, 0.0, 4 / 3]), rtol=1e-6, atol=1e-6)
    assert int(irs.argmax()) == 2  # l* = argmax_l IRS(l)


def test_irs_matches_reference_with_all_pairs():
    gen = torch.Generator().manual_seed(3)
    layer_vectors = torch.softmax(torch.randn(5, 7, 11, generator=gen) * 2, -1)  # 21 pairs <= 256
    torch.testing.assert_close(
        instruction_relevance_score(layer_vectors).double(), ref_irs(layer_vectors), rtol=1e-5, atol=1e-6
    )


def test_irs_with_fewer_pairs_averages_distinct_pairs():
    gen = torch.Generator().manual_seed(4)
    layer_vectors = torch.softmax(torch.randn(2, 6, 5, generator=gen) * 3, -1)  # 15 pairs
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    per_pair = torch.tensor(
        [[1.0 - float(F.cosine_similarity(vecs[i], vecs[j], dim=0)) for i, j in pairs] for vecs in layer_vectors]
    )  # (layers, 15)
    one = instruction_relevance_score(layer_vectors, num_pairs=1, seed=0)
    # one pair: the same pair for every layer, and exactly its 1 - cos
    hits = [(per_pair[:, p] - one).abs().max() < 1e-6 for p in range(15)]
    assert any(hits)
    some = instruction_relevance_score(layer_vectors, num_pairs=5, seed=1)
    assert torch.equal(some, instruction_relevance_score(layer_vectors, num_pairs=5, seed=1))  # seeded
    assert ((per_pair.min(1).values - 1e-6 <= some) & (some <= per_pair.max(1).values + 1e-6)).all()


def test_irs_needs_two_inputs():
    with pytest.raises(ValueError, match="N >= 2"):
        instruction_relevance_score(torch.rand(3, 1, 4))

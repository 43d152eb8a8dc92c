"""Invalid inputs raise ``ValueError`` saying what and where; degenerate-but-valid batches give exact, finite values.

SPEC §1-§3: different vocabularies under ``vocab="strict"``, different text or response counts (naming the sample),
``hungarian_hidden`` with different widths, ``identity`` with different token counts and non-finite hidden states at
real tokens are errors. Non-finite values at padding are not. A sample without vision tokens adds nothing to the
vision terms; a batch without response positions gives exact zeros, not NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import emkd
from conftest import SampleSpec as S
from conftest import make_pair, padding_positions, select, with_leaves
from emkd.losses import iva_loss

SAMPLES = (S(2, 3, 6, 2, 3, pad=1), S(1, 4, 7, 3, 2, pad=3), S(3, 2, 5, 1, 4, pad=2))


def _iva(student, teacher, **kwargs):
    weights = [torch.full((int(n),), 0.25) for n in teacher.vision_mask.sum(1)]
    iva, _ = iva_loss(student, teacher, weights, **kwargs)
    return iva


LOSSES = {
    "emkd": lambda **kw: emkd.EMKDLoss(**kw),
    "llava_kd": lambda **kw: emkd.LlavaKDLoss(**kw),
    "kd": lambda **kw: emkd.KDLoss(**kw),
    "iva": lambda **kw: (lambda s, t: _iva(s, t, **kw)),
}


def _call(name: str, student, teacher, **kwargs):
    return LOSSES[name](**kwargs)(student, teacher)


# ---- vocabularies -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOSSES))
def test_strict_vocab_mismatch_names_both_sizes(name):
    student, teacher = make_pair(SAMPLES, vs=37, vt=53)
    with pytest.raises(ValueError, match=r"V=37\b.*V=53\b") as info:
        _call(name, student, teacher)
    assert "crop" in str(info.value)  # says how to fix it
    student, teacher = make_pair(SAMPLES, vs=53, vt=37)
    with pytest.raises(ValueError, match=r"V=53\b.*V=37\b"):
        _call(name, student, teacher, vocab="strict")


@pytest.mark.parametrize("name", list(LOSSES))
def test_crop_rejects_labels_outside_the_smaller_head(name):
    student, teacher = make_pair(SAMPLES, vs=37, vt=53)
    labels = teacher.labels.clone()
    b, i = (labels != -100).nonzero()[0].tolist()
    labels[b, i] = 40  # fits the teacher's head (53), not the cropped one (37)
    teacher = dataclasses.replace(teacher, labels=labels)
    student = dataclasses.replace(student, labels=_labels_like(student, teacher))
    with pytest.raises(ValueError, match=r"V=37\b.*\b40\b"):
        _call(name, student, teacher, vocab="crop")


def _labels_like(student, teacher) -> torch.Tensor:
    """Student labels carrying the teacher's response targets (same order, the student's own positions)."""
    labels = student.labels.clone()
    for b in range(labels.shape[0]):
        labels[b][labels[b] != -100] = teacher.labels[b][teacher.labels[b] != -100]
    return labels


# ---- conversation mismatches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_text_token_count_mismatch_names_the_sample(name, side):
    student, teacher = make_pair(SAMPLES)
    target = teacher if side == "teacher" else student
    mask = target.attention_mask.clone()
    first_pad = int(mask[1].sum())
    mask[1, first_pad] = 1  # one more (text) token after sample 1's response
    target = dataclasses.replace(target, attention_mask=mask)
    student, teacher = (student, target) if side == "teacher" else (target, teacher)
    with pytest.raises(ValueError, match=r"sample 1\b.*text tokens") as info:
        _call(name, student, teacher)
    k = SAMPLES[1].prefix + SAMPLES[1].suffix + SAMPLES[1].response
    assert str(k) in str(info.value) and str(k + 1) in str(info.value)  # both counts


@pytest.mark.parametrize("name", list(LOSSES))
def test_response_count_mismatch_names_the_sample(name):
    student, teacher = make_pair(SAMPLES)
    labels = teacher.labels.clone()
    first = int((labels[2] != -100).nonzero()[0])
    labels[2, first] = -100  # the teacher supervises one response token fewer in sample 2
    teacher = dataclasses.replace(teacher, labels=labels)
    with pytest.raises(ValueError, match=r"sample 2\b.*\b4\b.*response.*\b3\b"):
        _call(name, student, teacher)


@pytest.mark.parametrize("name", list(LOSSES))
def test_response_target_mismatch_names_the_sample(name):
    student, teacher = make_pair(SAMPLES)
    labels = teacher.labels.clone()
    last = int((labels[1] != -100).nonzero()[-1])
    labels[1, last] = (labels[1, last] + 1) % 37
    teacher = dataclasses.replace(teacher, labels=labels)
    with pytest.raises(ValueError, match=r"sample 1\b.*labels differ"):
        _call(name, student, teacher)


@pytest.mark.parametrize("name", list(LOSSES))
def test_batch_size_mismatch(name):
    student, teacher = make_pair(SAMPLES)
    with pytest.raises(ValueError, match=r"B=3.*B=2"):
        _call(name, student, select(teacher, [0, 1]))


# ---- matching preconditions ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["emkd", "llava_kd", "iva"])
def test_hungarian_hidden_needs_equal_widths(name):
    student, teacher = make_pair(SAMPLES, ds=12, dt=16)
    with pytest.raises(ValueError, match=r"Ds=12.*Dt=16"):
        _call(name, student, teacher, matching="hungarian_hidden")


@pytest.mark.parametrize("name", ["emkd", "llava_kd", "iva"])
def test_identity_needs_equal_token_counts(name):
    samples = (S(2, 4, 4, 2, 3), S(1, 3, 6, 3, 2, pad=1))  # sample 0 balanced, sample 1 not
    student, teacher = make_pair(samples)
    with pytest.raises(ValueError, match=r"sample 1\b.*identity.*\b3\b.*\b6\b"):
        _call(name, student, teacher, matching="identity")


def test_vsd_hidden_with_different_widths_needs_a_projector():
    student, teacher = make_pair(SAMPLES, ds=12, dt=16)
    with pytest.raises(ValueError, match=r"Ds=12.*Dt=16.*projector"):
        emkd.EMKDLoss(vsd_target="hidden")(student, teacher)
    wrong = torch.nn.Linear(12, 15)
    with pytest.raises(ValueError, match=r"15"):
        emkd.EMKDLoss(vsd_target="hidden")(student, teacher, projector=wrong)


def test_iva_weights_must_cover_teacher_tokens():
    student, teacher = make_pair(SAMPLES)
    weights = [torch.ones(s.nt) for s in SAMPLES]
    weights[1] = torch.ones(SAMPLES[1].ns)  # student count by mistake
    with pytest.raises(ValueError, match=r"sample 1\b.*Nt=7.*\(4,\)"):
        iva_loss(student, teacher, weights)
    with pytest.raises(ValueError, match=r"B=3.*2"):
        iva_loss(student, teacher, weights[:2])


# ---- non-finite hidden states -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ["vision", "text"])
def test_non_finite_hidden_at_a_real_token_raises(name, side, bad, kind):
    student, teacher = make_pair(SAMPLES)
    target = teacher if side == "teacher" else student
    mask = target.vision_mask if kind == "vision" else target.attention_mask.bool() & ~target.vision_mask
    i = int(mask[1].nonzero()[-1])
    hidden = target.hidden.clone()
    hidden[1, i, 3] = bad
    target = dataclasses.replace(target, hidden=hidden)
    student, teacher = (student, target) if side == "teacher" else (target, teacher)
    with pytest.raises(ValueError, match=rf"{side} hidden states are not finite: sample 1, position {i}\b"):
        _call(name, student, teacher)


LOSS_VARIANTS = {
    **{f"emkd-{m}": ("emkd", dict(matching=m)) for m in ("hungarian_logits", "avgpool")},
    "emkd-vsd_hidden": ("emkd", dict(vsd_target="hidden")),
    **{f"llava_kd-{m}": ("llava_kd", dict(matching=m)) for m in ("auto", "avgpool")},
    **{f"kd-{d}": ("kd", dict(divergence=d)) for d in ("forward", "reverse", "jsd")},
    "iva": ("iva", dict()),
}


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hidden_at_padding_is_ignored(variant, bad):
    name, kwargs = LOSS_VARIANTS[variant]
    clean_s, clean_t = make_pair(SAMPLES, ds=12, dt=12, student_bias=True)
    hidden_s, hidden_t = clean_s.hidden.clone(), clean_t.hidden.clone()
    pads_s, pads_t = padding_positions(clean_s), padding_positions(clean_t)
    assert pads_s and pads_t
    for b, i in pads_s:
        hidden_s[b, i] = bad
    for b, i in pads_t:
        hidden_t[b, i] = bad
    student = with_leaves(dataclasses.replace(clean_s, hidden=hidden_s))
    teacher = with_leaves(dataclasses.replace(clean_t, hidden=hidden_t), requires_grad=False)
    out = _call(name, student, teacher, **kwargs)
    loss = out if name == "iva" else out.loss
    assert torch.isfinite(loss)

    clean_student = with_leaves(clean_s)
    clean = _call(name, clean_student, clean_t, **kwargs)
    clean_loss = clean if name == "iva" else clean.loss
    torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0)

    loss.backward()
    clean_loss.backward()
    assert torch.isfinite(student.head_weight.grad).all()
    torch.testing.assert_close(student.head_weight.grad, clean_student.head_weight.grad, rtol=1e-6, atol=1e-7)
    real = student.attention_mask.bool()
    torch.testing.assert_close(student.hidden.grad[real], clean_student.hidden.grad[real], rtol=1e-6, atol=1e-7)


# ---- samples without vision tokens --------------------------------------------------------------------------------
@pytest.mark.parametrize("counts", [(0, 0), (0, 5), (4, 0)], ids=["neither", "no_student", "no_teacher"])
@pytest.mark.parametrize("matching", ["hungarian_logits", "avgpool"])
def test_sample_without_vision_tokens_adds_nothing_to_vision_terms(counts, matching):
    ns, nt = counts
    samples = (S(2, 3, 6, 2, 3, pad=1), S(3, ns, nt, 2, 3, pad=2), S(1, 5, 4, 3, 2))
    student, teacher = make_pair(samples, ds=12, dt=16, seed=9)
    rest_s, rest_t = select(student, [0, 2]), select(teacher, [0, 2])

    full = emkd.EMKDLoss(matching=matching, vision_reduction="image_samples")(student, teacher)
    rest = emkd.EMKDLoss(matching=matching, vision_reduction="image_samples")(rest_s, rest_t)
    assert full.vsd.item() > 0 and full.vlad.item() > 0
    torch.testing.assert_close(full.vsd, rest.vsd, rtol=1e-6, atol=0)
    torch.testing.assert_close(full.vlad, rest.vlad, rtol=1e-6, atol=0)
    assert full.matches[1][0].numel() == 0 and full.matches[1][1].numel() == 0
    # the default (SPEC §3): the sample adds nothing to the sums, but it is one of the B = 3 samples they divide by
    full = emkd.EMKDLoss(matching=matching)(student, teacher)
    torch.testing.assert_close(full.vsd, rest.vsd * 2 / 3, rtol=1e-6, atol=0)
    torch.testing.assert_close(full.vlad, rest.vlad * 2 / 3, rtol=1e-6, atol=0)

    full = emkd.LlavaKDLoss(matching=matching)(student, teacher)
    rest = emkd.LlavaKDLoss(matching=matching)(rest_s, rest_t)
    torch.testing.assert_close(full.vis, rest.vis, rtol=1e-6, atol=0)
    torch.testing.assert_close(full.rel, rest.rel, rtol=1e-6, atol=0)
    assert full.matches[1][0].numel() == 0

    # IVA (SPEC §6): the mean over all B samples by default, over the vision pairs with token_mean
    weights = [torch.full((int(n),), 0.25) for n in teacher.vision_mask.sum(1)]
    full_iva, _ = iva_loss(student, teacher, weights)
    rest_iva, _ = iva_loss(rest_s, rest_t, [weights[0], weights[2]])
    torch.testing.assert_close(full_iva, rest_iva * 2 / 3, rtol=1e-6, atol=0)
    full_iva, _ = iva_loss(student, teacher, weights, normalisation="token_mean")
    rest_iva, _ = iva_loss(rest_s, rest_t, [weights[0], weights[2]], normalisation="token_mean")
    torch.testing.assert_close(full_iva, rest_iva, rtol=1e-6, atol=0)


def test_batch_without_vision_tokens_gives_exact_zero_vision_terms():
    samples = (S(3, 0, 0, 2, 3, pad=1), S(2, 0, 0, 3, 2))
    data_s, data_t = make_pair(samples)
    student = with_leaves(data_s)
    out = emkd.EMKDLoss()(student, data_t)
    assert out.vsd.item() == 0.0 and out.vlad.item() == 0.0
    llava = emkd.LlavaKDLoss()(student, data_t)
    assert llava.vis.item() == 0.0 and llava.rel.item() == 0.0
    iva, _ = iva_loss(student, data_t, [torch.zeros(0), torch.zeros(0)])
    assert iva.item() == 0.0
    (out.loss + llava.loss + iva).backward()
    assert torch.isfinite(student.hidden.grad).all() and student.hidden.grad.abs().sum() > 0


# ---- batches without response positions ---------------------------------------------------------------------------
NO_RESPONSE = (S(2, 3, 6, 2, 0, pad=1), S(1, 4, 5, 3, 0))


@pytest.mark.parametrize("variant", [v for v in LOSS_VARIANTS if v != "iva"])  # IVA has no response term
def test_batch_without_response_positions_gives_exact_zeros(variant):
    name, kwargs = LOSS_VARIANTS[variant]
    data_s, data_t = make_pair(NO_RESPONSE, ds=12, dt=12)
    student = with_leaves(data_s)
    out = _call(name, student, data_t, **kwargs)
    response_terms = {"emkd": ("sup", "rld"), "llava_kd": ("ce", "res"), "kd": ("ce", "kd")}[name]
    for term in response_terms:
        value = getattr(out, term)
        assert value.dim() == 0 and value.item() == 0.0, f"{term} = {value}"
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert student.hidden.grad is not None and torch.isfinite(student.hidden.grad).all()
    if name != "kd":  # the vision terms still train the student
        assert student.hidden.grad.abs().sum() > 0


# ---- constructor arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "kwargs", "pattern"),
    [
        (emkd.EMKDLoss, dict(matching="bogus"), "matching.*bogus"),
        (emkd.EMKDLoss, dict(matching="auto"), "matching.*auto"),
        (emkd.EMKDLoss, dict(vsd_target="bogus"), "vsd_target.*bogus"),
        (emkd.EMKDLoss, dict(vocab="bogus"), "vocab.*bogus"),
        (emkd.EMKDLoss, dict(temperature=0.0), "temperature"),
        (emkd.EMKDLoss, dict(temperature=-1.0), "temperature"),
        (emkd.LlavaKDLoss, dict(matching="bogus"), "matching.*bogus"),
        (emkd.LlavaKDLoss, dict(vocab="bogus"), "vocab.*bogus"),
        (emkd.LlavaKDLoss, dict(temperature=0.0), "temperature"),
        (emkd.LlavaKDLoss, dict(temperature=-2.0), "temperature"),
        (emkd.KDLoss, dict(divergence="bogus"), "divergence.*bogus"),
        (emkd.KDLoss, dict(vocab="bogus"), "vocab.*bogus"),
        (emkd.KDLoss, dict(temperature=0.0), "temperature"),
        (emkd.KDLoss, dict(divergence="jsd", jsd_beta=0.0), "jsd_beta"),
        (emkd.KDLoss, dict(divergence="jsd", jsd_beta=1.0), "jsd_beta"),
    ],
)
def test_invalid_constructor_arguments(factory, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        factory(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [(dict(matching="avgpool"), "matching"), (dict(matching="bogus"), "matching"), (dict(vocab="x"), "vocab")],
)
def test_iva_invalid_arguments(kwargs, pattern):
    student, teacher = make_pair(SAMPLES)
    with pytest.raises(ValueError, match=pattern):
        _iva(student, teacher, **kwargs)

"""Every loss against its naive float64 reference (tests/reference.py): values, matches and student gradients.

The batches are deliberately awkward: three right-padded samples of different lengths, the image at a different
offset in each sample, unequal vision token counts in both directions, unequal hidden sizes, LM-head biases on one
side only, ``vocab="crop"`` with different head sizes, temperatures other than 1 and non-default weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import emkd
from conftest import SampleSpec as S
from conftest import make_pair, with_leaves
from emkd.losses import iva_loss, iva_total
from reference import ref_emkd, ref_iva, ref_kd, ref_llava_kd

RTOL, ATOL = 1e-5, 1e-6  # float32 implementation against a float64 reference

# Both implementations of every loss: the fused one with a chunk far smaller than the vocabulary (37-41 here), so the
# online log-sum-exp really crosses chunk boundaries, including a last chunk shorter than the others; and with the
# default chunk (1024 rows on the CPU), where the vocabulary is one chunk: the backward pass reuses the forward pass's
# logits, and EM-KD and LLaVA-KD read their matched vision rows' logits from the matching (`given`).
IMPLEMENTATIONS = {"fused": dict(implementation="fused", chunk_size=8), "fused-one-chunk": dict(implementation="fused"),
                   "naive": dict(implementation="naive")}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def impl(request) -> dict:
    return IMPLEMENTATIONS[request.param]


@dataclass(frozen=True)
class Case:
    samples: tuple[S, ...]
    ds: int
    dt: int
    vs: int
    vt: int
    student_bias: bool
    teacher_bias: bool
    vocab: str = "strict"
    seed: int = 0

    def build(self):
        return make_pair(
            self.samples,
            ds=self.ds,
            dt=self.dt,
            vs=self.vs,
            vt=self.vt,
            student_bias=self.student_bias,
            teacher_bias=self.teacher_bias,
            seed=self.seed,
        )

    @property
    def balanced(self) -> bool:
        return all(s.ns == s.nt for s in self.samples)


CASES = {
    # the paper's setting: the efficient student has fewer vision tokens, and a narrower model
    "student_fewer": Case(
        (S(2, 4, 9, 3, 4, pad=1), S(5, 3, 7, 2, 3), S(1, 6, 8, 4, 5, pad=3)),
        ds=12, dt=20, vs=37, vt=37, student_bias=True, teacher_bias=False, seed=1,
    ),
    # the other way round, equal widths (so hungarian_hidden applies), teacher head larger, cropped
    "student_more": Case(
        (S(3, 8, 5, 2, 3, pad=2), S(1, 7, 4, 3, 4), S(4, 5, 3, 1, 2, pad=1)),
        ds=16, dt=16, vs=37, vt=53, student_bias=False, teacher_bias=True, vocab="crop", seed=2,
    ),
    # student fewer, equal widths, both biased
    "same_width": Case(
        (S(1, 5, 8, 2, 3), S(3, 2, 6, 3, 4, pad=2), S(2, 4, 4, 2, 2, pad=1)),
        ds=16, dt=16, vs=53, vt=53, student_bias=True, teacher_bias=True, seed=3,
    ),
    # student head larger, cropped to the teacher's; unequal widths
    "crop_student_larger": Case(
        (S(2, 3, 7, 2, 3, pad=2), S(4, 4, 6, 1, 5), S(1, 2, 5, 3, 2, pad=1)),
        ds=10, dt=14, vs=53, vt=37, student_bias=True, teacher_bias=True, vocab="crop", seed=4,
    ),
    # balanced token counts (original LLaVA-KD, identity matching), very different widths
    "balanced": Case(
        (S(2, 5, 5, 3, 3, pad=1), S(4, 3, 3, 2, 4), S(1, 6, 6, 2, 2, pad=2)),
        ds=8, dt=24, vs=37, vt=37, student_bias=False, teacher_bias=True, seed=5,
    ),
    # some samples balanced, some not ("auto" must decide per sample)
    "mixed": Case(
        (S(2, 4, 4, 3, 3, pad=1), S(3, 3, 6, 2, 4), S(1, 5, 5, 2, 3, pad=2)),
        ds=12, dt=16, vs=37, vt=37, student_bias=True, teacher_bias=False, seed=6,
    ),
}

EMKD_MATCHINGS = ("hungarian_logits", "hungarian_hidden", "avgpool", "identity")
EMKD_HPARAMS = {
    "default": dict(),
    "custom": dict(alpha=0.3, beta=0.8, gamma=4.0, temperature=2.0),
}
LLAVA_HPARAMS = {
    "default": dict(),
    "custom": dict(alpha=0.7, beta=1.3, gamma=2.0, temperature=1.5),
}


def _valid(case: Case, matching: str) -> bool:
    if matching == "identity":
        return case.balanced
    if matching == "hungarian_hidden":
        return case.ds == case.dt
    return True


def _combos(matchings):
    return [
        pytest.param(name, m, id=f"{name}-{m}") for name, case in CASES.items() for m in matchings if _valid(case, m)
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}"
    )


def assert_grads_close(actual: torch.Tensor | None, expected: torch.Tensor | None, what: str) -> None:
    assert actual is not None and expected is not None, f"{what}: missing gradient"
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the reference gradient is zero, the test would prove nothing"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=1e-5, atol=1e-6 * scale, msg=lambda m: f"grad {what}: {m}"
    )


def assert_matches(actual, expected) -> None:
    assert len(actual) == len(expected)
    for b, ((s, t), (rs, rt)) in enumerate(zip(actual, expected)):
        assert s.dtype == torch.long and t.dtype == torch.long
        assert s.tolist() == rs and t.tolist() == rt, f"sample {b}: matches {s.tolist()}, {t.tolist()} != {rs}, {rt}"


def _run(case: Case):
    """Float32 leaves for the implementation, float64 leaves with the same values for the reference."""
    student, teacher = case.build()
    return with_leaves(student), with_leaves(teacher, requires_grad=False), with_leaves(student, torch.float64), teacher


def _compare_student_grads(impl, ref) -> None:
    assert_grads_close(impl.hidden.grad, ref.hidden.grad, "student hidden")
    assert_grads_close(impl.head_weight.grad, ref.head_weight.grad, "student head weight")
    if impl.head_bias is not None:
        assert_grads_close(impl.head_bias.grad, ref.head_bias.grad, "student head bias")


# ---- EM-KD ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", list(EMKD_HPARAMS))
@pytest.mark.parametrize(("case_name", "matching"), _combos(EMKD_MATCHINGS))
def test_emkd_vsd_logits_matches_reference(case_name, matching, hp, impl):
    case = CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    kwargs = dict(EMKD_HPARAMS[hp], matching=matching, vocab=case.vocab)

    out = emkd.EMKDLoss(**kwargs, **impl)(student, teacher)
    ref = ref_emkd(student64, teacher_ref, **kwargs)

    for name in ("loss", "sup", "rld", "vsd", "vlad"):
        assert_close(getattr(out, name), ref[name], name)
    assert ref["vsd"].item() > 0 and ref["vlad"].item() > 0  # the vision terms are really exercised
    assert_matches(out.matches, ref["matches"])
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


@pytest.mark.parametrize(("case_name", "matching"), _combos(EMKD_MATCHINGS))
def test_emkd_vsd_hidden_matches_reference(case_name, matching, impl):
    case = CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    kwargs = dict(alpha=0.6, beta=0.9, gamma=2.0, temperature=0.7, matching=matching, vsd_target="hidden")
    kwargs["vocab"] = case.vocab
    projector = None
    if case.ds != case.dt:
        projector = torch.nn.Linear(case.ds, case.dt)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            projector.weight.copy_(torch.randn(case.dt, case.ds, generator=gen) / case.ds**0.5)
            projector.bias.copy_(torch.randn(case.dt, generator=gen) * 0.1)

    out = emkd.EMKDLoss(**kwargs, **impl)(student, teacher, projector=projector)
    ref = ref_emkd(student64, teacher_ref, projector=projector, **kwargs)

    for name in ("loss", "sup", "rld", "vsd", "vlad"):
        assert_close(getattr(out, name), ref[name], name)
    assert_matches(out.matches, ref["matches"])
    out.loss.backward()
    grad_proj = None if projector is None else projector.weight.grad.clone()
    if projector is not None:
        projector.zero_grad()
    ref["loss"].backward()
    _compare_student_grads(student, student64)
    if projector is not None:  # the trainer-owned projector learns from VSD
        assert_grads_close(grad_proj, projector.weight.grad, "projector weight")


# ---- LLaVA-KD -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", list(LLAVA_HPARAMS))
@pytest.mark.parametrize(
    ("case_name", "matching"), _combos(("auto", "hungarian_logits", "hungarian_hidden", "avgpool", "identity"))
)
def test_llava_kd_matches_reference(case_name, matching, hp, impl):
    case = CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    kwargs = dict(LLAVA_HPARAMS[hp], matching=matching, vocab=case.vocab)

    out = emkd.LlavaKDLoss(**kwargs, **impl)(student, teacher)
    ref = ref_llava_kd(student64, teacher_ref, **kwargs)

    for name in ("loss", "ce", "res", "vis", "rel"):
        assert_close(getattr(out, name), ref[name], name)
    assert ref["vis"].item() > 0 and ref["rel"].item() > 0
    assert_matches(out.matches, ref["matches"])
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


def test_llava_kd_auto_is_identity_per_sample(impl):
    """In the mixed batch, balanced samples pair i <-> i and the unbalanced one is Hungarian-matched."""
    case = CASES["mixed"]
    student, teacher, student64, teacher_ref = _run(case)
    out = emkd.LlavaKDLoss(**impl)(student, teacher)
    for b, s in enumerate(case.samples):
        idx_s, idx_t = out.matches[b]
        assert len(idx_s) == min(s.ns, s.nt)
        if s.ns == s.nt:
            assert idx_s.tolist() == list(range(s.ns)) and idx_t.tolist() == list(range(s.nt))
    explicit = ref_llava_kd(student64, teacher_ref, matching="hungarian_logits")
    unbalanced = [b for b, s in enumerate(case.samples) if s.ns != s.nt]
    assert unbalanced
    for b in unbalanced:
        assert out.matches[b][1].tolist() == explicit["matches"][b][1]


# ---- response-only KD -----------------------------------------------------------------------------------------------
KD_SETTINGS = {
    "forward-vanilla": dict(divergence="forward"),
    "forward-T": dict(divergence="forward", ce_weight=0.3, kd_weight=2.0, temperature=2.5),
    "reverse-minillm": dict(divergence="reverse", ce_weight=0.5, kd_weight=0.5),
    "reverse-T": dict(divergence="reverse", ce_weight=1.5, kd_weight=0.7, temperature=0.6),
    "jsd": dict(divergence="jsd"),
    "jsd-beta": dict(divergence="jsd", ce_weight=0.2, kd_weight=3.0, temperature=1.7, jsd_beta=0.2),
}


@pytest.mark.parametrize("setting", list(KD_SETTINGS))
@pytest.mark.parametrize("case_name", ["student_fewer", "student_more", "crop_student_larger"])
def test_kd_matches_reference(case_name, setting, impl):
    case = CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    kwargs = dict(KD_SETTINGS[setting], vocab=case.vocab)

    out = emkd.KDLoss(**kwargs, **impl)(student, teacher)
    ref = ref_kd(student64, teacher_ref, **kwargs)

    for name in ("loss", "ce", "kd"):
        assert_close(getattr(out, name), ref[name], name)
    assert ref["kd"].item() > 0
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


# ---- Align-TI IVA ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 1.8])
@pytest.mark.parametrize(
    ("case_name", "matching"), _combos(("auto", "hungarian_logits", "hungarian_hidden", "identity"))
)
def test_iva_matches_reference(case_name, matching, temperature, impl):
    case = CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    gen = torch.Generator().manual_seed(11)
    weights = [torch.softmax(torch.randn(s.nt, generator=gen) * 2, 0) for s in case.samples]  # (Nt_b,) each

    kwargs = dict(matching=matching, temperature=temperature, vocab=case.vocab)
    iva, matches = iva_loss(student, teacher, weights, **kwargs, **impl)
    ref, ref_matches = ref_iva(student64, teacher_ref, weights, **kwargs)

    assert_close(iva, ref, "iva")
    assert ref.item() > 0
    assert_matches(matches, ref_matches)
    iva.backward()
    ref.backward()
    _compare_student_grads(student, student64)


def test_iva_weights_select_teacher_tokens():
    """A one-hot weight on teacher token j makes IVA the KL of exactly the pair that holds j (mean over samples)."""
    case = CASES["student_more"]  # Ns > Nt: every teacher token is matched
    student, teacher, student64, teacher_ref = _run(case)
    weights = [torch.zeros(s.nt) for s in case.samples]
    for w in weights:
        w[1] = 1.0
    iva, _ = iva_loss(student, teacher, weights, vocab=case.vocab)
    ref, _ = ref_iva(student64, teacher_ref, weights, vocab=case.vocab)
    assert_close(iva, ref, "iva")
    doubled, _ = iva_loss(student, teacher, [2.0 * w for w in weights], vocab=case.vocab)
    assert_close(doubled, 2.0 * ref, "iva with doubled weights (a weighted sum, not a weighted mean)")


# ---- less regular inputs ------------------------------------------------------------------------------------------
def _drop_label(inputs, b: int, j: int):
    """Unsupervise the ``j``-th response token of sample ``b`` (a multi-turn conversation has gaps)."""
    labels = inputs.labels.clone()
    pos = (labels[b] != -100).nonzero().flatten()
    labels[b, pos[j]] = -100
    return dataclasses.replace(inputs, labels=labels)


@pytest.mark.parametrize("loss_name", ["emkd", "llava_kd", "kd"])
def test_gaps_in_the_response_match_reference(loss_name, impl):
    case = CASES["student_fewer"]
    student, teacher, student64, teacher_ref = _run(case)
    student, teacher = _drop_label(student, 2, 2), _drop_label(teacher, 2, 2)
    student64, teacher_ref = _drop_label(student64, 2, 2), _drop_label(teacher_ref, 2, 2)
    assert int(student.response_mask.sum()) == sum(s.response for s in case.samples) - 1
    if loss_name == "emkd":
        out, ref = emkd.EMKDLoss(temperature=1.3, **impl)(student, teacher), ref_emkd(student64, teacher_ref, temperature=1.3)
        names = ("loss", "sup", "rld")
    elif loss_name == "llava_kd":
        out, ref = emkd.LlavaKDLoss(**impl)(student, teacher), ref_llava_kd(student64, teacher_ref)
        names = ("loss", "ce", "res")
    else:
        out, ref = emkd.KDLoss("jsd", **impl)(student, teacher), ref_kd(student64, teacher_ref, divergence="jsd")
        names = ("loss", "ce", "kd")
    for name in names:
        assert_close(getattr(out, name), ref[name], name)
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_are_computed_in_float32(dtype, impl):
    """Half-precision hidden states and heads are upcast: the result is the float64 reference on the same values."""
    case = CASES["same_width"]
    student, teacher = case.build()
    student, teacher = with_leaves(student, dtype), with_leaves(teacher, dtype, requires_grad=False)
    student64 = with_leaves(student, torch.float64)
    out = emkd.EMKDLoss(temperature=1.5, **impl)(student, teacher)
    ref = ref_emkd(student64, teacher, temperature=1.5)
    for name in ("loss", "sup", "rld", "vsd", "vlad"):
        assert getattr(out, name).dtype == torch.float32, name
        assert_close(getattr(out, name), ref[name], name)
    assert_matches(out.matches, ref["matches"])


# ---- batch rules with a text-only sample (SPEC §3 and §6, revised) ---------------------------------------------
# one sample has no image at all: it adds nothing to VSD, VLAD, VIS, REL and IVA, but it is one of the B samples
TEXT_ONLY = Case(
    (S(2, 4, 9, 3, 4, pad=1), S(3, 0, 0, 2, 5), S(1, 6, 8, 4, 2, pad=3), S(2, 3, 5, 2, 3)),
    ds=16, dt=16, vs=37, vt=37, student_bias=True, teacher_bias=True, seed=7,
)


@pytest.mark.parametrize("vsd_target", ["logits", "hidden"])
@pytest.mark.parametrize("vision_reduction", ["batch", "image_samples"])
def test_emkd_vision_reduction_with_a_text_only_sample_matches_reference(vision_reduction, vsd_target, impl):
    student, teacher, student64, teacher_ref = _run(TEXT_ONLY)
    kwargs = dict(alpha=0.4, beta=0.7, gamma=3.0, temperature=1.3, vsd_target=vsd_target,
                  vision_reduction=vision_reduction)

    out = emkd.EMKDLoss(**kwargs, **impl)(student, teacher)
    ref = ref_emkd(student64, teacher_ref, **kwargs)

    for name in ("loss", "sup", "rld", "vsd", "vlad"):
        assert_close(getattr(out, name), ref[name], name)
    assert ref["vsd"].item() > 0 and ref["vlad"].item() > 0
    assert_matches(out.matches, ref["matches"])
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


def test_emkd_batch_rule_divides_by_every_sample(impl):
    """Listing 1's ``L_distill / batch_size``: with 3 of 4 samples holding an image, the batch rule's VSD and VLAD
    are 3/4 of the mean over image samples; SUP and RLD do not depend on the rule."""
    student, teacher = TEXT_ONLY.build()
    by_batch = emkd.EMKDLoss(**impl)(student, teacher)
    by_image = emkd.EMKDLoss(vision_reduction="image_samples", **impl)(student, teacher)
    assert emkd.EMKDLoss().vision_reduction == "batch"
    for name in ("vsd", "vlad"):
        torch.testing.assert_close(getattr(by_batch, name), 0.75 * getattr(by_image, name), rtol=1e-6, atol=0)
    for name in ("sup", "rld"):
        torch.testing.assert_close(getattr(by_batch, name), getattr(by_image, name), rtol=0, atol=0)
    with pytest.raises(ValueError, match="vision_reduction must be one of"):
        emkd.EMKDLoss(vision_reduction="samples")


def test_llava_kd_with_a_text_only_sample_matches_reference(impl):
    """SPEC §4 is unchanged: VIS is the mean over the batch's pairs, REL the mean over samples with a pair."""
    student, teacher, student64, teacher_ref = _run(TEXT_ONLY)
    out = emkd.LlavaKDLoss(**impl)(student, teacher)
    ref = ref_llava_kd(student64, teacher_ref)
    for name in ("loss", "ce", "res", "vis", "rel"):
        assert_close(getattr(out, name), ref[name], name)
    out.loss.backward()
    ref["loss"].backward()
    _compare_student_grads(student, student64)


@pytest.mark.parametrize("normalisation", ["token_sum", "token_mean"])
@pytest.mark.parametrize("case_name", ["text_only", "student_fewer", "student_more"])
def test_iva_normalisations_match_reference(case_name, normalisation, impl):
    case = TEXT_ONLY if case_name == "text_only" else CASES[case_name]
    student, teacher, student64, teacher_ref = _run(case)
    gen = torch.Generator().manual_seed(12)
    weights = [torch.softmax(torch.randn(s.nt, generator=gen) * 2, 0) for s in case.samples]  # (Nt_b,) each
    kwargs = dict(normalisation=normalisation, vocab=case.vocab)
    iva, matches = iva_loss(student, teacher, weights, **kwargs, **impl)
    ref, ref_matches = ref_iva(student64, teacher_ref, weights, **kwargs)
    assert_close(iva, ref, "iva")
    assert ref.item() > 0
    assert_matches(matches, ref_matches)
    iva.backward()
    ref.backward()
    _compare_student_grads(student, student64)
    if normalisation == "token_sum":  # the mean over all B samples: B times it is the sum over the batch
        total, _ = iva_total(student, teacher, weights, vocab=case.vocab, **impl)
        torch.testing.assert_close(iva * len(case.samples), total, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="normalisation must be one of"):
        iva_loss(student, teacher, weights, normalisation="mean")

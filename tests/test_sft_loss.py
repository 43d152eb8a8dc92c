"""``SFTLoss`` (the ``sft`` method's loss) against a naive float64 cross-entropy: values, terms and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import SampleSpec as S
from conftest import make_pair, with_leaves
from emkd.losses.sft import SFTLoss
from emkd.training.methods import METHODS, check_loss_options
from reference import cross_entropy, full_logits, mean, positions

IMPLEMENTATIONS = {"fused": dict(implementation="fused", chunk_size=8), "naive": dict(implementation="naive")}
# three right-padded samples of different lengths, one without an image, a vocabulary no chunk size divides
SAMPLES = (S(2, 4, 9, 3, 4, pad=1), S(5, 0, 7, 2, 3), S(1, 6, 8, 4, 5, pad=3))


def ref_sft(student) -> torch.Tensor:
    """``-(1/R) sum_r log softmax(z_r)[y_r]`` over the response positions, one float64 row at a time."""
    z = full_logits(student, student.head_weight.shape[0], detach=False)  # (B, L, V)
    rows = []
    for b in range(student.hidden.shape[0]):
        _, _, response, targets = positions(student, b)
        rows += [cross_entropy(z[b, i], y) for i, y in zip(response, targets)]
    return mean(rows)


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("bias", [False, True])
def test_sft_matches_reference(impl, bias):
    student, _ = make_pair(SAMPLES, ds=12, vs=37, student_bias=bias, seed=4)
    student, student64 = with_leaves(student), with_leaves(student, torch.float64)
    out = SFTLoss(**IMPLEMENTATIONS[impl])(student)
    ref = ref_sft(student64)
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    value = float(out.loss.detach())
    assert out.ce is out.loss and out.components() == {"loss": value, "ce": value}
    term = out.terms.terms["ce"]
    assert (term.weight, term.unit) == (1.0, "response_tokens") and out.terms.counts["response_tokens"] == 12
    torch.testing.assert_close(term.total.detach().double(), ref.detach() * 12, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    ref.backward()
    for name in ("hidden", "head_weight") + (("head_bias",) if bias else ()):
        expected = getattr(student64, name).grad
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(getattr(student, name).grad.double(), expected, rtol=1e-5, atol=1e-6 * scale,
                                   msg=lambda m: f"grad {name}: {m}")


def test_sft_without_response_positions_is_an_exact_zero_on_the_graph():
    student, _ = make_pair((S(2, 3, 4, 2, 0), S(1, 2, 3, 1, 0, pad=2)), seed=5)
    student = with_leaves(student)
    out = SFTLoss()(student)
    assert out.loss.item() == 0.0 and out.terms.counts["response_tokens"] == 0
    out.loss.backward()
    assert not student.hidden.grad.any()


def test_sft_method_takes_the_loss_options():
    assert METHODS["sft"].loss_callable() is SFTLoss
    assert set(METHODS["sft"].loss_options()) == {"implementation", "chunk_size"}
    assert check_loss_options("sft", {"implementation": "naive", "chunk_size": "16"}) == {
        "implementation": "naive", "chunk_size": 16}
    with pytest.raises(ValueError, match="implementation must be one of"):
        check_loss_options("sft", {"implementation": "fast"})

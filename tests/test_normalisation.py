"""Normalisation over an optimizer step (SPEC §3 and §6, revised): accumulation x micro-batch = batch.

* The losses: every term's unreduced sum and unit (``terms``) reproduce the loss's means exactly; a batch split into
  micro-batches (and over two simulated processes), each divided by the whole batch's counts, gives the whole batch's
  loss and gradient, where the mean of the micro-batches' means does not.
* The trainer: for every method, the summed gradient of one optimizer step with ``grad_accum=4, batch_size=2`` is
  the one of ``grad_accum=1, batch_size=8`` on the same 8 samples (answers of 2 to 8 tokens, one text-only
  sample), through ``get_batch_samples`` / ``training_step`` / ``compute_loss``, and through ``train()`` for EM-KD;
  with the per-micro-batch mean rule the same check fails.
* Align-TI's two normalisations against float64 sums recomputed from the augmented passes.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers import TrainerCallback

import emkd
from _workspace import build_workspace
from conftest import SampleSpec as S
from conftest import make_pair, select, with_leaves
from emkd.losses.align_ti import instruction_vision_attention
from emkd.training.align_ti import TPAOptions, align_ti_step, augmented_hidden, tpa_losses
from emkd.training.config import load_recipe
from emkd.training.methods import StepCounts, StepOutput, check_loss_options
from emkd.training.run import build_trainer
from reference import cross_entropy, full_logits, kl, positions, ref_iva

# ---- the losses ---------------------------------------------------------------------------------------------------
SAMPLES = (S(2, 4, 9, 3, 4, pad=1), S(3, 0, 0, 2, 5), S(1, 6, 8, 4, 1, pad=3), S(2, 3, 5, 2, 3), S(1, 5, 7, 2, 7),
           S(2, 2, 6, 3, 2, pad=2))
LOSSES = {
    "kd": lambda impl: emkd.KDLoss("forward", 0.7, 1.3, temperature=1.5, **impl),
    "rkl": lambda impl: emkd.KDLoss("reverse", 0.5, 0.5, **impl),
    "emkd": lambda impl: emkd.EMKDLoss(gamma=3.0, **impl),
    "emkd_image_samples": lambda impl: emkd.EMKDLoss(gamma=3.0, vision_reduction="image_samples", **impl),
    "emkd_hidden": lambda impl: emkd.EMKDLoss(gamma=3.0, vsd_target="hidden", matching="avgpool", **impl),
    "llava_kd": lambda impl: emkd.LlavaKDLoss(**impl),
}
IMPLEMENTATIONS = {"fused": dict(implementation="fused", chunk_size=8), "naive": dict(implementation="naive")}
SPLITS = {"process 0": [[0, 1], [2]], "process 1": [[3, 4, 5]]}  # two processes, three micro-batches


def _pair():
    return make_pair(SAMPLES, ds=16, dt=16, vs=37, student_bias=True, seed=3)


def _grads(inputs):
    return torch.cat([inputs.hidden.grad.flatten(), inputs.head_weight.grad.flatten(), inputs.head_bias.grad])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_terms_reproduce_the_loss_means(name, impl):
    student, teacher = _pair()
    out = LOSSES[name](IMPLEMENTATIONS[impl])(student, teacher)
    assert torch.equal(out.terms.loss(), out.loss)
    for key, value in out.terms.values().items():
        assert torch.equal(value, getattr(out, key)), key
    response = sum(s.response for s in SAMPLES)
    assert out.terms.counts == {"samples": 6, "response_tokens": response, "image_samples": 5,
                                "vision_pairs": sum(min(s.ns, s.nt) for s in SAMPLES)}


@pytest.mark.parametrize("name", list(LOSSES))
def test_micro_batches_over_two_processes_normalised_by_the_step_give_the_batch(name):
    """The trainer's rule at the loss level: each micro-batch's terms divided by the counts of the whole step, times
    the number of processes; summed over micro-batches and averaged over processes (as DDP does), this is the loss and
    the gradient of the whole batch. The mean of the micro-batches' means is not."""
    loss_fn = LOSSES[name](IMPLEMENTATIONS["fused"])
    student, teacher = _pair()
    whole_s, parts_s, means_s = with_leaves(student), with_leaves(student), with_leaves(student)
    whole = loss_fn(whole_s, teacher)
    whole.loss.backward()

    outs = {p: [loss_fn(select(parts_s, idx), select(teacher, idx)) for idx in groups] for p, groups in SPLITS.items()}
    totals = {unit: sum(o.terms.counts[unit] for os in outs.values() for o in os) for unit in whole.terms.counts}
    assert totals == whole.terms.counts
    per_process = []
    for os in outs.values():
        counts = StepCounts(totals, [o.terms.counts for o in os], processes=len(SPLITS))
        per_process.append(sum(StepOutput(o.loss, o.components(), o.terms).step_share(counts)[0] for o in os))
    step = sum(per_process) / len(SPLITS)  # DDP averages the processes' gradients
    step.backward()
    torch.testing.assert_close(step, whole.loss, rtol=1e-6, atol=0)
    assert _rel(_grads(parts_s), _grads(whole_s)) < 1e-5

    means = sum(loss_fn(select(means_s, idx), select(teacher, idx)).loss / len(groups)
                for groups in SPLITS.values() for idx in groups) / len(SPLITS)
    means.backward()
    assert _rel(_grads(means_s), _grads(whole_s)) > 1e-2  # the per-micro-batch rule weighs samples differently


def test_a_micro_batch_the_counts_do_not_describe_is_refused():
    student, teacher = _pair()
    out = emkd.KDLoss()(student, teacher)
    counts = StepCounts(dict(out.terms.counts), [{**out.terms.counts, "response_tokens": 3}])
    with pytest.raises(RuntimeError, match="micro-batch 0 of the optimizer step: response_tokens: the loss saw"):
        StepOutput(out.loss, out.components(), out.terms).step_share(counts)


def test_loss_options_of_the_normalisations_are_checked_when_the_recipe_loads():
    assert check_loss_options("align_ti", {"normalisation": "token_mean"}) == {"normalisation": "token_mean"}
    with pytest.raises(ValueError, match="normalisation must be one of"):
        check_loss_options("align_ti", {"normalisation": "mean"})
    assert check_loss_options("emkd", {"vision_reduction": "image_samples"}) == {"vision_reduction": "image_samples"}
    with pytest.raises(ValueError, match="vision_reduction must be one of"):
        check_loss_options("emkd", {"vision_reduction": "pairs"})


# ---- the trainer ----------------------------------------------------------------------------------------------------
# 8 samples: answers of 2 to 8 tokens, sample 3 without an image
ANSWERS = ["red", "the square is green", "blue", "one two three", "a small yellow square on a grey background",
           "the square is red green blue", "two three", "yellow"]
TEXT_ONLY = 3
MICRO_BATCHES = [[0, 1], [2, 3], [4, 5], [6, 7]]
METHOD_OPTIONS = {
    "sft": [],
    "kd": [],
    "rkl": [],
    "llava_kd": [],
    "emkd": [],
    "align_ti": ["irs_layer=1", "loss.sampling=greedy", "loss.num_candidates=2"],  # greedy: the same candidates
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("normalisation")
    ws = build_workspace(root / "ws", num_samples=8)
    records = []
    for i, answer in enumerate(ANSWERS):
        if i == TEXT_ONLY:
            conversation = [{"from": "human", "value": "how many squares are there?"}]
            records.append({"id": f"t{i}", "conversations": [*conversation, {"from": "gpt", "value": answer}]})
        else:
            conversation = [{"from": "human", "value": "<image>\nwhat colour is the square?"}]
            records.append({"id": f"q{i}", "image": f"{i}.png",
                            "conversations": [*conversation, {"from": "gpt", "value": answer}]})
    (root / "mixed.json").write_text(json.dumps(records))
    return {**ws, "mixed": root / "mixed.json"}


def _recipe(ws, out, method, *extra):
    return load_recipe(None, [f"student={ws['student']}", f"teacher={ws['teacher']}", f"data.train={ws['mixed']}",
                              f"data.images={ws['images']}", f"output_dir={out}", f"method={method}",
                              "max_grad_norm=0", "save_steps=0", "logging_steps=1", "lr_scheduler=constant",
                              "warmup_ratio=0", *METHOD_OPTIONS[method], *extra])


def _step(trainer, groups, counted=True):
    """One optimizer step's gradient (before any update) and the losses ``training_step`` returned, driving the
    trainer as transformers' loop does: ``get_batch_samples``, then ``training_step`` per micro-batch, the last one
    synchronising. ``counted=False`` passes no counts: the per-micro-batch mean rule."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    batches = [trainer.data_collator([trainer.train_dataset[i] for i in group]) for group in groups]
    if counted:
        batches, counts = trainer.get_batch_samples(iter(batches), len(batches), trainer.args.device)
    else:
        counts = None
    trainer.current_gradient_accumulation_steps = len(batches)
    losses = []
    for i, batch in enumerate(batches):
        trainer.accelerator.gradient_state._set_sync_gradients(i == len(batches) - 1)
        losses.append(trainer.training_step(model, batch, counts))
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return grads, losses


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_one_step_gradient_does_not_depend_on_accumulation(mixed, tmp_path, method):
    trainer = build_trainer(_recipe(mixed, tmp_path, method))
    whole, (loss,) = _step(trainer, [sum(MICRO_BATCHES, [])])
    accumulated, shares = _step(trainer, MICRO_BATCHES)
    assert _rel(accumulated, whole) < 1e-5, method
    torch.testing.assert_close(sum(shares), loss, rtol=1e-5, atol=0)  # what the Trainer logs as the step's loss

    # one micro-batch, one process: the loss is exactly the method's own mean
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    with torch.no_grad():
        own = trainer.method(trainer.student_adapter, trainer.teacher_adapter, batch, model=trainer.model).loss
    assert torch.equal(loss, own.detach()), (float(loss), float(own))

    per_micro_batch, _ = _step(trainer, MICRO_BATCHES, counted=False)
    assert _rel(per_micro_batch, whole) > 1e-3, method  # the old rule fails the check above


class _Grads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_train_loop_accumulation_gives_the_batch_gradient_loss_and_components(mixed, tmp_path):
    """Through ``Trainer.train()``: its prefetching, its sync flags, its division (or not) by the accumulation
    steps; the logged loss and components are those of the step."""
    runs = {}
    for batch_size, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"bs{batch_size}"
        trainer = build_trainer(_recipe(mixed, out, "emkd", "max_steps=1", f"batch_size={batch_size}",
                                        f"grad_accum={accumulation}"))
        grab = _Grads()
        trainer.add_callback(grab)
        trainer.train()
        logs = [json.loads(line) for line in open(out / "log.jsonl") if '"objective"' in line]
        runs[batch_size] = grab.grads, logs[0]
    (g8, log8), (g2, log2) = runs[8], runs[2]
    assert _rel(g2, g8) < 1e-5
    for key in ("loss", "objective", "sup", "rld", "vsd", "vlad"):
        assert log2[key] == pytest.approx(log8[key], rel=1e-5, abs=1e-6), key


# ---- Align-TI's normalisations against float64 sums ---------------------------------------------------------------
@pytest.mark.parametrize("normalisation", ["token_sum", "token_mean"])
def test_align_ti_normalisation_matches_float64_sums(mixed, tmp_path, normalisation):
    trainer = build_trainer(_recipe(mixed, tmp_path, "align_ti"))
    student, teacher = trainer.student_adapter, trainer.teacher_adapter
    batch = trainer.data_collator([trainer.train_dataset[i] for i in [1, TEXT_ONLY, 4, 6]])
    d = 2
    options = dict(num_candidates=d, sampling="greedy", iva_matching="auto")
    loss, parts = align_ti_step(student, teacher, batch, iva_layer=1, normalisation=normalisation, **options)

    # the same passes, then every row recomputed in float64 from their hidden states
    options = TPAOptions(num_candidates=d, sampling="greedy", teacher_attention_layer=1)
    out = tpa_losses(student, teacher, batch, options)
    s, t = out.student, out.teacher
    zs, zt = full_logits(s, s.vocab_size, detach=True), full_logits(t, t.vocab_size, detach=True)  # (B, L, V)
    with torch.no_grad():
        h_s = augmented_hidden(student, out.student_batch).double()  # (B, Ts, Ds)
        h_t = augmented_hidden(teacher, out.teacher_batch).double()  # (B, Tt, Dt)
    B = s.batch_size
    ce, kd, tpa = [torch.zeros((), dtype=torch.float64) for _ in range(3)]
    for b in range(B):
        _, _, response_s, targets = positions(s, b)
        _, _, response_t, _ = positions(t, b)  # the teacher's image has more tokens: its positions are shifted
        for i, j, y in zip(response_s, response_t, targets):
            ce = ce + cross_entropy(zs[b, i], y)
            kd = kd + kl(zt[b, j], zs[b, i], 1.0)  # forward: KL(teacher || student)
    def head64(side, h):  # [D] -> [V] float64 logits
        z = h @ side.head_weight.detach().double().T
        return z if side.head_bias is None else z + side.head_bias.detach().double()

    s_aug, t_aug = out.student_batch, out.teacher_batch
    for b, index_s, index_t in zip(s_aug["candidate_batch"], s_aug["candidate_index"], t_aug["candidate_index"]):
        for u in range(d):  # c_k^(u) on each side (the teacher's prefix is longer)
            tpa = tpa + kl(head64(t, h_t[b, int(index_t[u])]), head64(s, h_s[b, int(index_s[u])]), 1.0)
    R = int(s.response_mask.sum())
    weights = instruction_vision_attention(out.teacher_attention, t.vision_mask, t.instruction_mask)
    weights = [w if w.numel() else torch.zeros(int(n)) for w, n in zip(weights, t.vision_mask.sum(1))]
    iva, _ = ref_iva(s, t, weights, normalisation=normalisation)
    if normalisation == "token_sum":  # Eq. 2, 4, 7: sums over tokens, then the mean over the B samples
        expected = {"ce": ce / R, "kd": kd / B, "tpa": tpa / B, "iva": iva}
    else:
        expected = {"ce": ce / R, "kd": kd / R, "tpa": tpa / (R * d), "iva": iva}
    assert int(t.vision_mask[1].sum()) == 0 and float(iva.detach()) > 0  # a text-only sample counts, and adds nothing
    for key, value in expected.items():
        torch.testing.assert_close(parts[key].detach().double(), value, rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(loss.detach().double(), sum(expected.values()), rtol=1e-5, atol=1e-7)
    unit = "samples" if normalisation == "token_sum" else None
    assert parts["terms"].terms["kd"].unit == (unit or "response_tokens")
    assert parts["terms"].terms["iva"].unit == (unit or "vision_pairs")
    assert parts["terms"].terms["ce"].unit == "response_tokens"


def test_align_ti_default_is_the_papers_sum():
    assert inspect.signature(align_ti_step).parameters["normalisation"].default == "token_sum"
    assert inspect.signature(emkd.losses.iva_loss).parameters["normalisation"].default == "token_sum"

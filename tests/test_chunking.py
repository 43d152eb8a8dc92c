"""The vocabulary chunks of the fused losses: their bounds, and the chunk size chosen by device when a loss is given
none (1024 on the CPU, 8192 on CUDA; the device strings below need no GPU)."""

from __future__ import annotations

import pytest
import torch

import emkd.chunking as chunking
from conftest import SampleSpec as S
from conftest import make_pair, with_leaves
from emkd import EMKDLoss, KDLoss, LlavaKDLoss
from emkd.chunking import (CUDA_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, default_chunk_size, resolve_chunk_size,
                           vocab_chunks)
from emkd.losses import SFTLoss


def test_vocab_chunks_cover_the_vocabulary_once_in_order():
    assert list(vocab_chunks(37, 8)) == [(0, 8), (8, 16), (16, 24), (24, 32), (32, 37)]
    assert list(vocab_chunks(16, 8)) == [(0, 8), (8, 16)]
    assert list(vocab_chunks(5, 1024)) == [(0, 5)]
    assert list(vocab_chunks(0, 8)) == []


def test_the_cpu_keeps_the_measured_chunk_size():
    assert DEFAULT_CHUNK_SIZE == 1024
    assert default_chunk_size("cpu") == default_chunk_size(torch.device("cpu")) == DEFAULT_CHUNK_SIZE
    assert default_chunk_size(torch.randn(2).device) == DEFAULT_CHUNK_SIZE


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda", 1)])
def test_cuda_devices_get_the_larger_chunk_size(device):
    assert CUDA_CHUNK_SIZE == 8192
    assert default_chunk_size(device) == CUDA_CHUNK_SIZE
    assert resolve_chunk_size(None, device) == CUDA_CHUNK_SIZE


@pytest.mark.parametrize("device", ["meta", "mps", "xpu:0"])
def test_other_devices_get_the_cpu_chunk_size(device):
    assert default_chunk_size(device) == DEFAULT_CHUNK_SIZE


def test_an_explicit_chunk_size_wins_on_every_device():
    for device in ("cpu", "cuda:0", "meta"):
        assert resolve_chunk_size(7, device) == 7
    with pytest.raises(ValueError, match=r"^chunk_size must be >= 1, got 0$"):
        resolve_chunk_size(0, "cpu")


LOSSES = {"emkd": EMKDLoss, "llava_kd": LlavaKDLoss, "kd": KDLoss, "sft": SFTLoss}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_without_chunk_size_take_the_device_default(name, monkeypatch):
    """A loss built without ``chunk_size`` asks :func:`default_chunk_size` for its inputs' device at every chunked
    call and computes what it computes with that size given explicitly; an explicit size never asks."""
    asked = []

    def fake_default(device):  # a small size, so that the tiny vocabulary really is cut into chunks
        asked.append(torch.device(device).type)
        return 5

    monkeypatch.setattr(chunking, "default_chunk_size", fake_default)
    loss_cls = LOSSES[name]
    assert loss_cls().chunk_size is None
    student, teacher = make_pair((S(2, 4, 9, 3, 4), S(1, 3, 7, 2, 3, pad=1)), vs=37, student_bias=True, seed=2)
    values = {}
    for key, loss_fn in (("default", loss_cls()), ("explicit", loss_cls(chunk_size=5))):
        s = with_leaves(student)
        out = loss_fn(s) if name == "sft" else loss_fn(s, teacher)
        out.loss.backward()
        values[key] = (out.loss.detach(), s.hidden.grad, s.head_weight.grad)
        if key == "default":
            assert asked and set(asked) == {"cpu"}
            asked.clear()
    assert not asked
    for got, want in zip(values["default"], values["explicit"]):
        assert torch.equal(got, want)

"""Attention recording (:mod:`emkd.models.attention`) on a tiny random Qwen2 language model run with SDPA.

What is recorded equals ``output_attentions=True`` under eager attention (exactly in the first layer, up to float
rounding after layers that ran SDPA); only the recorded layers run eager attention; the switch and the hooks last
exactly as long as the block, whether it ends normally, by an exception raised in the block, or by an exception
raised inside the forward (a layer that returns no weights).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from emkd.models.attention import (
    MIXED_IMPLEMENTATION,
    cast_additive_mask,
    eager_attention,
    hooked_attention,
    recorded_attention,
)

NUM_LAYERS = 3


@pytest.fixture(scope="module")
def model():
    config = Qwen2Config(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def inputs():
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, L)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def implementation(model) -> str:
    return model.get_decoder().config._attn_implementation


def hooks(model) -> int:
    """Forward hooks on the attention modules (transformers keeps some of its own once attentions were output)."""
    return sum(len(layer.self_attn._forward_hooks) for layer in model.get_decoder().layers)


def test_recorded_attention_is_the_head_mean_of_eager_attention(model, inputs):
    with torch.no_grad(), eager_attention(model):
        reference = model(**inputs, output_attentions=True).attentions  # per layer (B, H, L, L)
    before = hooks(model)
    for layer in (0, NUM_LAYERS - 1, -1):
        with torch.no_grad(), recorded_attention(model, layer) as record:
            assert record.attention is None and implementation(model) == MIXED_IMPLEMENTATION
            model(**inputs)
        assert record.layer == layer and record.attention.dtype == torch.float32
        # the first layer reads the same inputs as under eager attention; later ones read SDPA layers' outputs
        exact = layer == 0
        torch.testing.assert_close(record.attention, reference[layer].float().mean(1),
                                   atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)
        assert implementation(model) == "sdpa" and hooks(model) == before


def test_only_the_recorded_layer_runs_eager_attention(model, inputs):
    """The other layers return no probabilities (SDPA) inside the block, and the forward's logits are the plain
    SDPA forward's up to float rounding."""
    returned: dict[int, bool] = {}
    layers = model.get_decoder().layers
    handles = [layers[i].self_attn.register_forward_hook(
        lambda _m, _a, out, i=i: returned.__setitem__(i, out[1] is not None)) for i in range(NUM_LAYERS)]
    try:
        with torch.no_grad():
            plain = model(**inputs).logits
            with recorded_attention(model, 1):
                recorded = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    assert returned == {0: False, 1: True, 2: False}
    torch.testing.assert_close(recorded, plain, atol=1e-6, rtol=1e-5)
    assert not any(hasattr(layer.self_attn, "_emkd_eager_layer") for layer in layers)


def test_hooked_attention_hands_every_layer_over_in_one_forward(model, inputs):
    kept: dict[int, torch.Tensor] = {}
    with torch.no_grad(), hooked_attention(model, range(NUM_LAYERS), lambda l, w: kept.__setitem__(l, w)):
        model(**inputs)
    assert sorted(kept) == list(range(NUM_LAYERS))
    for layer, weights in kept.items():
        assert weights.shape == (2, 4, 9, 9)
        with torch.no_grad(), recorded_attention(model, layer) as record:
            model(**inputs)
        # every layer eager in one forward, one layer eager in the other: equal up to float rounding
        torch.testing.assert_close(weights.float().mean(1), record.attention, atol=1e-6, rtol=1e-5)


def test_an_exception_in_the_block_restores_the_implementation(model, inputs):
    before = hooks(model)
    with pytest.raises(KeyError, match="raised in the block"):
        with recorded_attention(model, 1):
            assert implementation(model) == MIXED_IMPLEMENTATION and hooks(model) == before + 1
            raise KeyError("raised in the block")
    assert implementation(model) == "sdpa" and hooks(model) == before


def test_a_layer_without_weights_raises_and_restores(model, inputs):
    """A hook registered first replaces layer 1's output by one without weights; recording it raises from inside
    the forward, and the block still restores the implementation and removes its hook."""
    before = hooks(model)
    drop = model.get_decoder().layers[1].self_attn.register_forward_hook(lambda _m, _a, out: (out[0], None))
    try:
        with pytest.raises(RuntimeError, match="decoder layer 1's attention returned no weights under eager attention"):
            with torch.no_grad(), recorded_attention(model, 1):
                model(**inputs)
        assert implementation(model) == "sdpa" and hooks(model) == before + 1  # only `drop` is left
    finally:
        drop.remove()


def test_out_of_range_layers_are_refused_before_anything_changes(model):
    before = hooks(model)
    for layer in (NUM_LAYERS, -NUM_LAYERS - 1):
        with pytest.raises(ValueError, match=f"attention_layer={layer} is out of range for a decoder with 3 layers"):
            with recorded_attention(model, layer):
                pass
    assert implementation(model) == "sdpa" and hooks(model) == before


def test_an_eager_model_stays_eager(model, inputs):
    model.get_decoder().set_attn_implementation("eager")
    try:
        with pytest.raises(ZeroDivisionError):
            with recorded_attention(model, 0):
                1 / 0
        assert implementation(model) == "eager"
    finally:
        model.get_decoder().set_attn_implementation("sdpa")


def test_cast_additive_mask():
    allowed = torch.tensor([[True, False], [True, True]])
    mask = torch.zeros(1, 1, 2, 2).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    assert cast_additive_mask(mask, torch.float32, torch.device("cpu")) is mask
    half = cast_additive_mask(mask, torch.bfloat16, torch.device("cpu"))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half == 0, allowed[None, None]) and half.min() == torch.finfo(torch.bfloat16).min

"""Attention probabilities of chosen decoder layers, read during a forward (Align-TI Eq. 3-4; SPEC §6).

Align-TI's IRS and IVA read ``a_l(x)`` from the attention probabilities ``[B, H, L, L]`` of teacher layer ``l``.
Only the "eager" implementation computes them (SDPA and flash attention never form the map), so:

* :func:`eager_attention` runs a model's language model (``model.get_decoder()``) with eager attention inside a
  block and restores the previous implementation however the block exits, exceptions included. The vision tower
  keeps its own implementation. Eager and SDPA agree up to float rounding, so the hidden states of a recorded forward
  may differ from an unrecorded one in the last bits.
* :func:`eager_layers` does the same for chosen decoder layers only, when the model runs SDPA: those layers run their
  model's own eager attention and every other layer keeps SDPA (a ``transformers`` attention implementation of this
  module's, registered through ``AttentionInterface``, with the eager implementation's additive 4D mask, which SDPA
  reads too). Reading one layer's map then costs one eager layer, not a whole eager decoder (Align-TI's IVA: one
  layer of the teacher's, at every step). A model on another implementation falls back to :func:`eager_attention`.
* :func:`hooked_attention` hands each chosen layer's probabilities to ``keep(layer, weights)`` as that layer runs,
  through a forward hook on its attention module, so no ``[B, H, L, L]`` map outlives its layer (IRS reduces every
  layer in one forward this way). ``output_attentions=True`` would keep every layer's map alive instead: 28 layers of
  a 7B teacher at 3,000 tokens are tens of GB.
* :func:`recorded_attention` keeps the head-averaged probabilities ``[B, L, L]`` (float32) of one layer: what
  ``adapter(batch, attention_layer=l)`` returns and what IVA weighs its vision tokens with.

Any model whose ``get_decoder()`` has ``layers[i].self_attn`` and ``set_attn_implementation`` works: the student
class and every Hugging Face teacher. :func:`cast_additive_mask` puts Align-TI's additive 4D mask in a model's dtype.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

#: ``keep(layer, weights)``: called with a layer's index (as the caller named it) and its ``[B, H, L, L]`` weights
AttentionKeeper = Callable[[int, torch.Tensor], None]


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model.get_decoder()`` with eager attention inside the block; restore its previous implementation on
    exit, exceptions included (nothing is switched when it already is eager)."""
    decoder = model.get_decoder()
    previous = decoder.config._attn_implementation
    if previous == "eager":
        yield
        return
    decoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        decoder.set_attn_implementation(previous)


#: the attention implementation of :func:`eager_layers`: eager in the marked layers, SDPA in the others
MIXED_IMPLEMENTATION = "emkd_eager_layers"
_EAGER_MARK = "_emkd_eager_layer"


def _mixed_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    """Eager attention (the module's own model's ``eager_attention_forward``, which returns the probabilities) in a
    layer :func:`eager_layers` marked, SDPA elsewhere; both read the same additive 4D mask."""
    if getattr(module, _EAGER_MARK, False):
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward; record attention under "
                               "eager_attention(model) instead")
        return eager(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(MIXED_IMPLEMENTATION, _mixed_attention)
AttentionMaskInterface.register(MIXED_IMPLEMENTATION, eager_mask)


@contextmanager
def eager_layers(model: torch.nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Run decoder layers ``layers`` of ``model.get_decoder()`` (negative counts from the end) with eager attention
    inside the block and the other layers with SDPA, when the decoder runs SDPA (else the whole decoder runs eager:
    :func:`eager_attention`); restore the implementation and the layers however the block exits."""
    decoder = model.get_decoder()
    previous = decoder.config._attn_implementation
    if previous != "sdpa":
        with eager_attention(model):
            yield
        return
    modules = [decoder.layers[layer].self_attn for layer in layers]
    # the config every layer shares and reads at each forward; restored below
    decoder.config._attn_implementation = MIXED_IMPLEMENTATION
    try:
        for module in modules:
            setattr(module, _EAGER_MARK, True)
        yield
    finally:
        for module in modules:
            if hasattr(module, _EAGER_MARK):
                delattr(module, _EAGER_MARK)
        decoder.config._attn_implementation = previous


def _keep_weights(layer: int, keep: AttentionKeeper) -> Callable[[torch.nn.Module, Any, Any], None]:
    """A forward hook on layer ``layer``'s attention module that hands its probabilities to ``keep``."""

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(f"decoder layer {layer}'s attention returned no weights under eager attention")
        keep(layer, weights)  # (B, H, L, L)

    return hook


@contextmanager
def hooked_attention(model: torch.nn.Module, layers: Iterable[int], keep: AttentionKeeper) -> Iterator[None]:
    """Call ``keep(layer, weights)`` with the attention probabilities ``[B, H, L, L]`` of every decoder layer in
    ``layers`` (negative counts from the end) during the forwards run inside the block: those layers run eager
    attention, the others keep SDPA (:func:`eager_layers`).

    Hooks and implementation are restored however the block exits. A layer whose attention returns no weights
    raises ``RuntimeError`` from inside the forward.

    Raises:
        ValueError: a layer is out of range (before anything is switched).
    """
    decoder_layers = model.get_decoder().layers
    layers = list(layers)
    for layer in layers:
        if not -len(decoder_layers) <= layer < len(decoder_layers):
            raise ValueError(f"attention_layer={layer} is out of range for a decoder with {len(decoder_layers)} layers")
    with eager_layers(model, layers):
        handles = []
        try:
            for layer in layers:
                handles.append(decoder_layers[layer].self_attn.register_forward_hook(_keep_weights(layer, keep)))
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class AttentionRecord:
    """What :func:`recorded_attention` kept of decoder layer ``layer``: the head-averaged probabilities
    ``attention`` ``[B, L, L]`` (float32, query by key) of the last forward run in its block, ``None`` before one."""

    layer: int
    attention: torch.Tensor | None = None


@contextmanager
def recorded_attention(model: torch.nn.Module, layer: int) -> Iterator[AttentionRecord]:
    """Record the head-averaged attention probabilities ``[B, L, L]`` (float32) of decoder layer ``layer``
    (negative counts from the end) during the forwards run inside the block, as ``record.attention``.

    Layer ``layer`` runs eager attention inside the block, the language model's other layers SDPA
    (:func:`eager_layers`).
    """
    record = AttentionRecord(layer)

    def keep(_layer: int, weights: torch.Tensor) -> None:
        record.attention = weights.float().mean(dim=1)  # (B, H, L, L) -> (B, L, L)

    with hooked_attention(model, [layer], keep):
        yield record


def cast_additive_mask(mask: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive float mask (0 allowed, ``finfo.min`` masked) in ``dtype`` on ``device``: the same tensor when the
    dtype already matches, else 0 / ``finfo(dtype).min`` rebuilt from where it is negative."""
    mask = mask.to(device)
    if mask.dtype == dtype:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(mask < 0, torch.finfo(dtype).min)


__all__ = [
    "AttentionKeeper",
    "AttentionRecord",
    "cast_additive_mask",
    "eager_attention",
    "eager_layers",
    "hooked_attention",
    "recorded_attention",
]

"""The efficient student MLLM: vision tower -> 2D adaptive average pooling -> 2-layer MLP projector -> causal LM.

Where the design comes from: EM-KD §3 builds its efficient baseline (and student) as LLaVA-NeXT whose projector
"first compress[es] vision features using Adaptive Average Pooling, followed by a two-layer MLP", keeping at most
144 vision tokens per image tile (``pool_size = 12``), with Qwen2 as the LLM and SigLIP as the vision tower. The
same class with ``compressor="none"`` is a vanilla LLaVA-style model that keeps every patch token, which is what the
tests use as a small teacher with many more vision tokens.

Pipeline for one image tile (``g = image_size // patch_size``, ``p = pool_size``)::

    pixel_values (T, 3, S, S)
      -> vision_tower, hidden_states[vision_feature_layer]     (T, g*g [+1 CLS], Dv); a CLS token is dropped
      -> compressor "pool": adaptive_avg_pool2d on the g x g grid   (T, p*p, Dv), raster order
         compressor "none": unchanged                               (T, g*g, Dv)
      -> projector Linear(Dv, D) -> GELU -> Linear(D, D)            (T, N, D)

The projected features replace, in order, the positions where ``input_ids == image_token_id``.

AnyRes (``anyres=True``, LLaVA-NeXT): an image of size ``(h, w)`` is fitted to the best resolution of
``image_grid_pinpoints`` (``transformers.image_processing_utils.select_best_resolution``), cut into
``rows x cols`` tiles of the tower's image size, and preceded by a base view (the whole image resized to one tile).
Each view is compressed independently; an image's tokens are the base view's then the tiles' in raster order, so it
expands to ``(1 + rows * cols) * tokens_per_tile`` tokens. Unlike LLaVA-NeXT we do not unpad the tile grid to the
original aspect ratio and we add no ``image_newline`` token: every tile keeps its full ``p x p`` grid.

Outputs: besides ``logits`` and ``loss`` the forward returns ``hidden``, the final hidden states *after the final
norm* exactly as the LM head consumes them (``logits == hidden @ lm_head.weight.T``, SPEC §1), and ``vision_mask``,
the positions that were filled with image features. ``hidden`` is the ``last_hidden_state`` of the language model's
decoder (``language_model.get_decoder()``), which every Hugging Face decoder returns after its final norm, rather than
``hidden_states[-1]`` of ``output_hidden_states=True`` (post-norm in Qwen2, but not in every family, and it would keep
every layer's states alive). Language models that rescale or soft-cap their logits are refused, since then
``logits`` would not be an affine function of ``hidden``.

This file is also the student's remote code: ``save_pretrained`` copies it next to the checkpoint and writes
``auto_map`` (``AutoConfig``, ``AutoModelForCausalLM``, ``AutoProcessor`` -> :class:`EfficientMLLMProcessor`) into
``config.json``, so ``from_pretrained(directory, trust_remote_code=True)`` loads it where emkd is not installed. It
must therefore import only torch, transformers (and huggingface_hub) at module level, with no relative imports;
``tests/test_hub_student.py`` loads a saved copy in a Python that cannot import emkd. Only inside emkd are the
classes registered with the Auto classes, so emkd keeps loading its checkpoints without ``trust_remote_code``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BatchFeature,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.configuration_utils import SubConfigSpec
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import ModelOutput

try:  # inside emkd, the releases' differences are resolved in one place, emkd.compat
    if not __name__.startswith("emkd."):
        raise ImportError(__name__)
    from emkd.compat import CACHE_KEY, pop_cache
except ImportError:  # this file saved next to a checkpoint and loaded as remote code: emkd.compat's logic, inlined
    import inspect as _inspect

    CACHE_KEY = (
        "cache" if "cache" in _inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
        else "past_key_values"
    )

    def pop_cache(kwargs: dict[str, Any]) -> Any:
        found = {name: kwargs.pop(name) for name in ("cache", "past_key_values") if kwargs.get(name) is not None}
        for name in ("cache", "past_key_values"):
            kwargs.pop(name, None)
        if len(found) > 1:
            raise ValueError("pass the decoder cache once, as `cache` or as `past_key_values`, not both")
        return next(iter(found.values()), None)

COMPRESSORS = ("pool", "none")
IMAGE_TOKEN = "<image>"
# Attributes of a text config that make logits something other than ``hidden @ W.T (+ b)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


# ---- configuration ----------------------------------------------------------------------------------------------
@strict
class EfficientMLLMConfig(PreTrainedConfig):
    r"""Configuration of :class:`EfficientMLLMForCausalLM`.

    ``vision_config`` and ``text_config`` are any Hugging Face vision-tower config (``SiglipVisionConfig``,
    ``CLIPVisionConfig``; it must have ``image_size`` and ``patch_size``) and any causal-LM config (Qwen2 first). They
    are serialized as dicts carrying their ``model_type`` and rebuilt through ``AutoConfig``'s ``CONFIG_MAPPING``.
    Defaults (SigLIP-base 224/16 and Qwen2-7B shapes) exist only so that ``EfficientMLLMConfig()`` can be built;
    real use passes both.

    ``tie_word_embeddings`` mirrors the language model's setting (the LM ties its own head); leave it unset, or give
    the same value as ``text_config.tie_word_embeddings``.
    """

    model_type = "emkd_mllm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = field(
        default=None, metadata={"help": "Vision tower config (dict with model_type, or a config object)."}
    )
    text_config: dict | PreTrainedConfig | None = field(
        default=None, metadata={"help": "Causal language model config (dict with model_type, or a config object)."}
    )
    vision_feature_layer: int = field(
        default=-2, metadata={"help": "Index into the vision tower's hidden_states (LLaVA: -2, the penultimate layer)."}
    )
    compressor: str = field(
        default="pool",
        metadata={"help": "'pool': 2D adaptive average pooling of the patch grid to pool_size x pool_size; "
                  "'none': keep every patch token (vanilla LLaVA)."},
    )
    pool_size: int = field(
        default=12, metadata={"help": "Side of the pooled grid; pool_size**2 tokens per tile (EM-KD: 12 -> 144)."}
    )
    projector_hidden_act: str = field(default="gelu", metadata={"help": "Activation between the projector's layers."})
    image_token_id: int | None = field(
        default=None,
        metadata={"help": "Token id marking an image-token position in input_ids (the tokenizer's '<image>')."},
    )
    anyres: bool = field(default=False, metadata={"help": "LLaVA-NeXT AnyRes: base view plus best-fit tiles."})
    image_grid_pinpoints: list | None = field(
        default=None,
        metadata={"help": "AnyRes candidate resolutions [[h, w], ...], multiples of the tower's image size; "
                  "default (when anyres) LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3 tile layouts."},
    )
    tie_word_embeddings: bool | None = field(
        default=None, metadata={"help": "Mirror of text_config.tie_word_embeddings (set from it when None)."}
    )

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        text_tie = bool(getattr(self.text_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = text_tie
        elif self.tie_word_embeddings != text_tie:
            raise ValueError(
                f"EfficientMLLMConfig: tie_word_embeddings={self.tie_word_embeddings} but "
                f"text_config.tie_word_embeddings={text_tie}; the language model ties its own head, set it there"
            )
        if self.anyres and self.image_grid_pinpoints is None:
            s = getattr(self.vision_config, "image_size", 0)  # a missing image_size is reported by _check
            self.image_grid_pinpoints = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = [list(p) for p in self.image_grid_pinpoints]
        self._check()

    def _check(self) -> None:
        """Raise ``ValueError`` naming the field for every inconsistent setting."""
        vc, tc = self.vision_config, self.text_config
        for name in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            if not isinstance(getattr(vc, name, None), int):
                raise ValueError(
                    f"EfficientMLLMConfig.vision_config ({type(vc).__name__}) must have an int `{name}`, "
                    f"got {getattr(vc, name, None)!r}"
                )
        # The towers round the patch grid down (SigLIP-so400m: 384 px / 14 px -> 27 x 27 = 729 patches).
        if vc.image_size < vc.patch_size:
            raise ValueError(
                f"EfficientMLLMConfig.vision_config: image_size={vc.image_size} is smaller than "
                f"patch_size={vc.patch_size}"
            )
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"EfficientMLLMConfig.compressor must be one of {COMPRESSORS}, got {self.compressor!r}")
        if self.compressor == "pool" and not 1 <= self.pool_size <= self.patch_grid:
            raise ValueError(
                f"EfficientMLLMConfig.pool_size={self.pool_size} must be in [1, {self.patch_grid}], the patch grid "
                f"side of the vision tower (image_size={vc.image_size} // patch_size={vc.patch_size})"
            )
        n_states = vc.num_hidden_layers + 1  # embeddings + every layer
        if not -n_states <= self.vision_feature_layer < n_states:
            raise ValueError(
                f"EfficientMLLMConfig.vision_feature_layer={self.vision_feature_layer} is out of range for a vision "
                f"tower with {n_states} hidden states ([{-n_states}, {n_states - 1}])"
            )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"EfficientMLLMConfig.projector_hidden_act={self.projector_hidden_act!r} is unknown")
        vocab = getattr(tc, "vocab_size", None)
        if self.image_token_id is not None and vocab is not None and not 0 <= self.image_token_id < vocab:
            raise ValueError(
                f"EfficientMLLMConfig.image_token_id={self.image_token_id} is outside the text vocabulary [0, {vocab})"
            )
        for name in _LOGIT_TRANSFORMS:
            value = getattr(tc, name, None)
            if value not in (None, 1, 1.0):
                raise ValueError(
                    f"EfficientMLLMConfig.text_config.{name}={value!r}: the student needs logits == hidden @ W.T, "
                    "language models that rescale or soft-cap their logits are not supported"
                )
        if self.image_grid_pinpoints is not None:
            for hw in self.image_grid_pinpoints:
                if len(hw) != 2 or any(not isinstance(x, int) or x <= 0 or x % self.tile_size for x in hw):
                    raise ValueError(
                        f"EfficientMLLMConfig.image_grid_pinpoints: {hw} is not a [height, width] pair of positive "
                        f"multiples of the tower's image_size={self.tile_size}"
                    )

    def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Hugging Face's, and with the code shipped (``register_for_auto_class``) ``auto_map`` also names
        :class:`EfficientMLLMProcessor`, defined in the same file, for ``AutoProcessor``."""
        if self._auto_class is not None:
            module = type(self).__module__.split(".")[-1]
            auto_map = dict(getattr(self, "auto_map", None) or {})
            self.auto_map = {**auto_map, "AutoProcessor": f"{module}.EfficientMLLMProcessor"}
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ---- derived sizes ------------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """Side in pixels of one view the vision tower reads (its ``image_size``)."""
        return self.vision_config.image_size

    @property
    def patch_grid(self) -> int:
        """Side of the tower's patch grid, ``image_size // patch_size``."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens one view expands to: ``pool_size**2`` ("pool") or ``patch_grid**2`` ("none")."""
        side = self.pool_size if self.compressor == "pool" else self.patch_grid
        return side * side

    def anyres_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of AnyRes tiles for an image of ``(height, width)`` pixels."""
        if not self.anyres:
            raise ValueError("anyres_grid needs EfficientMLLMConfig.anyres=True")
        h, w = (int(x) for x in image_size)
        best_h, best_w = select_best_resolution((h, w), self.image_grid_pinpoints)
        return best_h // self.tile_size, best_w // self.tile_size

    def num_views(self, image_size: tuple[int, int] | None = None) -> int:
        """Views the tower reads for one image: 1, or (AnyRes) the base view plus ``rows * cols`` tiles."""
        if not self.anyres:
            return 1
        if image_size is None:
            raise ValueError("with anyres=True the number of image tokens depends on image_size=(height, width)")
        rows, cols = self.anyres_grid(image_size)
        return 1 + rows * cols

    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Image tokens one image of ``(height, width)`` expands to (``image_size`` is needed only for AnyRes)."""
        return self.num_views(image_size) * self.tokens_per_tile


# ---- image layout -----------------------------------------------------------------------------------------------
def anyres_views(image: Any, config: EfficientMLLMConfig) -> list:
    """LLaVA-NeXT layout of one PIL image: ``[whole image] + rows x cols tiles`` (raster order), all PIL RGB.

    The image is resized to fit the best resolution of ``config.image_grid_pinpoints`` keeping its aspect ratio,
    padded centred with black and cut into tiles of the tower's image size; the whole image comes first (the image
    processor resizes it to one tile).
    """
    try:  # Pillow is needed to lay images out, not to load the model
        from PIL import Image
    except ImportError as error:  # pragma: no cover - emkd depends on Pillow
        raise ImportError("laying out AnyRes images needs Pillow (pip install pillow)") from error
    image = image.convert("RGB")
    w, h = image.size
    rows, cols = config.anyres_grid((h, w))
    S = config.tile_size
    H, W = rows * S, cols * S
    scale = min(W / w, H / h)  # fit inside (H, W) keeping the aspect ratio, as LLaVA-NeXT's resize_and_pad
    nw, nh = min(math.ceil(w * scale), W), min(math.ceil(h * scale), H)
    canvas = Image.new("RGB", (W, H), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), resample=Image.Resampling.BICUBIC), ((W - nw) // 2, (H - nh) // 2))
    tiles = [canvas.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(rows) for c in range(cols)]
    return [image] + tiles


def pad_views(views: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-image ``[V_i, 3, S, S]`` into ``[n, max V_i, 3, S, S]``, zero-padding the view axis."""
    most = max(v.shape[0] for v in views)
    out = views[0].new_zeros((len(views), most, *views[0].shape[1:]))
    for i, v in enumerate(views):
        out[i, : v.shape[0]] = v
    return out


def image_model_inputs(images: list, image_processor: Any, config: EfficientMLLMConfig) -> dict[str, torch.Tensor]:
    """PIL images -> the model's image inputs: ``{"pixel_values": [n, 3, S, S]}``; AnyRes: ``{"pixel_values":
    [n, 1 + T_max, 3, S, S], "image_sizes": [n, 2]}`` (original ``(height, width)``); ``{}`` without images."""
    if not images:
        return {}

    def pixels(views: list) -> torch.Tensor:
        return image_processor(images=views, return_tensors="pt")["pixel_values"]  # (n, 3, S, S)

    if not config.anyres:
        return {"pixel_values": pixels(list(images))}
    views = [pixels(anyres_views(im, config)) for im in images]  # n x (1 + T_i, 3, S, S)
    sizes = torch.tensor([[im.size[1], im.size[0]] for im in images], dtype=torch.long)  # (n, 2) = (h, w)
    return {"pixel_values": pad_views(views), "image_sizes": sizes}


# ---- processor --------------------------------------------------------------------------------------------------
class EfficientMLLMProcessor(ProcessorMixin):
    """Text with ``<image>`` placeholders and PIL images -> the student's inputs, for use without emkd.

    ``processor(text=..., images=...)`` expands each ``<image>`` (one per image, images taken in order across the
    texts) to the image's token count, tokenizes, and adds the image inputs (``pixel_values``, and ``image_sizes``
    with AnyRes) exactly as emkd's :class:`~emkd.models.student_side.EfficientMLLMSide` renders them.

    :meth:`from_pretrained` rebuilds it from a student directory's ``config.json``, tokenizer and image processor
    (``AutoProcessor.from_pretrained(directory, trust_remote_code=True)`` without emkd, or plain
    ``AutoProcessor.from_pretrained(directory)`` with emkd imported).
    """

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
        config: EfficientMLLMConfig | None = None,
    ) -> None:
        if config is None:
            raise ValueError("EfficientMLLMProcessor needs the student's EfficientMLLMConfig (config=...)")
        self.config = config
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> EfficientMLLMProcessor:
        """The processor of a student directory (or hub repo): its config, tokenizer and image processor.

        Hub arguments (``revision``, ``cache_dir``, ``token``, ``local_files_only``, ``subfolder``) go to all three;
        other keyword arguments (e.g. ``backend="pil"``) go to ``AutoImageProcessor.from_pretrained``.
        """
        kwargs.pop("_from_auto", None)
        hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "subfolder",
                                          "force_download", "proxies") if k in kwargs}
        config = EfficientMLLMConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        # the tokenizer's and image processor's Auto classes read config.json, whose model type only this file
        # defines: the caller's consent to its code (trust_remote_code) goes to them too, so they do not ask again
        hub["trust_remote_code"] = kwargs.pop("trust_remote_code", None)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **hub)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub, **kwargs)
        return cls(image_processor, tokenizer, chat_template=getattr(tokenizer, "chat_template", None), config=config)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("config", None)  # saved as config.json by save_pretrained
        return out

    def save_pretrained(self, save_directory: Any, push_to_hub: bool = False, **kwargs: Any) -> Any:
        """Hugging Face's, plus the student's ``config.json`` (which :meth:`from_pretrained` reads)."""
        out = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        self.config.save_pretrained(save_directory)
        return out

    def __call__(
        self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = "pt",
        **tokenizer_kwargs: Any,
    ) -> BatchFeature:
        """``input_ids``, ``attention_mask`` and the image inputs of ``text`` (a string or a batch of strings, each
        ``<image>`` standing for one image) and ``images`` (a PIL image or a list, in placeholder order).

        ``tokenizer_kwargs`` (``padding``, ``add_special_tokens``, ...) go to the tokenizer.
        """
        if text is None:
            raise ValueError("EfficientMLLMProcessor needs text (with one '<image>' per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        images = list(images)
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(images):
            raise ValueError(f"text has {placeholders} {self.image_token!r} placeholders but {len(images)} images")
        image_inputs = image_model_inputs(images, self.image_processor, self.config)
        counts = iter(self.config.num_image_tokens((im.size[1], im.size[0]) if self.config.anyres else None)
                      for im in images)
        expanded = []
        for t in texts:
            parts = t.split(self.image_token)
            expanded.append(parts[0] + "".join(self.image_token * next(counts) + part for part in parts[1:]))
        text_inputs = self.tokenizer(expanded, return_tensors=return_tensors, **tokenizer_kwargs)
        return BatchFeature(data={**text_inputs, **image_inputs}, tensor_type=return_tensors)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


# ---- model ------------------------------------------------------------------------------------------------------
@dataclass
class EfficientMLLMOutput(ModelOutput):
    """Output of :class:`EfficientMLLMForCausalLM`.

    Args:
        loss: scalar next-token cross-entropy (HF shift: logits at ``i`` predict ``labels[:, i + 1]``), if labels.
        logits: ``[B, L', V]`` (``L' = L`` unless ``logits_to_keep``); ``None`` with ``return_logits=False``.
        hidden: ``[B, L, D]`` final hidden states after the final norm, as the LM head consumes them.
        vision_mask: ``[B, L]`` bool, positions filled with image features.
        cache / past_key_values: the decoder's cache (generation), under the name the installed transformers uses
            (:data:`emkd.compat.CACHE_KEY`).
        hidden_states, attentions: the decoder's, when requested with ``output_hidden_states``/``output_attentions``.
        head_fn_output: what ``head_fn`` returned, when one was passed to ``forward``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    vision_mask: torch.Tensor | None = None
    if CACHE_KEY == "cache":  # transformers >= 5.24
        cache: Cache | None = None
    else:
        past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    head_fn_output: Any = None


class EfficientProjector(nn.Module):
    """The 2-layer MLP projector: ``Linear(Dv, D) -> act -> Linear(D, D)``."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str = "gelu") -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (..., Dv) -> (..., D)


def pool_patch_grid(features: torch.Tensor, grid: int, pool_size: int) -> torch.Tensor:
    """2D adaptive average pooling of row-major patch tokens: ``[T, grid*grid, C] -> [T, pool_size**2, C]``."""
    T, N, C = features.shape
    if N != grid * grid:
        raise ValueError(f"pool_patch_grid: expected {grid}x{grid}={grid * grid} patch tokens, got shape {(T, N, C)}")
    x = features.transpose(1, 2).reshape(T, C, grid, grid)  # (T, C, g, g)
    x = F.adaptive_avg_pool2d(x, pool_size)  # (T, C, p, p)
    return x.flatten(2).transpose(1, 2)  # (T, p*p, C), raster order


def check_image_token_counts(tokens_per_sample: list[int], features_per_image: list[int]) -> None:
    """Check that the images, in order, fill each sample's image tokens exactly.

    Images are consumed in batch order: sample ``b`` takes whole images until it has as many features as image
    tokens. Raises ``ValueError`` naming the first sample for which that fails.
    """
    total_tokens, total_features = sum(tokens_per_sample), sum(features_per_image)
    i = 0
    for b, want in enumerate(tokens_per_sample):
        got = 0
        while got < want and i < len(features_per_image):
            got += features_per_image[i]
            i += 1
        if got != want:
            raise ValueError(
                f"sample {b} has {want} image tokens but images give {got} features (batch: {total_tokens} image "
                f"tokens in input_ids, {len(features_per_image)} images giving {features_per_image} features)"
            )
    if i != len(features_per_image):
        raise ValueError(
            f"input_ids have {total_tokens} image tokens but images give {total_features} features: "
            f"{len(features_per_image) - i} image(s) left over after the last sample"
        )


class EfficientMLLMForCausalLM(PreTrainedModel, GenerationMixin):
    """Vision tower + compressor + projector + causal LM; see the module docstring.

    Submodules (named for freezing policies): ``vision_tower`` (``AutoModel`` of the vision config, e.g.
    ``SiglipVisionModel``), ``projector`` (:class:`EfficientProjector`), ``language_model`` (``AutoModelForCausalLM``
    of the text config, e.g. ``Qwen2ForCausalLM``; it ties its own head when its config says so).

    As in LLaVA, the tower layers after ``vision_feature_layer`` (and its post-layernorm) never receive a gradient;
    under DDP either freeze the tower or use ``find_unused_parameters=True``.
    """

    config_class = EfficientMLLMConfig
    config: EfficientMLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [CACHE_KEY]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: EfficientMLLMConfig) -> None:
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.projector = EfficientProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # ---- embeddings (delegated to the language model) -----------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        """The language model's decoder (embeddings, layers and final norm, no head)."""
        return self.language_model.get_decoder()

    # ---- image features -----------------------------------------------------------------------------------------
    def num_image_tokens(self, image_size: tuple[int, int] | None = None) -> int:
        """Image tokens one image of ``(height, width)`` expands to; ``image_size`` is needed only for AnyRes."""
        return self.config.num_image_tokens(image_size)

    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """Vision tower, compressor and projector on a stack of views: ``[T, 3, S, S] -> [T, N, D]``."""
        S = self.config.tile_size
        if views.dim() != 4 or tuple(views.shape[-2:]) != (S, S):
            raise ValueError(f"image views must be [T, C, {S}, {S}] (the tower's image_size), got {tuple(views.shape)}")
        out = self.vision_tower(pixel_values=views.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config.vision_feature_layer]  # (T, g*g [+1], Dv)
        g = self.config.patch_grid
        if feats.shape[1] == g * g + 1:  # a CLS token in front (CLIP): LLaVA's "default" strategy drops it
            feats = feats[:, 1:]
        elif feats.shape[1] != g * g:
            raise ValueError(
                f"vision tower gave {feats.shape[1]} tokens per view, expected {g}x{g}={g * g} patches (+1 CLS)"
            )
        if self.config.compressor == "pool":
            feats = pool_patch_grid(feats, g, self.config.pool_size)  # (T, p*p, Dv)
        return self.projector(feats)  # (T, N, D)

    def get_image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Projected, compressed features of each image: a list of ``[N_i, D]``.

        Args:
            pixel_values: ``[n, 3, S, S]``; with AnyRes ``[n, 1 + T_max, 3, S, S]`` (base view, then tiles in raster
                order, zero-padded to the batch's largest tile count).
            image_sizes: ``[n, 2]`` original ``(height, width)`` of each image; required with AnyRes.
        """
        if self.config.anyres:
            if image_sizes is None or pixel_values.dim() != 5:
                raise ValueError(
                    "anyres=True needs pixel_values [n, 1 + tiles, 3, H, W] and image_sizes [n, 2]; got pixel_values "
                    f"{tuple(pixel_values.shape)} and image_sizes "
                    f"{None if image_sizes is None else tuple(image_sizes.shape)}"
                )
            sizes = torch.as_tensor(image_sizes).tolist()
            if len(sizes) != pixel_values.shape[0]:
                raise ValueError(f"{pixel_values.shape[0]} images in pixel_values but {len(sizes)} image_sizes")
            views_per_image = [self.config.num_views(tuple(hw)) for hw in sizes]
            if max(views_per_image) > pixel_values.shape[1]:
                raise ValueError(
                    f"image_sizes ask for up to {max(views_per_image)} views per image but pixel_values holds "
                    f"{pixel_values.shape[1]} (shape {tuple(pixel_values.shape)})"
                )
            views = torch.cat([pixel_values[i, :n] for i, n in enumerate(views_per_image)])  # (T, 3, S, S)
        else:
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be [n, 3, H, W], got shape {tuple(pixel_values.shape)}")
            views_per_image = [1] * pixel_values.shape[0]
            views = pixel_values
        feats = self.encode_views(views)  # (T, N, D)
        return [f.reshape(-1, f.shape[-1]) for f in feats.split(views_per_image)]  # n x (views_i * N, D)

    # ---- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        head_fn: Callable[[torch.Tensor, torch.Tensor, nn.Module], Any] | None = None,
        **kwargs,
    ) -> EfficientMLLMOutput:
        """Embed text, put image features at the image tokens, run the LM.

        Args:
            input_ids: ``[B, L]``; image tokens (``config.image_token_id``) must match the images' features in count.
            pixel_values, image_sizes: see :meth:`get_image_features`; images fill the samples' image tokens in order.
            attention_mask: ``[B, L]`` (1 real, 0 padding), or ``[B, L_past + L]`` during generation.
            labels: ``[B, L]``, ``-100`` ignored; gives ``loss`` (mean CE over supervised next tokens).
            cache: the decoder's cache during generation, passed as ``cache`` (transformers >= 5.24) or
                ``past_key_values`` (older releases, and accepted on newer ones); see :mod:`emkd.compat`.
            logits_to_keep: as in Hugging Face causal LMs (generation keeps the last position only).
            return_logits: ``False`` skips the LM head (``logits=None``) when only ``hidden`` is needed.
            kwargs: ``cache`` / ``past_key_values`` (above); a ``cache_position`` that an older ``generate`` passes is
                dropped (positions come from the cache). The parameter is not declared, so that ``generate`` does not
                build one for this model when it is loaded as remote code.
            head_fn: called as ``head_fn(hidden, vision_mask, lm_head)`` inside this forward, its result returned as
                ``head_fn_output``. A distillation loss that reads the LM head's weight runs here: under FSDP the
                root unit's parameters, the head among them, are whole only during the root's forward, and under
                DeepSpeed ZeRO-3 the head weight is registered as an external parameter of this module
                (:func:`emkd.training.trainer.register_head_for_zero3`, called by
                :meth:`~emkd.training.trainer.DistillTrainer.compute_loss` before the first step's forward).
        """
        kwargs.pop("cache_position", None)
        cache = pop_cache(kwargs)
        kwargs.pop("return_dict", None)  # always a ModelOutput
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, D)
        B, L = inputs_embeds.shape[:2]
        vision_mask = torch.zeros(B, L, dtype=torch.bool, device=inputs_embeds.device)  # (B, L)

        if pixel_values is not None:
            if input_ids is None:
                raise ValueError("pixel_values need input_ids to find the image tokens (got inputs_embeds only)")
            if self.config.image_token_id is None:
                raise ValueError("EfficientMLLMConfig.image_token_id is None; set it to the tokenizer's '<image>' id")
            image_mask = input_ids == self.config.image_token_id  # (B, L)
            features = self.get_image_features(pixel_values, image_sizes)  # n x (N_i, D)
            check_image_token_counts(image_mask.sum(1).tolist(), [f.shape[0] for f in features])
            flat = torch.cat(features).to(inputs_embeds.device, inputs_embeds.dtype)  # (sum N_i, D)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat)  # (B, L, D)
            vision_mask = image_mask
        elif input_ids is not None and self.config.image_token_id is not None:
            prefill = cache is None or cache.get_seq_length() == 0
            if prefill:  # decode steps may meet a generated image token; a prompt's image tokens need images
                counts = (input_ids == self.config.image_token_id).sum(1).tolist()
                check_image_token_counts(counts, [])

        outputs = self.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{CACHE_KEY: cache},
            return_dict=True,
            **kwargs,
        )
        hidden = outputs.last_hidden_state  # (B, L, D), after the final norm

        logits = loss = None
        if return_logits or labels is not None:
            logits = self.get_output_embeddings()(slice_logits_to_keep(hidden, logits_to_keep))  # (B, L', V)
        if labels is not None:
            if logits.shape[1] != L:
                raise ValueError(f"labels need the logits of every position; got logits_to_keep={logits_to_keep}")
            loss = self.language_model.loss_function(
                logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs
            )
        head_fn_output = None if head_fn is None else head_fn(hidden, vision_mask, self.get_output_embeddings())
        return EfficientMLLMOutput(
            loss=loss,
            logits=logits if return_logits else None,
            hidden=hidden,
            vision_mask=vision_mask,
            head_fn_output=head_fn_output,
            **{CACHE_KEY: getattr(outputs, CACHE_KEY, None)},
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """Hugging Face's preparation, with the images given to the prefill step only.

        After prefill the image features live in the cache; decode steps feed one new token each and get no
        ``pixel_values``. Without a cache (``use_cache=False``) every step re-reads the whole prompt, images included.
        The cache and the attention mask travel in ``kwargs`` under the names the installed release uses.
        """
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["pixel_values"] = pixel_values
            model_inputs["image_sizes"] = image_sizes
        else:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_sizes", None)
        return model_inputs


# save_pretrained copies this file next to the checkpoint and writes config.json's auto_map, so that
# AutoConfig / AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True) load it without emkd.
EfficientMLLMConfig.register_for_auto_class("AutoConfig")
EfficientMLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
EfficientMLLMProcessor.register_for_auto_class("AutoProcessor")
if __name__.startswith("emkd."):  # as remote code, transformers registers the classes it loads itself
    AutoConfig.register(EfficientMLLMConfig.model_type, EfficientMLLMConfig)
    AutoModelForCausalLM.register(EfficientMLLMConfig, EfficientMLLMForCausalLM)
    AutoModelForImageTextToText.register(EfficientMLLMConfig, EfficientMLLMForCausalLM)
    AutoProcessor.register(EfficientMLLMConfig, EfficientMLLMProcessor)

__all__ = [
    "COMPRESSORS",
    "EfficientMLLMConfig",
    "EfficientMLLMForCausalLM",
    "EfficientMLLMOutput",
    "EfficientMLLMProcessor",
    "EfficientProjector",
    "IMAGE_TOKEN",
    "anyres_views",
    "check_image_token_counts",
    "image_model_inputs",
    "pad_views",
    "pool_patch_grid",
]

"""Compose the efficient student from Hugging Face component checkpoints: a vision tower and a causal LM.

Where the design comes from: EM-KD §3 builds its student as LLaVA-NeXT with a SigLIP tower
(``google/siglip-so400m-patch14-384``), a Qwen2 LLM and a new projector that pools the patch grid to
``pool_size x pool_size`` tokens (12 -> 144) before a 2-layer MLP. Before any training, the tower and the LLM are the
pretrained checkpoints and only the projector is new; :func:`init_student` writes that starting point as a student
directory that :func:`emkd.models.student_side.load_student` reads.

What :func:`init_student` does, in order:

1. Loads the vision tower from ``vision_path``. A full SigLIP/CLIP checkpoint (``model_type`` ``"siglip"`` /
   ``"clip"``, text and vision towers) and a vision-only one (``"siglip_vision_model"`` / ``"clip_vision_model"``)
   are both read with ``SiglipVisionModel`` / ``CLIPVisionModel.from_pretrained``, which in transformers 5 takes the
   ``vision_config`` and the ``vision_model.*`` weights out of a full checkpoint (the text tower is not loaded).
   SigLIP's attention-pooling head is dropped (``vision_use_head=False``): an MLLM reads patch tokens, never the
   pooled embedding, and the head would be an unused parameter under DDP. transformers then logs a LOAD REPORT that
   lists the text tower's and the head's weights as UNEXPECTED: those are the parts left out on purpose.
2. Loads the LLM (``AutoModelForCausalLM``), its tokenizer (``AutoTokenizer``) and the image processor saved with the
   vision tower (``AutoImageProcessor``, PIL backend by default: transformers 5 needs torchvision for the others).
   Every load is local (``local_files_only=True``) and refuses a checkpoint whose weights do not cover the model:
   missing or mismatched keys would silently be randomly initialised.
3. Makes sure the tokenizer has the image token ``"<image>"``. If it lacks it, the token is added as a special
   token (it is never split and is skipped when decoding); the chat template is kept as it is. If the new id does
   not fit in the LLM's embedding matrix, the matrix (and an untied LM head) grows to ``len(tokenizer)`` rows and
   every new row is set to the mean of the old rows, so the original rows are unchanged. An LLM whose matrix is
   already padded beyond the tokenizer (Qwen2: 151,936 rows for ~151,650 tokens) is not resized at all; the image
   token then takes one of the padding rows as it is.
4. Builds :class:`~emkd.models.student.EfficientMLLMConfig` from the two loaded configs, constructs
   :class:`~emkd.models.student.EfficientMLLMForCausalLM` and copies the tower's and the LLM's state dicts into it,
   checking every key and shape (nanoGPT's ``from_pretrained`` style). The projector is drawn from ``seed``:
   weights ``N(0, initializer_range)`` (the LLM config's, 0.02 if it has none; what the student class itself uses),
   biases 0, from a private ``torch.Generator`` (the global RNG is left untouched).
5. Saves the model (safetensors), the tokenizer, the image processor and the LLM's generation config to
   ``out_dir`` and prints a summary: image tokens per image and parameters per part.

From a teacher (:func:`init_student_from_teacher`, ``emkd init-student --from-teacher``): the student takes the
teacher's vision tower (config and weights; SigLIP's unused head dropped), its ``vision_feature_layer`` and its
tokenizer files, copied byte for byte (a tokenizer re-saved through the class ``AutoTokenizer`` picks next to another
``config.json`` can come out with another pre-tokenizer), and pools the patch grid to ``pool_size x pool_size``. The
LLM is a causal-LM checkpoint over the teacher's vocabulary (``llm_path``), the teacher's first ``layers`` decoder
layers with its embeddings, final norm and head (``layers`` alone), or a fresh Qwen2 of ``layers`` x ``hidden``
(``layers`` and ``hidden``). The written student is checked against the teacher as training checks the pair
(:func:`~emkd.models.base.check_same_tokenization`).

The student is built on the CPU in ``dtype`` (default: the LLM checkpoint's dtype, e.g. bfloat16 for Qwen2; the
tower is cast to it, as LLaVA does), so building it needs roughly three copies of the weights in RAM: the loaded
components and the student. The image token must be ``"<image>"``: the data pipeline's marker and
:class:`~emkd.models.student_side.EfficientMLLMSide` both use that string.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionModel,
    PreTrainedModel,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionModel,
)

from emkd.errors import UserError
from emkd.models.base import check_same_tokenization, tokenizer_identity
from emkd.models.student import COMPRESSORS, EfficientMLLMConfig, EfficientMLLMForCausalLM, EfficientProjector
from emkd.models.student_side import IMAGE_TOKEN, EfficientMLLMSide, load_student_side, processor_output_size

# ``model_type`` in a vision checkpoint's config.json -> the class that loads its vision tower (exact keys).
VISION_TOWERS: dict[str, type[PreTrainedModel]] = {
    "siglip": SiglipVisionModel,  # full SigLIP (text + vision): only the vision half is read
    "siglip_vision_model": SiglipVisionModel,
    "clip": CLIPVisionModel,  # full CLIP: only the vision half is read
    "clip_vision_model": CLIPVisionModel,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The files a Hugging Face tokenizer is saved as; those present are copied byte for byte.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
# Teacher architectures whose vision tower a student can take (a SigLIP/CLIP ViT over a square patch grid).
TEACHER_TOWERS = ("EfficientMLLMForCausalLM", "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "LlavaOnevisionForConditionalGeneration")


def copy_tokenizer_files(source: Path, out_dir: Path) -> list[str]:
    """Copy ``source``'s tokenizer files (:data:`TOKENIZER_FILES`) into ``out_dir`` byte for byte; return their
    names."""
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer_config.json" not in names:
        raise UserError(f"{source} has no tokenizer_config.json; the tokenizer must be saved with the "
                        "checkpoint")
    for name in names:
        shutil.copyfile(source / name, out_dir / name)
    return names


# ---- loading the components -------------------------------------------------------------------------------------
def _model_type(path: Path, role: str) -> str:
    """``model_type`` of the local checkpoint ``path`` (``role`` names it in errors)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"init_student: the {role} checkpoint {path} has no config.json (a local directory "
                                "is needed; download hub checkpoints first)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type is None:
        raise ValueError(f"init_student: {config_file} has no model_type")
    return model_type


def _check_loading_info(info: dict[str, Any], path: Path, role: str) -> None:
    """Refuse a load that left weights randomly initialised (missing or mismatched keys)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or [])
    if missing or mismatched:
        raise ValueError(
            f"init_student: the {role} checkpoint {path} does not cover its model: {len(missing)} missing keys "
            f"{missing[:5]}, {len(mismatched)} mismatched keys {mismatched[:5]}; they would be randomly initialised"
        )


def load_vision_tower(path: str | Path, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """The vision tower of a local SigLIP/CLIP checkpoint (full or vision-only), without SigLIP's pooling head."""
    path = Path(path)
    model_type = _model_type(path, "vision")
    if model_type not in VISION_TOWERS:
        raise ValueError(
            f"init_student: vision checkpoint {path} has model_type {model_type!r}; supported: {sorted(VISION_TOWERS)}"
        )
    cls = VISION_TOWERS[model_type]
    kwargs = {"vision_use_head": False} if cls is SiglipVisionModel else {}
    tower, info = cls.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs)
    _check_loading_info(info, path, "vision")
    return tower.eval()


def load_language_model(path: str | Path, dtype: torch.dtype | str = "auto") -> tuple[PreTrainedModel, Any]:
    """``(causal LM, tokenizer)`` of a local checkpoint."""
    path = Path(path)
    _model_type(path, "language model")
    lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True)
    _check_loading_info(info, path, "language model")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return lm.eval(), tokenizer


def add_image_token(tokenizer: Any, lm: PreTrainedModel, image_token: str = IMAGE_TOKEN) -> tuple[int, bool, int]:
    """Make ``image_token`` a token of ``tokenizer`` and a row of ``lm``'s embeddings; return
    ``(token_id, added, old_rows)``.

    A missing token is added as a special token. The embeddings grow to ``len(tokenizer)`` rows only if the id does
    not fit; new rows (input embeddings and an untied head, plus a head bias if any) are the mean of the old rows.
    """
    added = image_token not in tokenizer.get_vocab()
    if added:
        tokenizer.add_special_tokens({"extra_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if ids != [token_id]:
        raise ValueError(
            f"init_student: the tokenizer splits {image_token!r} into {ids}; it must be a single token "
            f"(id {token_id}) that text never splits, i.e. an added or special token"
        )
    old_rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_rows:
        _grow_embeddings(lm, len(tokenizer))
    return token_id, added, old_rows


@torch.no_grad()
def _grow_embeddings(lm: PreTrainedModel, rows: int) -> None:
    """Resize ``lm``'s vocabulary to ``rows`` and set every new row to the mean of the old rows."""
    old = lm.get_input_embeddings().weight.shape[0]
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight
    with torch.random.fork_rng(devices=[]):  # resize draws the new rows from the global RNG; we overwrite them
        lm.resize_token_embeddings(rows, mean_resizing=False)
    tensors = [lm.get_input_embeddings().weight]  # (rows, D)
    head = lm.get_output_embeddings()
    if head is not None and not tied:
        tensors.append(head.weight)  # (rows, D)
    if head is not None and getattr(head, "bias", None) is not None:
        tensors.append(head.bias)  # (rows,)
    for t in tensors:
        t[old:] = t[:old].float().mean(0).to(t.dtype)


# ---- building the student ---------------------------------------------------------------------------------------
@torch.no_grad()
def copy_weights(target: nn.Module, source: dict[str, torch.Tensor], name: str) -> None:
    """Copy ``source`` into ``target``'s state dict in place, after checking that keys and shapes match exactly."""
    want = target.state_dict()
    missing, extra = sorted(want.keys() - source.keys()), sorted(source.keys() - want.keys())
    if missing or extra:
        raise ValueError(
            f"init_student: {name} state dicts differ: {len(missing)} keys of the student missing from the "
            f"checkpoint {missing[:5]}, {len(extra)} keys of the checkpoint unknown to the student {extra[:5]}"
        )
    for key, value in source.items():
        if want[key].shape != value.shape:
            raise ValueError(
                f"init_student: {name}.{key} has shape {tuple(value.shape)} in the checkpoint and "
                f"{tuple(want[key].shape)} in the student"
            )
        want[key].copy_(value)


@torch.no_grad()
def init_projector(projector: EfficientProjector, std: float, seed: int) -> None:
    """Weights ``N(0, std)``, biases 0, drawn in float32 from ``torch.Generator().manual_seed(seed)``."""
    gen = torch.Generator().manual_seed(seed)
    for linear in (projector.linear_1, projector.linear_2):
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * std)  # (out, in)
        linear.bias.zero_()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters count once


def init_student(
    vision_path: str | Path,
    llm_path: str | Path,
    out_dir: str | Path,
    *,
    pool_size: int = 12,
    compressor: str = "pool",
    vision_feature_layer: int = -2,
    anyres: bool = False,
    image_grid_pinpoints: list[list[int]] | None = None,
    image_token: str = IMAGE_TOKEN,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
    image_processor_backend: str = "pil",
    print_fn: Callable[[str], None] = print,
) -> Path:
    """Build the efficient student from a local vision checkpoint and a local causal-LM checkpoint; save it to
    ``out_dir`` and return its path. See the module docstring for each step.

    Args:
        vision_path: a SigLIP/CLIP checkpoint directory (full or vision-only) holding the image processor too.
        llm_path: a causal-LM checkpoint directory holding its tokenizer.
        out_dir: where the student goes; must be empty or absent unless ``overwrite``.
        pool_size, compressor, vision_feature_layer, anyres, image_grid_pinpoints: see
            :class:`~emkd.models.student.EfficientMLLMConfig` (defaults: EM-KD's 12 x 12 = 144 tokens per tile).
        image_token: must be ``"<image>"`` (the data pipeline's marker and the student side's lookup).
        dtype: dtype of the whole student; ``None`` takes the LLM checkpoint's.
        seed: seed of the projector's initialisation.
        overwrite: write into a non-empty ``out_dir`` (files of the same names are replaced).
        image_processor_backend: passed to ``AutoImageProcessor.from_pretrained`` (``"pil"`` needs no torchvision).
        print_fn: receives the summary lines.

    Raises:
        FileNotFoundError: a checkpoint directory or its config.json is missing.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        ValueError: an unsupported vision model type, incomplete checkpoint weights, an image processor whose output
            size is not the tower's ``image_size``, or an invalid student setting.
    """
    vision_path, llm_path, out_dir = Path(vision_path), Path(llm_path), Path(out_dir)
    if image_token != IMAGE_TOKEN:
        raise ValueError(
            f"init_student: image_token={image_token!r} is not supported; the data pipeline and EfficientMLLMSide "
            f"mark images with {IMAGE_TOKEN!r}"
        )
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"init_student: {out_dir} is not empty; choose a new directory or pass overwrite=True")

    lm, tokenizer = load_language_model(llm_path, dtype="auto" if dtype is None else dtype)
    dtype = lm.dtype if dtype is None else dtype
    tower = load_vision_tower(vision_path, dtype=dtype)
    image_processor = AutoImageProcessor.from_pretrained(
        vision_path, backend=image_processor_backend, local_files_only=True
    )
    S = tower.config.image_size
    if processor_output_size(image_processor) != (S, S):
        raise ValueError(
            f"init_student: the image processor in {vision_path} outputs {processor_output_size(image_processor)} "
            f"images but the vision tower reads {(S, S)}"
        )
    image_token_id, added, old_rows = add_image_token(tokenizer, lm, image_token)

    config = EfficientMLLMConfig(
        vision_config=copy.deepcopy(tower.config),
        text_config=copy.deepcopy(lm.config),
        vision_feature_layer=vision_feature_layer,
        compressor=compressor,
        pool_size=pool_size,
        image_token_id=image_token_id,
        anyres=anyres,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not isinstance(student, EfficientMLLMForCausalLM):
        raise TypeError(f"AutoModelForCausalLM built {type(student).__name__} for an EfficientMLLMConfig")
    copy_weights(student.vision_tower, tower.state_dict(), "vision_tower")
    copy_weights(student.language_model, lm.state_dict(), "language_model")
    init_projector(student.projector, getattr(config.text_config, "initializer_range", None) or 0.02, seed)
    student.generation_config = copy.deepcopy(lm.generation_config)
    if student.generation_config.eos_token_id is None:
        student.generation_config.eos_token_id = tokenizer.eos_token_id
    if student.generation_config.pad_token_id is None:
        student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.eval()
    EfficientMLLMSide(tokenizer, image_processor, student.config)  # the checks load_student will make

    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    if added:
        tokenizer.save_pretrained(out_dir)  # it gained "<image>"
    else:
        copy_tokenizer_files(llm_path, out_dir)  # unchanged: re-saving could rewrite it (see the module docstring)
    image_processor.save_pretrained(out_dir)

    for line in _summary(student, tower, lm, vision_path, llm_path, out_dir, image_token_id, added, old_rows, seed):
        print_fn(line)
    return out_dir


def _summary(
    student: EfficientMLLMForCausalLM,
    tower: PreTrainedModel,
    lm: PreTrainedModel,
    vision_path: Path,
    llm_path: Path,
    out_dir: Path,
    image_token_id: int,
    added: bool,
    old_rows: int,
    seed: int,
) -> list[str]:
    cfg = student.config
    g, n = cfg.patch_grid, cfg.tokens_per_tile
    per_view = f"{g}x{g} patches -> {n} tokens" if cfg.compressor == "none" else f"{g}x{g} patches pooled to {n}"
    if cfg.anyres:
        tiles = max((h // cfg.tile_size) * (w // cfg.tile_size) for h, w in cfg.image_grid_pinpoints)
        tokens = f"AnyRes, {per_view} per view, base view + up to {tiles} tiles: up to {(1 + tiles) * n} per image"
    else:
        tokens = f"{per_view} per image"
    rows = student.get_input_embeddings().weight.shape[0]
    if not added:
        token = f"{IMAGE_TOKEN!r} id {image_token_id} (already in the tokenizer)"
    elif rows > old_rows:
        token = f"{IMAGE_TOKEN!r} id {image_token_id} (added; embeddings {old_rows} -> {rows} rows, new rows = mean)"
    else:
        token = f"{IMAGE_TOKEN!r} id {image_token_id} (added; fits the {rows} embedding rows, not resized)"
    parts = [
        ("vision tower", student.vision_tower, f"{type(tower).__name__} from {vision_path}"),
        ("projector", student.projector, f"MLP {cfg.vision_config.hidden_size} -> {cfg.text_config.hidden_size}, "
                                         f"seed {seed}"),
        ("language model", student.language_model, f"{type(lm).__name__} from {llm_path}"),
    ]
    lines = [f"init-student: wrote {out_dir} ({student.dtype})"]
    lines += [f"  {name:<15}{_count(m) / 1e6:>10.2f}M  {what}" for name, m, what in parts]
    lines += [f"  {'total':<15}{_count(student) / 1e6:>10.2f}M", f"  image tokens: {tokens}", f"  image token: {token}"]
    return lines


# ---- from a teacher -----------------------------------------------------------------------------------------------
def _teacher_parts(model: PreTrainedModel, architecture: str, path: Path) -> tuple[nn.Module, Any, int, nn.Module,
                                                                                     nn.Module, Any]:
    """``(vision tower, vision config, vision_feature_layer, decoder, LM head, text config)`` of a loaded teacher."""
    _require_tower_teacher(architecture, path)
    config = model.config
    if architecture == "EfficientMLLMForCausalLM":
        return (model.vision_tower, config.vision_config, config.vision_feature_layer,
                model.language_model.get_decoder(), model.language_model.get_output_embeddings(), config.text_config)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise UserError(f"{path / 'config.json'} has vision_feature_layer={layer!r}; the student reads "
                        "one hidden state of the tower (an int)")
    return (model.model.vision_tower, config.vision_config, layer, model.model.language_model,
            model.get_output_embeddings(), config.text_config)


def _require_tower_teacher(architecture: str, path: Path) -> None:
    if architecture not in TEACHER_TOWERS:
        raise UserError(
            f"{path} is a {architecture}; --from-teacher takes a teacher whose vision tower is a "
            f"SigLIP/CLIP ViT over a square patch grid: {', '.join(TEACHER_TOWERS)} (for another teacher, compose "
            "the student with --vision and --llm)"
        )


def _single_tile_processor(architecture: str, side: Any, vision_config: Any) -> Any:
    """The teacher's image processor when it already returns one ``[3, S, S]`` tile per image (EfficientMLLM,
    LLaVA-1.5); else (AnyRes teachers) a SigLIP/CLIP processor of one tile with the teacher's normalisation."""
    if architecture in ("EfficientMLLMForCausalLM", "LlavaForConditionalGeneration"):
        return None  # copied as it is
    teacher = side.image_processor
    S = vision_config.image_size
    norm = dict(image_mean=list(teacher.image_mean), image_std=list(teacher.image_std))
    if vision_config.model_type == "clip_vision_model":
        return CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, **norm)
    return SiglipImageProcessorPil(size={"height": S, "width": S}, **norm)


def _tokenizer_image_token(tokenizer: Any, path: Path) -> int:
    """The id of ``"<image>"`` in the teacher's tokenizer, which the copied files must already have."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        raise UserError(
            f"the tokenizer of {path} has no {IMAGE_TOKEN!r} token, which the student marks images "
            "with; --from-teacher copies the teacher's tokenizer unchanged, so add the token there first or compose "
            "the student with --vision and --llm (which adds it)"
        )
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"] != [token_id]:
        raise UserError(f"the tokenizer of {path} splits {IMAGE_TOKEN!r}; it must be one added token")
    return token_id


def _truncated_lm(decoder: nn.Module, head: nn.Module, text_config: Any, layers: int) -> tuple[Any, dict]:
    """Text config and causal-LM state dict of the teacher's first ``layers`` decoder layers (embeddings, final
    norm and head kept)."""
    total = text_config.num_hidden_layers
    if not 1 <= layers <= total:
        raise UserError(f"--layers {layers} without --hidden keeps the teacher's first layers; the "
                        f"teacher has {total} (give 1..{total}, or --hidden H for a fresh LLM)")
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:layers]
    config.tie_word_embeddings = head.weight is decoder.get_input_embeddings().weight
    state = {}
    for key, value in decoder.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers" and int(parts[1]) >= layers:
            continue
        state[f"model.{key}"] = value
    state.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    return config, state


def _fresh_lm_config(text_config: Any, tokenizer: Any, layers: int, hidden: int) -> Qwen2Config:
    """A Qwen2 of ``layers`` x ``hidden`` over the teacher's vocabulary: heads of 64 dims (fewer, down to 8, when
    ``hidden`` is not a multiple of 64), MLP of ``4 * hidden``, tied embeddings, the teacher's context length."""
    head_dim = next((d for d in (64, 32, 16, 8) if hidden % d == 0), None)
    if layers < 1 or head_dim is None:
        raise UserError(f"--layers {layers} --hidden {hidden}: need layers >= 1 and hidden a multiple "
                        "of 8")
    heads = hidden // head_dim
    return Qwen2Config(
        vocab_size=max(int(text_config.vocab_size), len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=int(getattr(text_config, "max_position_embeddings", 4096)),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _check_llm_vocabulary(lm_tokenizer: Any, tokenizer: Any, llm_path: Path, teacher_path: Path) -> None:
    """Refuse an LLM whose tokenizer gives a token of the teacher's another id."""
    lm_vocab = lm_tokenizer.get_vocab()
    differ = [(t, i, lm_vocab[t]) for t, i in tokenizer.get_vocab().items() if t in lm_vocab and lm_vocab[t] != i]
    if differ:
        t, i, j = sorted(differ, key=lambda d: d[1])[0]
        raise UserError(
            f"the LLM {llm_path} and the teacher {teacher_path} number their vocabularies differently "
            f"({len(differ)} tokens differ, e.g. {t!r}: {j} in the LLM, {i} in the teacher); --llm must be a causal "
            "LM over the teacher's vocabulary (the same tokenizer family)"
        )


def init_student_from_teacher(
    teacher_path: str | Path,
    out_dir: str | Path,
    *,
    pool_size: int = 12,
    llm_path: str | Path | None = None,
    layers: int | None = None,
    hidden: int | None = None,
    compressor: str = "pool",
    anyres: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    overwrite: bool = False,
    print_fn: Callable[[str], None] = print,
) -> Path:
    """Build the efficient student of a teacher (see the module docstring); save it to ``out_dir``; return its path.

    Args:
        teacher_path: a local teacher checkpoint of one of :data:`TEACHER_TOWERS`.
        out_dir: where the student goes; must be empty or absent unless ``overwrite``.
        pool_size, compressor, anyres: see :class:`~emkd.models.student.EfficientMLLMConfig` (AnyRes takes the
            teacher's ``image_grid_pinpoints`` when it has them).
        llm_path: a causal-LM checkpoint over the teacher's vocabulary (with its tokenizer, to check that).
        layers, hidden: without ``llm_path``: ``layers`` alone keeps the teacher's first ``layers`` decoder layers;
            with ``hidden`` a fresh Qwen2 of that size is drawn from ``seed``.
        dtype: dtype of the student; ``None`` takes the teacher's.
        seed: seed of the projector (and of a fresh LLM).

    Raises:
        UserError: what was given does not fit (no LLM choice or two, an unsupported teacher, a tokenizer without
            ``"<image>"``, an LLM over another vocabulary, a non-empty ``out_dir``) or the written student does not
            tokenize as its teacher.
    """
    from emkd.models.teachers import checkpoint_architecture, load_teacher

    teacher_path, out_dir = Path(teacher_path), Path(out_dir)
    if (llm_path is not None) == (layers is not None) or (hidden is not None and layers is None):
        raise UserError("choose the LLM with exactly one of --llm DIR, --layers N (the teacher's first "
                        "N layers) or --layers N --hidden H (a fresh LLM)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} is not empty; choose a new directory or pass --overwrite")
    if not (teacher_path / "config.json").is_file():
        raise UserError(f"the teacher {teacher_path} has no config.json (a local checkpoint directory "
                        "is needed)")
    architecture = checkpoint_architecture(teacher_path)
    _require_tower_teacher(architecture, teacher_path)  # before loading the weights
    teacher = load_teacher(teacher_path, dtype=dtype)
    dtype = teacher.model.dtype if dtype is None else dtype
    tower, vision_config, feature_layer, decoder, head, text_config = _teacher_parts(
        teacher.model, architecture, teacher_path)
    tokenizer = teacher.side.tokenizer
    image_token_id = _tokenizer_image_token(tokenizer, teacher_path)

    vision_config = copy.deepcopy(vision_config)
    if getattr(vision_config, "vision_use_head", False):
        vision_config.vision_use_head = False  # SigLIP's pooling head: an MLLM never reads it
    tower_state = {k: v for k, v in tower.state_dict().items() if not k.startswith(("head.", "vision_model.head."))}

    lm_state = None
    if llm_path is not None:
        lm, lm_tokenizer = load_language_model(llm_path, dtype=dtype)
        _check_llm_vocabulary(lm_tokenizer, tokenizer, Path(llm_path), teacher_path)
        if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
            _grow_embeddings(lm, len(tokenizer))  # the teacher's added tokens ("<image>"): mean rows
        text_config, lm_state = copy.deepcopy(lm.config), lm.state_dict()
        llm_what = f"{type(lm).__name__} from {llm_path}"
    elif hidden is None:
        text_config, lm_state = _truncated_lm(decoder, head, text_config, layers)
        llm_what = f"the teacher's first {layers} of {teacher.num_layers} decoder layers"
    else:
        text_config = _fresh_lm_config(text_config, tokenizer, layers, hidden)
        llm_what = f"fresh Qwen2, {layers} layers x {hidden} (seed {seed})"
    pinpoints = getattr(teacher.model.config, "image_grid_pinpoints", None) if anyres else None
    config = EfficientMLLMConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=feature_layer,
        compressor=compressor,
        pool_size=pool_size,
        image_token_id=image_token_id,
        anyres=anyres,
        image_grid_pinpoints=pinpoints,
    )
    with torch.random.fork_rng(devices=[]):  # a fresh LLM is drawn from the seed; the global RNG is left alone
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    copy_weights(student.vision_tower, tower_state, "vision_tower")
    if lm_state is not None:
        copy_weights(student.language_model, lm_state, "language_model")
    init_projector(student.projector, getattr(text_config, "initializer_range", None) or 0.02, seed)
    student.generation_config = copy.deepcopy(teacher.model.generation_config)
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.eval()

    processor = _single_tile_processor(architecture, teacher.side, vision_config)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out_dir)
    copied = copy_tokenizer_files(teacher_path, out_dir)
    if processor is None:
        shutil.copyfile(teacher_path / "preprocessor_config.json", out_dir / "preprocessor_config.json")
    else:
        processor.save_pretrained(out_dir)
    side = load_student_side(out_dir)  # as training loads it: the tokenizer must come back as the teacher's
    if tokenizer_identity(side.tokenizer) != tokenizer_identity(tokenizer):
        (s_class, s_pre), (t_class, t_pre) = tokenizer_identity(side.tokenizer), tokenizer_identity(tokenizer)
        raise UserError(
            f"the teacher's tokenizer files load as {s_class} (pre-tokenizer {s_pre}) in {out_dir} but "
            f"as {t_class} (pre-tokenizer {t_pre}) in {teacher_path}; set tokenizer_class in the teacher's "
            "tokenizer_config.json so that both load the same class"
        )
    check_same_tokenization(side.tokenizer, tokenizer)

    cfg = student.config
    teacher_tokens = teacher.side.num_image_tokens(teacher.side.image_inputs([_probe_image(cfg.tile_size)]), 0)
    lines = [
        f"init-student: wrote {out_dir} ({student.dtype}) from the teacher {teacher_path} ({architecture})",
        f"  {'vision tower':<15}{_count(student.vision_tower) / 1e6:>10.2f}M  the teacher's "
        f"{type(tower).__name__}, hidden state {feature_layer}",
        f"  {'projector':<15}{_count(student.projector) / 1e6:>10.2f}M  MLP {cfg.vision_config.hidden_size} -> "
        f"{cfg.text_config.hidden_size}, seed {seed}",
        f"  {'language model':<15}{_count(student.language_model) / 1e6:>10.2f}M  {llm_what}",
        f"  {'total':<15}{_count(student) / 1e6:>10.2f}M",
        f"  image tokens: {cfg.patch_grid}x{cfg.patch_grid} patches -> {cfg.tokens_per_tile} per "
        f"{'view' if cfg.anyres else 'image'} (the teacher: {teacher_tokens} for a {cfg.tile_size} px image)",
        f"  tokenizer: {', '.join(copied)} copied byte for byte; {IMAGE_TOKEN!r} id {image_token_id}",
    ]
    for line in lines:
        print_fn(line)
    return out_dir


def _probe_image(size: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (size, size), (128, 128, 128))


# ---- command line -----------------------------------------------------------------------------------------------
def add_init_student_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``emkd init-student``; pair with ``parser.set_defaults(func=run_init_student)``."""
    parser.add_argument("--from-teacher", metavar="DIR", default=None,
                        help="build the student of this teacher: its vision tower and tokenizer (copied unchanged), "
                        "with --llm DIR, --layers N (its first N layers) or --layers N --hidden H (a fresh LLM)")
    parser.add_argument("--vision", metavar="DIR", default=None, help="SigLIP/CLIP checkpoint (full or vision-only) "
                        "with its image processor (without --from-teacher)")
    parser.add_argument("--llm", metavar="DIR", default=None, help="causal LM checkpoint with its tokenizer (with "
                        "--from-teacher: over the teacher's vocabulary)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="with --from-teacher: the teacher's first N decoder layers, or with --hidden a fresh "
                        "Qwen2 LLM of N layers")
    parser.add_argument("--hidden", type=int, default=None, metavar="H",
                        help="with --from-teacher --layers N: hidden size of a fresh Qwen2 LLM")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the student")
    parser.add_argument("--pool-size", type=int, default=12, metavar="P",
                        help="pool each tile's patch grid to P x P tokens (default: 12, EM-KD's 144 tokens)")
    parser.add_argument("--compressor", choices=COMPRESSORS, default="pool",
                        help="'pool' (default) or 'none' (keep every patch token, vanilla LLaVA)")
    parser.add_argument("--vision-feature-layer", type=int, default=-2, metavar="L",
                        help="vision tower hidden state to read (default: -2, the penultimate layer)")
    parser.add_argument("--anyres", action="store_true", help="LLaVA-NeXT AnyRes tiling (base view + tiles)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the student (default: the LLM checkpoint's, or the teacher's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")


def run_init_student(args: argparse.Namespace) -> int:
    """Run ``emkd init-student`` from parsed arguments; return 0. Errors in what was given are
    :class:`~emkd.errors.UserError`, which the ``emkd`` command prints as one line (exit 2)."""
    common = dict(pool_size=args.pool_size, compressor=args.compressor, anyres=args.anyres,
                  dtype=None if args.dtype is None else DTYPES[args.dtype], seed=args.seed, overwrite=args.overwrite)
    try:
        if args.from_teacher is not None:
            if args.vision is not None:
                raise UserError("--vision does not go with --from-teacher, which takes the teacher's vision tower")
            init_student_from_teacher(args.from_teacher, args.out, llm_path=args.llm, layers=args.layers,
                                      hidden=args.hidden, **common)
            return 0
        if args.vision is None or args.llm is None:
            raise UserError("give --from-teacher DIR, or both --vision DIR and --llm DIR")
        if args.layers is not None or args.hidden is not None:
            raise UserError("--layers and --hidden go with --from-teacher")
        init_student(args.vision, args.llm, args.out, vision_feature_layer=args.vision_feature_layer, **common)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # a checkpoint that is missing or does not fit: the user's to fix
        raise UserError(str(e)) from e
    return 0


__all__ = [
    "VISION_TOWERS",
    "add_image_token",
    "add_init_student_arguments",
    "copy_tokenizer_files",
    "copy_weights",
    "init_projector",
    "init_student",
    "init_student_from_teacher",
    "load_language_model",
    "load_vision_tower",
    "run_init_student",
]

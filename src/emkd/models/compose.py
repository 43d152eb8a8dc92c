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

The student is built on the CPU in ``dtype`` (default: the LLM checkpoint's dtype, e.g. bfloat16 for Qwen2; the
tower is cast to it, as LLaVA does), so building it needs roughly three copies of the weights in RAM: the loaded
components and the student. The image token must be ``"<image>"``: the data pipeline's marker and
:class:`~emkd.models.student_side.EfficientMLLMSide` both use that string.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    PreTrainedModel,
    SiglipVisionModel,
)

from emkd.models.student import COMPRESSORS, EfficientMLLMConfig, EfficientMLLMForCausalLM, EfficientProjector
from emkd.models.student_side import IMAGE_TOKEN, EfficientMLLMSide, processor_output_size

# ``model_type`` in a vision checkpoint's config.json -> the class that loads its vision tower (exact keys).
VISION_TOWERS: dict[str, type[PreTrainedModel]] = {
    "siglip": SiglipVisionModel,  # full SigLIP (text + vision): only the vision half is read
    "siglip_vision_model": SiglipVisionModel,
    "clip": CLIPVisionModel,  # full CLIP: only the vision half is read
    "clip_vision_model": CLIPVisionModel,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    tokenizer.save_pretrained(out_dir)
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


# ---- command line -----------------------------------------------------------------------------------------------
def add_init_student_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``emkd init-student``; pair with ``parser.set_defaults(func=run_init_student)``."""
    parser.add_argument("--vision", required=True, metavar="DIR", help="SigLIP/CLIP checkpoint (full or vision-only) "
                        "with its image processor")
    parser.add_argument("--llm", required=True, metavar="DIR", help="causal LM checkpoint with its tokenizer")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the student")
    parser.add_argument("--pool-size", type=int, default=12, metavar="P",
                        help="pool each tile's patch grid to P x P tokens (default: 12, EM-KD's 144 tokens)")
    parser.add_argument("--compressor", choices=COMPRESSORS, default="pool",
                        help="'pool' (default) or 'none' (keep every patch token, vanilla LLaVA)")
    parser.add_argument("--vision-feature-layer", type=int, default=-2, metavar="L",
                        help="vision tower hidden state to read (default: -2, the penultimate layer)")
    parser.add_argument("--anyres", action="store_true", help="LLaVA-NeXT AnyRes tiling (base view + tiles)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the student (default: the LLM checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")


def run_init_student(args: argparse.Namespace) -> int:
    """Run ``emkd init-student`` from parsed arguments; return 0, or 2 after printing the error to stderr."""
    try:
        init_student(
            args.vision,
            args.llm,
            args.out,
            pool_size=args.pool_size,
            compressor=args.compressor,
            vision_feature_layer=args.vision_feature_layer,
            anyres=args.anyres,
            dtype=None if args.dtype is None else DTYPES[args.dtype],
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as e:
        print(f"emkd init-student: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "VISION_TOWERS",
    "add_image_token",
    "add_init_student_arguments",
    "copy_weights",
    "init_projector",
    "init_student",
    "load_language_model",
    "load_vision_tower",
    "run_init_student",
]

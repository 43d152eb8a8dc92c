"""Instruction-Relevance Score of every teacher layer (Align-TI Eq. 3, App. B.5; SPEC §6), and ``emkd irs``.

For every calibration sample ``x`` and decoder layer ``l``, ``a_l(x)`` is the teacher's attention from the
instruction tokens to the vision tokens, averaged over heads and instruction tokens
(:func:`emkd.losses.align_ti.instruction_vision_attention`). All layers are recorded in ONE forward per batch: a
forward hook on every layer's attention module reduces that layer's ``[B, H, L, L]`` weights to ``a_l(x)`` at once,
so no ``[L, L]`` map outlives its layer (:func:`emkd.models.attention.hooked_attention`, which runs the recorded
layers, here all of them, under eager attention for the recording and restores the implementation afterwards).

Pairs. ``IRS(l) = 1 - mean cos(a_l(x1), a_l(x2))`` needs vectors of equal length, so only samples with the same
number of vision tokens ``Nv`` are paired (with AnyRes teachers ``Nv`` depends on the image's aspect ratio). Among
all such pairs of distinct samples, ``num_pairs`` (default 1,024: Align-TI App. B.5 estimates the IRS over "1K input
pairs") are drawn uniformly without replacement with ``seed``; when there are no more than that, every pair is used
and the result says how many (``N`` samples of one ``Nv`` give ``N (N - 1) / 2`` pairs: 1,024 takes at least 46
samples of one ``Nv``). Each ``Nv`` group gets the share of the draw that falls in it, its pairs are scored by
:func:`~emkd.losses.align_ti.instruction_relevance_score`, and the groups' scores are averaged weighted by their
number of pairs. The result is the mean over a uniform sample of equal-``Nv`` pairs. Samples without instruction
tokens (the ``plain`` template), without vision tokens, or whose instruction tokens all precede the image (causal
attention then gives ``a_l(x) = 0``, a vector without direction) are skipped.

Layers are numbered ``0 .. num_layers - 1`` (decoder layers, input side first); ``best_layer`` is the argmax.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from emkd.losses.align_ti import instruction_relevance_score, instruction_vision_attention
from emkd.models.attention import hooked_attention
from emkd.models.base import DistillAdapter

IRS_JSON = "irs.json"
IRS_PNG = "irs.png"
# Align-TI App. B.5: "We estimate this expectation by constructing a set of 1K input pairs"
DEFAULT_NUM_PAIRS = 1024


@contextmanager
def recorded_instruction_attention(
    model: torch.nn.Module, vision_mask: torch.Tensor, instruction_mask: torch.Tensor
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record ``a_l(x)`` of every decoder layer during the forward run inside the block.

    Args:
        model: a model with ``get_decoder()`` whose decoder has ``layers[i].self_attn`` (the student class and every
            Hugging Face teacher).
        vision_mask, instruction_mask: ``[B, L]`` bool of the batch the block will run.

    Yields:
        ``record[l]``: one ``[Nv_b]`` float32 tensor per sample (empty without instruction tokens), filled by the
        forward.
    """
    record: dict[int, list[torch.Tensor]] = {}

    def keep(layer: int, weights: torch.Tensor) -> None:  # (B, H, L, L)
        vm, im = vision_mask.to(weights.device), instruction_mask.to(weights.device)
        record[layer] = [a.cpu() for a in instruction_vision_attention(weights.detach(), vm, im)]

    with hooked_attention(model, range(len(model.get_decoder().layers)), keep):
        yield record


def _allocate_pairs(group_pairs: list[int], num_pairs: int, seed: int) -> list[int]:
    """How many of ``num_pairs`` uniform draws (without replacement) over all groups' pairs fall in each group."""
    total = sum(group_pairs)
    if total <= num_pairs:
        return list(group_pairs)
    bounds = torch.tensor(group_pairs).cumsum(0)  # group g holds the pair indices [bounds[g-1], bounds[g])
    drawn = torch.tensor(random.Random(seed).sample(range(total), num_pairs))
    group = torch.searchsorted(bounds, drawn, right=True)
    return torch.bincount(group, minlength=len(group_pairs)).tolist()


def _instruction_follows_vision(vision: torch.Tensor, instruction: torch.Tensor) -> bool:
    """Whether some instruction token comes after some vision token (``[L]`` bool masks); otherwise causal
    attention gives ``a_l(x) = 0`` at every layer and the sample has no direction to compare."""
    v, i = vision.nonzero(), instruction.nonzero()
    return bool(v.numel() and i.numel() and int(i.max()) > int(v.min()))


def compute_irs(
    teacher: DistillAdapter,
    batches: Iterable[dict[str, torch.Tensor]],
    num_pairs: int = DEFAULT_NUM_PAIRS,
    seed: int = 0,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """IRS of every decoder layer of ``teacher`` over calibration batches (Align-TI Eq. 3).

    Args:
        teacher: the teacher's adapter (its ``side.image_token_id`` marks the vision tokens).
        batches: teacher sides of collated batches (``input_ids``, ``attention_mask``, ``labels``,
            ``instruction_mask``, image inputs), e.g. ``(b["teacher"] for b in loader)``.
        num_pairs: pairs of distinct samples with equal ``Nv`` to average over, drawn with ``seed``; all of them
            when there are no more (module docstring).
        seed: seeds the draw of pairs.
        max_samples: stop after this many samples (``None``: all).

    Returns:
        ``{"scores": [IRS(0), ..., IRS(num_layers - 1)], "best_layer": argmax, "num_samples": samples used (with
        instruction tokens after vision tokens), "num_pairs": pairs averaged over, "groups": {Nv: samples}}``.

    Raises:
        ValueError: fewer than two usable samples share an ``Nv``.
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    by_nv, seen, skipped = _layer_vectors(teacher, batches, max_samples)
    groups = {nv: len(v) for nv, v in sorted(by_nv.items())}
    usable = [nv for nv, n in groups.items() if n >= 2]
    if not usable:
        raise ValueError(
            f"IRS needs two samples with the same number of vision tokens; got {seen} samples ({skipped} skipped: no "
            f"instruction token after a vision token), vision-token counts of the rest {groups}"
        )
    scores, used = _pooled_scores({nv: by_nv[nv] for nv in usable}, teacher.num_layers, num_pairs, seed)
    return {
        "scores": [float(s) for s in scores],
        "best_layer": int(scores.argmax()),
        "num_samples": sum(groups.values()),
        "num_pairs": used,
        "groups": {str(nv): n for nv, n in groups.items()},
    }


def _layer_vectors(
    teacher: DistillAdapter, batches: Iterable[dict[str, torch.Tensor]], max_samples: int | None
) -> tuple[dict[int, list[torch.Tensor]], int, int]:
    """``a_l(x)`` of every layer for the first ``max_samples`` samples, one teacher forward per batch.

    Returns:
        ``(by_nv, seen, skipped)``: ``by_nv[Nv]`` holds one ``[num_layers, Nv]`` tensor per usable sample with ``Nv``
        vision tokens; ``seen`` samples were read, ``skipped`` of them unusable (module docstring).
    """
    num_layers = teacher.num_layers
    by_nv: dict[int, list[torch.Tensor]] = {}
    seen = skipped = 0
    for side in batches:
        if max_samples is not None and seen >= max_samples:
            break
        if side.get("instruction_mask") is None:
            raise ValueError("compute_irs needs instruction_mask in every batch (the instruction tokens)")
        attention = side["attention_mask"].bool()
        vision = (side["input_ids"] == teacher.side.image_token_id) & attention
        instruction = side["instruction_mask"].bool() & attention
        with torch.no_grad(), recorded_instruction_attention(teacher.model, vision, instruction) as record:
            teacher(side)
        if sorted(record) != list(range(num_layers)):
            raise RuntimeError(f"recorded attention of layers {sorted(record)}, expected 0..{num_layers - 1}")
        for b in range(side["input_ids"].shape[0]):
            if max_samples is not None and seen >= max_samples:
                break
            seen += 1
            vectors = [record[l][b] for l in range(num_layers)]
            if vectors[0].numel() == 0 or not _instruction_follows_vision(vision[b], instruction[b]):
                skipped += 1
                continue
            by_nv.setdefault(vectors[0].numel(), []).append(torch.stack(vectors))  # (num_layers, Nv)
    return by_nv, seen, skipped


def _pooled_scores(
    by_nv: dict[int, list[torch.Tensor]], num_layers: int, num_pairs: int, seed: int
) -> tuple[torch.Tensor, int]:
    """``(scores [num_layers], pairs used)``: each ``Nv`` group's IRS over its share of ``num_pairs`` uniform draws
    of equal-``Nv`` pairs, averaged weighted by its number of pairs (Align-TI Eq. 3; groups of >= 2 samples)."""
    available = [len(v) * (len(v) - 1) // 2 for v in by_nv.values()]
    shares = _allocate_pairs(available, num_pairs, seed)
    total = torch.zeros(num_layers)
    used = 0
    for vectors, k in zip(by_nv.values(), shares):
        if k == 0:
            continue
        stacked = torch.stack(vectors, dim=1)  # (num_layers, N, Nv)
        total += k * instruction_relevance_score(stacked, num_pairs=k, seed=seed)
        used += k
    return total / used, used  # (num_layers,)


def format_scores(scores: list[float], layers: list[int]) -> list[str]:
    """``scores[l]`` for each of ``layers`` with the fewest significant digits (at least 4) that tell them all apart,
    so near-equal or tiny scores never print alike or as ``0.0000``."""
    values = [float(scores[layer]) for layer in layers]
    for digits in range(4, 18):
        texts = [f"{v:.{digits}g}" for v in values]
        if len(set(texts)) == len(set(values)):
            return texts
    return [repr(v) for v in values]


def write_irs(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``irs.json`` (the result of :func:`compute_irs`) and ``irs.png`` (IRS per layer, argmax marked).

    The plot uses matplotlib's object-oriented Agg canvas, so the global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / IRS_JSON, out_dir / IRS_PNG
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    scores, best = result["scores"], result["best_layer"]
    (best_text,) = format_scores(scores, [best])
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(scores)), scores, marker="o", color="tab:blue")
    ax.plot([best], [scores[best]], marker="*", markersize=16, color="tab:red", linestyle="none",
            label=f"best layer {best} (IRS {best_text})")
    ax.set_xlabel("teacher decoder layer")
    ax.set_ylabel("IRS = 1 - mean cos")
    ax.set_title(f"Instruction-Relevance Score ({result['num_pairs']} pairs, {result['num_samples']} samples)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return json_path, png_path


# ---- command line -----------------------------------------------------------------------------------------------
def add_irs_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``emkd irs``."""
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    parser.add_argument(
        "--student",
        default=None,
        help="student checkpoint directory; when given, samples are rendered as a training pair (and checked the "
        "same way); otherwise they are rendered for the teacher alone",
    )
    parser.add_argument("--data", required=True, help="calibration records (LLaVA JSON/JSONL or HF messages)")
    parser.add_argument("--images", default=None, help="directory image paths resolve against (default: the data "
                        "file's directory)")
    parser.add_argument("--out", default="runs/irs", help="where irs.json and irs.png are written")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most this many samples")
    parser.add_argument(
        "--num-pairs", type=int, default=DEFAULT_NUM_PAIRS,
        help="pairs of distinct samples with the same number of vision tokens averaged over (default %(default)s: "
        "Align-TI's \"1K input pairs\", App. B.5), drawn with --seed; when the samples give no more pairs than "
        "this (N samples of one vision-token count give N(N-1)/2), all of them are used and irs.json records how "
        "many: 1,024 needs at least 46 usable samples",
    )
    parser.add_argument("--template", choices=("chat", "plain"), default="chat",
                        help="rendering template ('plain' has no instruction tokens, so IRS needs 'chat')")
    parser.add_argument("--max-length", type=int, default=2048, help="longest rendered sample")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per teacher forward")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of pairs")
    parser.add_argument("--teacher-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype the teacher runs in")


def run_irs(args: argparse.Namespace) -> int:
    """``emkd irs``: score every teacher layer on calibration data, write ``irs.json`` and ``irs.png``."""
    from emkd.data import PairCollator, PairDataset
    from emkd.models.student_side import load_student
    from emkd.models.teachers import load_teacher

    teacher = load_teacher(args.teacher, dtype=getattr(torch, args.teacher_dtype))
    student_side = teacher.side if args.student is None else load_student(args.student)[1]
    data = PairDataset(args.data, args.images, student_side, teacher.side, template=args.template,
                       max_length=args.max_length)
    count = len(data) if args.max_samples is None else min(len(data), args.max_samples)
    collate = PairCollator(student_side, teacher.side)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, count, args.batch_size):
            items = [data[i] for i in range(start, min(start + args.batch_size, count))]
            yield collate(items)["teacher"]

    result = compute_irs(teacher, batches(), num_pairs=args.num_pairs, seed=args.seed, max_samples=count)
    json_path, png_path = write_irs(result, args.out)
    print(irs_summary(result) + f"; wrote {json_path} and {png_path}")
    if result["num_pairs"] < args.num_pairs:
        print(f"emkd irs: note: the samples give {result['num_pairs']} pairs with equal vision-token counts, fewer "
              f"than --num-pairs {args.num_pairs}: all of them were used (more samples give more pairs)",
              file=sys.stderr)
    return 0


def irs_summary(result: dict[str, Any]) -> str:
    """One line: the best layer and its IRS, and the runner-up's, printed with digits enough to tell them apart."""
    scores, best = result["scores"], result["best_layer"]
    others = sorted((i for i in range(len(scores)) if i != best), key=lambda i: -scores[i])
    line = f"IRS over {result['num_pairs']} pairs of {result['num_samples']} samples: best layer {best} of {len(scores)}"
    if not others:
        return line + f" (IRS {format_scores(scores, [best])[0]})"
    best_text, next_text = format_scores(scores, [best, others[0]])
    return line + f" (IRS {best_text}; next: layer {others[0]}, IRS {next_text})"


__all__ = [
    "add_irs_arguments",
    "compute_irs",
    "format_scores",
    "irs_summary",
    "recorded_instruction_attention",
    "run_irs",
    "write_irs",
]

"""``emkd data check``: every problem of a data file, before a run starts; and the scan that training shares.

:func:`scan_file` reads a file (:func:`emkd.data.records.read_records`), applies the structural rules
(:func:`emkd.data.records.validate_record`) and, when model sides are given, renders each good record for both sides
(:func:`emkd.data.render.render_pair`) to catch ``template``, ``image_token_in_text`` and ``too_long`` problems.
:class:`emkd.data.PairDataset` runs the same scan, so a file that ``emkd data check`` passes trains without a data
error, and vice versa.

On the command line no model is loaded: ``--max-length`` needs ``--tokenizer`` (any Hugging Face tokenizer path)
and ``--image-tokens`` (image tokens per image on the longer side, the teacher's; for AnyRes teachers give the
largest count an image can take) and ``--image-wrapper OPEN CLOSE`` when the teacher wraps images (Qwen2-VL:
``"<|vision_start|>" "<|vision_end|>"``). Image paths must stay inside ``--images`` unless
``--allow-outside-images`` is given (as the recipe's ``data.allow_outside_images``). The exit code is 1 when any
record is bad or the file holds no record at all, 0 otherwise, and 2 for usage errors and a file that cannot be read
(printed as one line, ``emkd data check: error: ...``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from emkd.data.records import BadRecord, Problem, Record, RecordError, load_images, read_records, validate_record
from emkd.data.render import TEMPLATES, SampleError, render_pair
from emkd.models.base import VisionSide


@dataclass
class CheckReport:
    """The outcome of a scan: the good records (in file order) and every bad one with its problems."""

    path: str
    records: list[Record] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)
    images_dir: str | None = None  # the folder image paths were resolved against

    @property
    def images_dir_hint(self) -> str | None:
        """One line when most records' images are missing (a wrong images folder, not many bad records), else
        ``None``."""
        missing = sum("missing_image" in bad.kinds for bad in self.bad)
        if missing < 2 or 2 * missing <= self.num_records:
            return None
        where = self.images_dir if self.images_dir is not None else "the data file's folder"
        return (f"hint: {missing} of {self.num_records} records have missing images, looked for in {where}; the "
                "images folder is probably wrong: pass --images DIR (the folder the records' image paths start from)")

    @property
    def num_records(self) -> int:
        return len(self.records) + len(self.bad)

    @property
    def empty(self) -> bool:
        """The file holds no record (no bytes, only blank lines, or ``[]``)."""
        return self.num_records == 0

    @property
    def ok(self) -> bool:
        """No bad record, and at least one good one."""
        return not self.bad and not self.empty

    def counts(self) -> dict[str, int]:
        """Number of bad records per problem kind."""
        out: dict[str, int] = {}
        for bad in self.bad:
            for kind in dict.fromkeys(bad.kinds):
                out[kind] = out.get(kind, 0) + 1
        return out

    def format(self, limit: int | None = None) -> str:
        """A human-readable report: one line per bad record (the first ``limit``), then a summary."""
        lines = [f"  {bad}" for bad in self.bad[:limit]]
        if limit is not None and len(self.bad) > limit:
            lines.append(f"  ... and {len(self.bad) - limit} more")
        summary = f"{self.path}: {self.num_records} records, {len(self.bad)} bad"
        if self.empty:
            summary = f"{self.path}: 0 records: the file is empty (no record to train or evaluate on)"
        if self.bad:
            summary += " (" + ", ".join(f"{k}: {n}" for k, n in self.counts().items()) + ")"
        hint = self.images_dir_hint
        return "\n".join(lines + [summary] + ([hint] if hint else []))


def scan_file(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    student_side: VisionSide | None = None,
    teacher_side: VisionSide | None = None,
    template: str = "chat",
    max_length: int | None = None,
    allow_outside_images: bool = False,
) -> CheckReport:
    """Read and validate every record of ``path``; render each good one when sides are given.

    Args:
        path: a JSON list, JSONL or parquet file (LLaVA or Hugging Face ``messages`` records), or a mixture file of
            such sources (:mod:`emkd.data.sources`).
        images_dir: where image paths resolve (``None``: the data file's directory).
        student_side, teacher_side: both or neither; with them, each record is rendered as training renders it
            (images are loaded and preprocessed by both sides).
        template: ``"chat"`` or ``"plain"``.
        max_length: the length limit of the render (needs the sides to count image tokens).
        allow_outside_images: accept image paths that are absolute or climb out of ``images_dir``.

    Raises:
        ValueError: bad arguments, or a configuration bug found while rendering (the sides tokenize differently).
        FileNotFoundError: ``path`` does not exist.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if (student_side is None) != (teacher_side is None):
        raise ValueError("pass both student_side and teacher_side, or neither")
    if max_length is not None and student_side is None:
        raise ValueError("max_length needs student_side and teacher_side to count image tokens")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    folder = images_dir if images_dir is not None else os.path.dirname(os.path.abspath(path))
    report = CheckReport(os.fspath(path), images_dir=os.fspath(folder))
    for item in read_records(path):
        if isinstance(item, BadRecord):
            report.bad.append(item)
            continue
        problems = validate_record(item, images_dir, template, allow_outside_images=allow_outside_images)
        if not problems and student_side is not None:
            problems = _render_problems(
                item, images_dir, student_side, teacher_side, template, max_length, allow_outside_images
            )
        if problems:
            report.bad.append(BadRecord(item.source, item.id, tuple(problems)))
        else:
            report.records.append(item)
    return report


def _render_problems(
    record: Record,
    images_dir: Any,
    student_side: Any,
    teacher_side: Any,
    template: str,
    max_length: int | None,
    allow_outside_images: bool = False,
) -> list[Problem]:
    try:
        images = load_images(record, images_dir, allow_outside_images)
    except RecordError as e:  # e.g. verify() passed but decoding failed (truncated pixel data)
        return [e.problem]
    try:
        render_pair(record, images, student_side, teacher_side, template, max_length)
    except SampleError as e:
        return [e.problem]
    return []


def check_file(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    student_side: VisionSide | None = None,
    teacher_side: VisionSide | None = None,
    max_length: int | None = None,
    template: str = "chat",
    allow_outside_images: bool = False,
) -> CheckReport:
    """The logic of ``emkd data check``: :func:`scan_file` with the arguments in the CLI's order."""
    return scan_file(path, images_dir, student_side, teacher_side, template, max_length, allow_outside_images)


class CountingSide(VisionSide):
    """A vision side that only counts: ``tokens_per_image`` image tokens per image, no pixels (for the CLI check).

    Its ``image_token_id`` is ``-1``, which no tokenizer produces, so only the count matters.
    """

    def __init__(self, tokenizer: Any, tokens_per_image: int, image_wrapper: tuple[str, str] = ("", "")):
        self.tokenizer = tokenizer
        self.image_token_id = -1
        self.image_wrapper = tuple(image_wrapper)
        self.tokens_per_image = int(tokens_per_image)

    def image_inputs(self, images: list) -> dict[str, torch.Tensor]:
        return {}

    def num_image_tokens(self, image_inputs: dict[str, torch.Tensor], index: int) -> int:
        return self.tokens_per_image

    def collate_image_inputs(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {}


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``emkd data check`` to ``parser``; pair with ``parser.set_defaults(func=run_check)``."""
    parser.add_argument("file", help="a JSON list, JSONL or parquet data file (LLaVA or Hugging Face 'messages' "
                        "records), or a .yaml mixture of such files")
    parser.add_argument("--images", metavar="DIR", default=None, help="image root (default: the data file's folder)")
    parser.add_argument("--template", choices=TEMPLATES, default="chat", help="rendering template (default: chat)")
    parser.add_argument(
        "--max-length", type=int, default=None, metavar="N", help="flag samples whose prompt and image tokens exceed N"
    )
    parser.add_argument(
        "--tokenizer", default=None, metavar="PATH", help="tokenizer to render with (needed by --max-length)"
    )
    parser.add_argument(
        "--image-tokens",
        type=int,
        default=None,
        metavar="N",
        help="image tokens per image on the teacher side (needed by --max-length)",
    )
    parser.add_argument(
        "--image-wrapper",
        nargs=2,
        default=("", ""),
        metavar=("OPEN", "CLOSE"),
        help="text around each image's tokens, e.g. '<|vision_start|>' '<|vision_end|>'",
    )
    parser.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="accept image paths that are absolute or climb out of --images with '..' (as the recipe's "
        "data.allow_outside_images: true); by default they are bad records (image_outside)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="list at most N bad records")


def run_check(args: argparse.Namespace) -> int:
    """Run ``emkd data check`` from parsed arguments; print the report; return 1 if any record is bad or the file
    holds no record, 2 when the check cannot run (printed as one line), else 0."""
    side = None
    if args.max_length is not None and (args.tokenizer is None or args.image_tokens is None):
        print("emkd data check: error: --max-length needs --tokenizer and --image-tokens to count tokens",
              file=sys.stderr)
        return 2
    if args.tokenizer is not None:
        from transformers import AutoTokenizer

        tokens = args.image_tokens if args.image_tokens is not None else 1
        side = CountingSide(AutoTokenizer.from_pretrained(args.tokenizer), tokens, tuple(args.image_wrapper))
    try:
        report = check_file(args.file, args.images, side, side, args.max_length, args.template,
                            getattr(args, "allow_outside_images", False))
    except (OSError, ValueError) as e:
        print(f"emkd data check: error: {e}", file=sys.stderr)
        return 2
    print(report.format(args.limit))
    return 0 if report.ok else 1

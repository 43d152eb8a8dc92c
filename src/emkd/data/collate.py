"""The training data of a distillation run: one conversation rendered for both models, and their batches.

:class:`PairDataset` validates a whole file upfront (the scan of ``emkd data check``, including rendering every
record for both sides to check ``max_length``) and renders each sample lazily when it is read.
:class:`PairCollator` right-pads each side of a list of samples to a batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from emkd.data.check import CheckReport, scan_file
from emkd.data.records import BadRecord, Problem, Record, Source, load_images, read_records
from emkd.data.render import TEMPLATES, render_pair
from emkd.inputs import IGNORE_INDEX
from emkd.models.base import VisionSide

ON_BAD_SAMPLE = ("error", "skip")


class PairDataset(torch.utils.data.Dataset):
    """Conversations of one data file, each rendered for the student and the teacher.

    Args:
        path: a JSON list or JSONL file of LLaVA or Hugging Face ``messages`` records.
        images_dir: where image paths resolve (``None``: the data file's directory).
        student_side, teacher_side: the two models' :class:`emkd.models.VisionSide`.
        template: ``"chat"`` (the tokenizer's chat template) or ``"plain"`` (LLaVA caption pretraining).
        max_length: longest sequence on either side; longer samples are truncated after the prompt at a text
            position, and those whose prompt and image tokens do not fit are bad (see :mod:`emkd.data.render`).
            ``None``: no limit.
        on_bad_sample: ``"error"`` raises a ``ValueError`` listing the first bad records; ``"skip"`` keeps the good
            ones and lists the others, with their reasons, in :attr:`skipped`. A file with no good record raises
            under either policy.

    Every record is validated and rendered once upfront (images are loaded and preprocessed by both sides), so the
    constructor costs one pass over the data. ``dataset[i]`` is ``{"student": {...}, "teacher": {...}, "id": ...,
    "index": i}``, each side as :func:`emkd.data.render.render_pair` returns it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        images_dir: str | os.PathLike | None,
        student_side: VisionSide,
        teacher_side: VisionSide,
        template: str = "chat",
        max_length: int | None = 2048,
        on_bad_sample: str = "error",
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.path = os.fspath(path)
        self.images_dir = images_dir
        self.student_side = student_side
        self.teacher_side = teacher_side
        self.template = template
        self.max_length = max_length
        report = cached_scan(path, images_dir, student_side, teacher_side, template, max_length)
        if report.bad and on_bad_sample == "error":
            raise ValueError(
                f"{len(report.bad)} of {report.num_records} records of {self.path} are bad (on_bad_sample='error'); "
                f"the first:\n{report.format(limit=5)}\nRun `emkd data check` for the full list, fix the data, or "
                "pass on_bad_sample='skip'."
            )
        if not report.records:
            raise ValueError(f"{self.path} has no usable records ({len(report.bad)} bad):\n{report.format(limit=5)}")
        self.records: list[Record] = report.records
        self.skipped: list[BadRecord] = report.bad

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        images = load_images(record, self.images_dir)
        student, teacher = render_pair(
            record, images, self.student_side, self.teacher_side, self.template, self.max_length
        )
        return {"student": student, "teacher": teacher, "id": record.id, "index": index}


def side_fingerprint(side: VisionSide) -> str:
    """What decides how a side renders a record: tokenizer, image token, wrapper, image processor, model config."""
    parts = [type(side).__qualname__, str(side.image_token_id), repr(side.image_wrapper)]
    tokenizer = side.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts.append(backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())))
    parts.append(str(getattr(tokenizer, "chat_template", "")))
    for name in ("image_processor", "config"):
        obj = getattr(side, name, None)
        if obj is not None and hasattr(obj, "to_json_string"):
            parts.append(obj.to_json_string())
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_dir() -> Path:
    """``$EMKD_CACHE`` or ``$XDG_CACHE_HOME/emkd`` (default ``~/.cache/emkd``)."""
    if os.environ.get("EMKD_CACHE"):
        return Path(os.environ["EMKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emkd"


def cached_scan(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    student_side: VisionSide,
    teacher_side: VisionSide,
    template: str,
    max_length: int | None,
) -> CheckReport:
    """:func:`emkd.data.check.scan_file`, remembered across runs.

    The scan renders every record for both sides, which costs as much as an epoch of preprocessing; a run that
    reads the same file with the same sides again (a second method, a resumed run, another seed) reuses the
    outcome. The key covers the data file (absolute path, size, modification time), the image directory, the
    template, ``max_length`` and both sides' fingerprints. Images changed after a scan are not re-checked; a
    missing image then fails when the sample is read, naming the record. ``EMKD_CACHE=0`` disables the cache.
    """
    if os.environ.get("EMKD_CACHE") == "0":
        return scan_file(path, images_dir, student_side, teacher_side, template, max_length)
    stat = os.stat(path)
    key = hashlib.sha256(json.dumps([
        os.path.abspath(path), stat.st_size, stat.st_mtime_ns,
        None if images_dir is None else os.path.abspath(images_dir), template, max_length,
        side_fingerprint(student_side), side_fingerprint(teacher_side),
    ]).encode()).hexdigest()[:32]
    cache = cache_dir() / "scans" / f"{key}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        good = set(saved["good"])
        report = CheckReport(os.fspath(path))
        report.records = [r for r in read_records(path) if isinstance(r, Record) and source_key(r.source) in good]
        report.bad = [
            BadRecord(Source(**b["source"]), b["id"], tuple(Problem(**p) for p in b["problems"])) for b in saved["bad"]
        ]
        if len(report.records) == len(good):
            return report
    report = scan_file(path, images_dir, student_side, teacher_side, template, max_length)
    payload = {
        "good": [source_key(r.source) for r in report.records],
        "bad": [{"source": vars(b.source), "id": b.record_id, "problems": [vars(p) for p in b.problems]}
                for b in report.bad],
    }
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the next run a rescan
    return report


def source_key(source: Source) -> str:
    """A record's place in its file, independent of the file's path: ``"line:index"`` (one of them is ``None``)."""
    return f"{source.line}:{source.index}"


class PairCollator:
    """Batch samples of :class:`PairDataset`: right-pad each side to its longest sequence.

    Args:
        student_side, teacher_side: the sides whose ``collate_image_inputs`` batch the image inputs.
        pad_token_id: the id put in padded ``input_ids`` (``None``: the teacher tokenizer's ``pad_token_id``).
        with_index: also give each side ``index`` ``[B]`` long, the samples' :class:`PairDataset` indices (what a
            teacher cache is looked up by; see :mod:`emkd.training.teacher_cache`). Every item then needs
            ``"index"``.

    Returns (when called on a list of samples): ``{"student": side, "teacher": side}``, each side with
    ``input_ids`` ``[B, L]`` long (padded with ``pad_token_id``), ``attention_mask`` ``[B, L]`` long (0 on padding),
    ``labels`` ``[B, L]`` long (``-100`` on padding), ``instruction_mask`` ``[B, L]`` bool (False on padding), and the
    side's collated image inputs. ``L`` differs between the two sides.
    """

    TEXT_KEYS = ("input_ids", "attention_mask", "labels", "instruction_mask")

    def __init__(
        self,
        student_side: VisionSide,
        teacher_side: VisionSide,
        pad_token_id: int | None = None,
        with_index: bool = False,
    ):
        if pad_token_id is None:
            pad_token_id = getattr(teacher_side.tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                raise ValueError("pad_token_id is None and the teacher tokenizer has no pad_token_id; pass one")
        self.student_side = student_side
        self.teacher_side = teacher_side
        self.pad_token_id = int(pad_token_id)
        self.with_index = with_index

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        if not items:
            raise ValueError("cannot collate an empty list of samples")
        batch = {
            "student": self._collate_side([it["student"] for it in items], self.student_side, "student"),
            "teacher": self._collate_side([it["teacher"] for it in items], self.teacher_side, "teacher"),
        }
        if self.with_index:
            missing = [b for b, it in enumerate(items) if "index" not in it]
            if missing:
                raise ValueError(
                    f"PairCollator(with_index=True): items {missing} of the batch have no 'index' (the PairDataset "
                    "index of the sample)"
                )
            index = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)  # (B,)
            for side in batch.values():
                side["index"] = index.clone()
        return batch

    def _collate_side(self, samples: list[dict[str, Any]], side: VisionSide, name: str) -> dict[str, torch.Tensor]:
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "instruction_mask": False}
        length = max(s["input_ids"].shape[0] for s in samples)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pads.items():
            first = samples[0][key]
            out = torch.full((len(samples), length), pad, dtype=first.dtype)  # (B, L)
            for b, s in enumerate(samples):
                out[b, : s[key].shape[0]] = s[key]
            batch[key] = out
        images = side.collate_image_inputs([s["image_inputs"] for s in samples])
        clash = set(images) & (set(batch) | {"index"})
        if clash:
            raise ValueError(f"{name} side: collated image inputs use reserved keys {sorted(clash)}")
        batch.update(images)
        return batch

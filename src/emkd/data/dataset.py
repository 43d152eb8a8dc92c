"""The training data set of a distillation run: one conversation rendered for both models (:class:`PairDataset`).

:class:`PairDataset` validates a whole file upfront (the scan of ``emkd data check``, including rendering every
record for both sides to check ``max_length``) and renders each sample lazily when it is read.

The scan is remembered across runs (:func:`cached_scan`) in ``$EMKD_CACHE/scans`` when ``EMKD_CACHE`` is set, else
``$XDG_CACHE_HOME/emkd/scans`` (``~/.cache/emkd/scans`` by default); ``EMKD_CACHE=0`` turns it off. Each entry is a
small JSON file (which records were good, and the bad ones with their reasons), keyed on the data file, every image
it names (size and modification time), the rendering settings and both models' sides; entries may be deleted at any
time.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from emkd.data.check import CheckReport, scan_file
from emkd.data.records import (
    BadRecord,
    Problem,
    Record,
    RecordError,
    Source,
    load_images,
    outside_problem,
    read_records,
    resolve_image,
)
from emkd.data.render import TEMPLATES, SampleError, render_pair
from emkd.data.sources import data_files
from emkd.errors import UserError
from emkd.models.base import VisionSide

ON_BAD_SAMPLE = ("error", "skip")


class PairDataset(torch.utils.data.Dataset):
    """Conversations of one data file, each rendered for the student and the teacher.

    Args:
        path: a JSON list, JSONL or parquet file, a ``datasets`` ``save_to_disk`` folder, or a mixture file, of
            LLaVA or Hugging Face ``messages`` records (:mod:`emkd.data.sources`).
        images_dir: where image paths resolve (``None``: the data file's directory).
        student_side, teacher_side: the two models' :class:`emkd.models.VisionSide`.
        template: ``"chat"`` (the tokenizer's chat template) or ``"plain"`` (LLaVA caption pretraining).
        max_length: longest sequence on either side; longer samples are truncated after the prompt at a text
            position, and those whose prompt and image tokens do not fit are bad (see :mod:`emkd.data.render`).
            ``None``: no limit.
        on_bad_sample: ``"error"`` raises a :class:`~emkd.errors.UserError` listing the first bad records;
            ``"skip"`` keeps the good ones and lists the others, with their reasons, in :attr:`skipped`. A file with
            no good record (or no record at all) raises under either policy. The policy also holds when a sample
            that passed the scan fails when it is read (an image deleted or changed since): ``"error"`` raises,
            naming the record; ``"skip"`` adds it to :attr:`skipped`, warns, and gives the next good sample instead
            (its ``"index"`` is its own).
        allow_outside_images: accept image paths that are absolute or climb out of ``images_dir`` with ``..``
            (the recipe's ``data.allow_outside_images``); by default they are ``image_outside`` problems.

    Every record is validated and rendered once upfront (images are loaded and preprocessed by both sides), so the
    constructor costs one pass over the data; the outcome is cached across runs (module docstring). ``dataset[i]``
    is ``{"student": {...}, "teacher": {...}, "id": ..., "index": i}``, each side as
    :func:`emkd.data.render.render_pair` returns it.
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
        allow_outside_images: bool = False,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise UserError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if template not in TEMPLATES:
            raise UserError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.path = os.fspath(path)
        self.images_dir = images_dir
        self.student_side = student_side
        self.teacher_side = teacher_side
        self.template = template
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.allow_outside_images = allow_outside_images
        report = cached_scan(path, images_dir, student_side, teacher_side, template, max_length, allow_outside_images)
        if report.empty:
            raise UserError(f"{self.path} holds no records (an empty file, only blank lines, or an empty list)")
        counts = ", ".join(f"{kind}: {n}" for kind, n in report.counts().items())
        if report.bad and on_bad_sample == "error":
            raise UserError(
                f"{len(report.bad)} of {report.num_records} records of {self.path} are bad ({counts}; "
                f"on_bad_sample='error'); the first: {report.bad[0]}. Run `emkd data check {self.path}` for the full "
                "list, fix the data, or set on_bad_sample='skip' (data.on_bad_sample: skip) to train without them"
            )
        if not report.records:
            raise UserError(
                f"{self.path} has no usable records: all {len(report.bad)} are bad ({counts}); the first: "
                f"{report.bad[0]}. Run `emkd data check {self.path}` for the full list"
            )
        self.records: list[Record] = report.records
        self.skipped: list[BadRecord] = report.bad
        self.failed: set[int] = set()  # indices of records that passed the scan but failed when read

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        if not -n <= index < n:
            raise IndexError(f"sample {index} out of range: {self.path} has {n} usable records")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self.failed:
                continue
            record = self.records[i]
            try:
                images = load_images(record, self.images_dir, self.allow_outside_images)
                student, teacher = render_pair(
                    record, images, self.student_side, self.teacher_side, self.template, self.max_length
                )
            except (RecordError, SampleError) as e:
                bad = BadRecord(record.source, record.id, (e.problem,))
                if self.on_bad_sample == "error":
                    raise UserError(
                        f"sample {i}: {bad}; the record passed the scan at the start of the run, so its data changed "
                        "since (on_bad_sample='error'). Fix the data, or set on_bad_sample='skip' "
                        "(data.on_bad_sample: skip) to drop such records."
                    ) from e
                self.failed.add(i)
                self.skipped.append(bad)
                warnings.warn(f"skipped sample {i}, {bad} (on_bad_sample='skip'); reading the next good one instead",
                              RuntimeWarning, stacklevel=2)
                continue
            return {"student": student, "teacher": teacher, "id": record.id, "index": i}
        raise UserError(f"every record of {self.path} failed when read (on_bad_sample='skip'): the data changed "
                        f"since the scan; the last: {self.skipped[-1]}")


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
    """Where emkd remembers data scans: ``$EMKD_CACHE`` or ``$XDG_CACHE_HOME/emkd`` (default ``~/.cache/emkd``)."""
    if os.environ.get("EMKD_CACHE"):
        return Path(os.environ["EMKD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emkd"


SCAN_CACHE_VERSION = 3


def images_fingerprint(
    records: list[Record | BadRecord], images_dir: str | os.PathLike | None, allow_outside_images: bool = False
) -> str:
    """SHA-256 over the size and modification time of every image the records name (``None`` for a missing one).

    Paths outside the image folder are not looked at unless ``allow_outside_images`` (they are bad anyway)."""
    digest = hashlib.sha256()
    seen: set[str] = set()
    for record in records:
        if not isinstance(record, Record) or record.embedded:  # embedded images: the data file's stat covers them
            continue
        folder = record.images_dir if record.images_dir is not None else images_dir
        for p in record.image_paths:
            if not allow_outside_images and outside_problem(p, folder, record.source.file) is not None:
                continue
            resolved = resolve_image(p, folder, record.source.file)
            if resolved in seen:
                continue
            seen.add(resolved)
            try:
                stat = os.stat(resolved)
                entry = f"{resolved}\x00{stat.st_size}\x00{stat.st_mtime_ns}"
            except OSError:
                entry = f"{resolved}\x00missing"
            digest.update(entry.encode("utf-8", "surrogateescape") + b"\x01")
    return digest.hexdigest()


def cached_scan(
    path: str | os.PathLike,
    images_dir: str | os.PathLike | None,
    student_side: VisionSide,
    teacher_side: VisionSide,
    template: str,
    max_length: int | None,
    allow_outside_images: bool = False,
) -> CheckReport:
    """:func:`emkd.data.check.scan_file`, remembered across runs in ``cache_dir()/scans`` (module docstring).

    The scan renders every record for both sides, which costs as much as an epoch of preprocessing; a run that
    reads the same file with the same sides again (a second method, a resumed run, another seed) reuses the
    outcome. The key covers the data file (absolute path, size, modification time), the image directory, the size
    and modification time of every image the records name (:func:`images_fingerprint`: a replaced, truncated or
    deleted image is a new scan), the template, ``max_length``, ``allow_outside_images`` and both sides'
    fingerprints. ``EMKD_CACHE=0`` disables the cache; an unreadable cache entry is a rescan.
    """
    if os.environ.get("EMKD_CACHE") == "0":
        return scan_file(path, images_dir, student_side, teacher_side, template, max_length, allow_outside_images)
    files = []
    for file in data_files(os.fspath(path)):  # a mixture: the mixture file and every source
        stat = os.stat(file)
        files.append([os.path.abspath(file), stat.st_size, stat.st_mtime_ns])
    items = list(read_records(path))
    key = hashlib.sha256(json.dumps([
        SCAN_CACHE_VERSION, files,
        None if images_dir is None else os.path.abspath(images_dir),
        images_fingerprint(items, images_dir, allow_outside_images), template, max_length, allow_outside_images,
        side_fingerprint(student_side), side_fingerprint(teacher_side),
    ]).encode()).hexdigest()[:32]
    cache = cache_dir() / "scans" / f"{key}.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            good = set(saved["good"])
            report = CheckReport(os.fspath(path))
            report.records = [r for r in items if isinstance(r, Record) and _scan_key(r.source) in good]
            report.bad = [
                BadRecord(Source(**b["source"]), b["id"], tuple(Problem(**p) for p in b["problems"]))
                for b in saved["bad"]
            ]
        except (OSError, ValueError, KeyError, TypeError):
            report = None  # a damaged entry: scan again and rewrite it
        if report is not None and len(report.records) == len(good):
            return report
    report = scan_file(path, images_dir, student_side, teacher_side, template, max_length, allow_outside_images)
    payload = {
        "good": [_scan_key(r.source) for r in report.records],
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
    """A record's place in its file, independent of the file's path: ``"line:index"`` (one of them is ``None``), or
    ``"row:N"`` for a parquet row."""
    if source.row is not None:
        return f"row:{source.row}"
    return f"{source.line}:{source.index}"


def _scan_key(source: Source) -> str:
    """A record's place among the records of a data path (a mixture's come from several files)."""
    return f"{os.path.abspath(source.file)}\x00{source_key(source)}"

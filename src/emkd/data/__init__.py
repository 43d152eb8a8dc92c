"""The data pipeline: LLaVA-format conversations to token ids, labels and masks for a student/teacher pair.

* :mod:`emkd.data.records`: read LLaVA (``conversations``) and Hugging Face (``messages``) records from JSON or JSONL,
  decoding each record on its own, normalise them to :class:`Record`, and validate them (:class:`BadRecord` lists
  every problem with file and line; image paths stay inside the image folder unless the caller opts out).
* :mod:`emkd.data.sources`: parquet files and ``datasets`` folders (images embedded as bytes), mixture files of
  several sources with sampling strategies (LLaVA-NeXT's data YAMLs).
* :mod:`emkd.data.render`: the ``chat`` and ``plain`` templates, tokenization with exact assistant-only labels and
  instruction masks, and :func:`render_pair` (one conversation, two vision sides, identical text tokens).
* :mod:`emkd.data.dataset`: :class:`PairDataset` (validates upfront, renders lazily; the scan is remembered across
  runs).
* :mod:`emkd.data.collate`: :class:`PairCollator`.
* :mod:`emkd.data.check`: ``emkd data check`` (:func:`check_file`, :func:`run_check`).
"""

from emkd.data.check import CheckReport, CountingSide, add_check_arguments, check_file, run_check, scan_file
from emkd.data.collate import PairCollator
from emkd.data.dataset import ON_BAD_SAMPLE, PairDataset
from emkd.data.records import (
    IMAGE_MARKER,
    PROBLEM_KINDS,
    BadRecord,
    Part,
    Problem,
    RawRecord,
    Record,
    RecordError,
    Source,
    Turn,
    load_images,
    read_objects,
    read_records,
    validate_record,
)
from emkd.data.render import TEMPLATES, RenderedText, SampleError, render_pair, render_side, render_text

__all__ = [
    "IMAGE_MARKER",
    "ON_BAD_SAMPLE",
    "PROBLEM_KINDS",
    "TEMPLATES",
    "BadRecord",
    "CheckReport",
    "CountingSide",
    "PairCollator",
    "PairDataset",
    "Part",
    "Problem",
    "RawRecord",
    "Record",
    "RecordError",
    "RenderedText",
    "SampleError",
    "Source",
    "Turn",
    "add_check_arguments",
    "check_file",
    "load_images",
    "read_objects",
    "read_records",
    "render_pair",
    "render_side",
    "render_text",
    "run_check",
    "scan_file",
    "validate_record",
]

"""The teacher's outputs computed once and stored on disk (``emkd cache-teacher``), and a teacher that reads them.

EM-KD, LLaVA-KD and the response-KD baselines read from the frozen teacher only its final hidden states (as the LM
head consumes them, SPEC §1) and its LM head. The teacher gives every sample the same outputs in every epoch, so
:func:`cache_teacher` runs it once over a data set, rendered exactly as training renders it (a
:class:`~emkd.data.PairDataset` with the teacher side), and stores per sample the hidden states at its real
(non-padding) positions — vision tokens, text tokens and response positions — with the vision mask of those
positions. Training with ``teacher_cache: DIR`` then loads no teacher model: :class:`CachedTeacher` is a
:class:`~emkd.models.DistillAdapter` that rebuilds, from the cache and the collated teacher side of a batch (which
the collator still renders: labels, masks, token ids), the :class:`~emkd.DistillInputs` the live teacher would give.

A cache directory::

    index.json                          written last; a directory without it is not a cache
    head.safetensors                    "weight" [V, D] (and "bias" [V]) in the dtype the teacher ran in
    cache-00000-of-000NN.safetensors    per sample i: "s{i}.hidden" [n_i, D] (cache dtype), "s{i}.vision" [n_i] bool,
    ...                                 and, with an attention layer, "s{i}.iva" [Nv_i] float32

``n_i`` is the number of real tokens of sample ``i`` (its ``attention_mask`` sum), ``i`` its
:class:`~emkd.data.PairDataset` index; a shard holds consecutive samples up to about ``shard_bytes``. With
``attention_layer=l``, ``s{i}.iva`` is ``a_l(x)`` (:func:`emkd.losses.align_ti.instruction_vision_attention`): the
teacher's head-averaged attention from the instruction tokens to each vision token at layer ``l``, exactly the
weights Align-TI's IVA consumes (zeros for a sample without instruction tokens, as in
:func:`~emkd.training.align_ti.align_ti_step`). The hidden states of such a cache come from that same eager-attention
pass, as Align-TI's IVA pass does; they agree with the default attention implementation up to float rounding.
Align-TI itself cannot train from a cache: its TPA runs the teacher on candidates sampled from the student at every
step.

A cache is written into a temporary sibling directory (``.NAME.partial-PID``) and renamed into place once
``index.json`` is in it, so an interrupted run never leaves a directory that loads; the next ``emkd cache-teacher``
in the same parent folder removes the staging folders of processes that no longer run. Using a cache checks

* when opened: ``index.json`` present, valid JSON with every field of the right type (a damaged index is a
  :class:`CacheError` naming the field), format and version, file names that stay inside the cache folder, every
  shard present with its recorded size;
* when a shard (or the LM head) is first read: its SHA-256 against ``index.json`` (``shard_sha256``,
  ``head_sha256``), so a file changed in place, even at the same size, is refused before any of its samples is used;
  ``emkd cache-teacher --verify DIR`` (:meth:`TeacherCache.verify`) checks every file and every sample's tensors in
  one pass. Caches of version 1 have no checksums: they load with a warning;
* against the teacher directory: the SHA-256 of its ``config.json``;
* against the training data set: number of samples, template, ``max_length``, the data file's content (size, then
  SHA-256 when its modification time changed), and which records were kept (their place in the file);
* per batch: each sample's number of real tokens, the SHA-256 of its token ids and its image-token positions.

Images changed after caching are not detected unless they change the number of image tokens.

Every error a user can cause (a damaged or foreign cache, data or teacher that do not match it) is a
:class:`CacheError`, a :class:`~emkd.errors.UserError`: ``emkd`` prints it as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from emkd.data import PairCollator, PairDataset
from emkd.data.collate import source_key
from emkd.errors import UserError
from emkd.inputs import DistillInputs
from emkd.losses.align_ti import instruction_vision_attention
from emkd.models.base import AdapterOutput, DistillAdapter, VisionSide
from emkd.models.compose import DTYPES
from emkd.models.teachers import checkpoint_architecture, load_teacher, load_teacher_side

CACHE_FORMAT = "emkd-teacher-cache"
CACHE_VERSION = 2  # 2: shard_sha256 and head_sha256
READABLE_VERSIONS = (1, 2)
INDEX_FILE = "index.json"
HEAD_FILE = "head.safetensors"
CACHE_DTYPES = tuple(DTYPES)  # ("float32", "bfloat16", "float16")
DEFAULT_SHARD_BYTES = 1 << 30
# top-k logits the size report compares with: k, and the bytes of one value in each dtype (+ an int32 index)
TOPK_SIZES = (8, 32, 100)
TOPK_VALUE_BYTES = {"float16": 2, "float32": 4}
# a staging folder of cache_teacher: ".NAME.partial-PID" (being written) or ".NAME.old-PID" (a replaced cache)
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
_CACHE_FILE = re.compile(r"^(cache-\d+(-of-\d+)?\.safetensors|head\.safetensors|index\.json(\.tmp)?)$")
_REBUILD = "rebuild it with `emkd cache-teacher TEACHER DATA --out DIR --overwrite`"

logger = logging.getLogger(__name__)


class CacheError(UserError):
    """A teacher cache that cannot be used: damaged, incomplete, or built from another teacher or other data."""


class CacheMissingError(CacheError, FileNotFoundError):
    """A cache directory without ``index.json``, or a file its index lists that is not there."""


class CacheExistsError(CacheError, FileExistsError):
    """``cache_teacher`` would write into a non-empty directory without ``overwrite``."""


# ---- fingerprints -----------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 16 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ids_digest(ids: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of one sample's token ids ``[n]`` (as int64)."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def teacher_fingerprint(teacher_dir: str | os.PathLike) -> str:
    """SHA-256 over the teacher checkpoint's ``config.json`` and every weight file (``*.safetensors``, ``*.bin``),
    so that a cache of other weights with the same architecture is told apart."""
    config = Path(teacher_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found; a teacher is a local checkpoint directory")
    digest = hashlib.sha256(file_sha256(config).encode())
    for weights in sorted(Path(teacher_dir).glob("*.safetensors")) + sorted(Path(teacher_dir).glob("*.bin")):
        if weights.name != "training_args.bin":
            digest.update(f"{weights.name}:{file_sha256(weights)}".encode())
    return digest.hexdigest()


def _data_identity(path: str | os.PathLike) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path)}


# ---- writing ----------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Collects per-sample tensors and writes them to numbered shards of about ``shard_bytes`` each."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[Path] = []

    @property
    def current(self) -> int:
        """Number of the shard the next sample goes to."""
        return len(self.written)

    def add(self, index: int, tensors: dict[str, torch.Tensor]) -> int:
        """Queue sample ``index``'s tensors as ``s{index}.{name}``; return the shard they go to."""
        shard = self.current
        for name, tensor in tensors.items():
            self.pending[f"s{index}.{name}"] = tensor.contiguous()
            self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.shard_bytes:
            self.flush()
        return shard

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"cache-{self.current:05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": CACHE_FORMAT})
        self.written.append(path)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Write what is pending and give the shards their final names ``cache-KKKKK-of-NNNNN.safetensors``."""
        self.flush()
        total = len(self.written)
        names = []
        for k, path in enumerate(self.written):
            name = f"cache-{k:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.directory / name)
            names.append(name)
        return names


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def clean_stale_staging(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that killed runs of :func:`cache_teacher` left next to ``out_dir``.

    A folder ``.NAME.partial-PID`` of ``out_dir``'s parent (any ``NAME``) is removed when process ``PID`` no longer
    runs and it holds only cache files (shards, head, index); ``.NAME.old-PID`` (a replaced cache whose removal was
    interrupted) only when ``NAME`` itself is there again. Anything else is left alone. Returns what was removed
    (each is also logged as a warning).
    """
    parent = Path(out_dir).parent
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink() or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not (parent / match["name"] / INDEX_FILE).is_file():
            continue  # the swap was interrupted before the new cache was in place: keep the old one
        if not all(f.is_file() and _CACHE_FILE.match(f.name) for f in entry.iterdir()):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            logger.warning("removed %s, left by `emkd cache-teacher` process %s, which no longer runs", entry,
                           match["pid"])
    return removed


def _batches(data: PairDataset, collate: PairCollator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))])["teacher"]


def cache_teacher(
    teacher_dir: str | os.PathLike,
    data: str | os.PathLike,
    images: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    template: str = "chat",
    max_length: int | None = 2048,
    batch_size: int = 4,
    dtype: str = "float32",
    attention_layer: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    teacher_dtype: str = "float32",
    on_bad_sample: str = "error",
    overwrite: bool = False,
    progress: bool = True,
    allow_outside_images: bool = False,
) -> dict[str, Any]:
    """Run the frozen teacher once over ``data`` and write its outputs to ``out_dir`` (module docstring).

    Args:
        teacher_dir: the teacher checkpoint directory (as ``teacher=`` of a recipe).
        data, images: the training records and their image directory (``data.train`` and ``data.images``).
        out_dir: the cache directory to create.
        template, max_length, on_bad_sample, allow_outside_images: rendering, as the recipe's ``data.template``,
            ``data.max_length``, ``data.on_bad_sample`` and ``data.allow_outside_images`` (training refuses a cache
            rendered differently).
        batch_size: samples per teacher forward.
        dtype: dtype the hidden states are stored in (``float32``, ``bfloat16``, ``float16``).
        attention_layer: also store Align-TI's IVA weights ``a_l(x)`` of this teacher decoder layer.
        shard_bytes: approximate size of one shard file.
        teacher_dtype: dtype the teacher runs in; the LM head is stored in it.
        overwrite: replace an existing ``out_dir``; otherwise an existing non-empty ``out_dir`` is an error.
        progress: show a progress bar on stderr.

    Staging folders left in ``out_dir``'s parent by runs that were killed are removed first
    (:func:`clean_stale_staging`).

    Returns:
        The index written to ``out_dir/index.json``.
    """
    for name, value in (("dtype", dtype), ("teacher_dtype", teacher_dtype)):
        if value not in CACHE_DTYPES:
            raise ValueError(f"{name} must be one of {CACHE_DTYPES}, got {value!r}")
    if batch_size < 1 or shard_bytes < 1:
        raise ValueError(f"batch_size and shard_bytes must be >= 1, got {batch_size} and {shard_bytes}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CacheExistsError(
            f"{out_dir} exists and is not an empty directory; choose another one or pass overwrite (--overwrite)"
        )
    clean_stale_staging(out_dir)

    teacher = load_teacher(teacher_dir, dtype=getattr(torch, teacher_dtype))
    teacher.return_logits = False
    data_set = PairDataset(data, images, teacher.side, teacher.side, template=template, max_length=max_length,
                           on_bad_sample=on_bad_sample, allow_outside_images=allow_outside_images)
    collate = PairCollator(teacher.side, teacher.side)
    store = getattr(torch, dtype)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, shard_bytes)
        shard_of, lengths, vision_counts, digests = [], [], [], []
        bar = tqdm(total=len(data_set), desc=f"cache {Path(teacher_dir).name}", unit="sample", file=sys.stderr,
                   disable=not progress)
        index = 0
        for side in _batches(data_set, collate, batch_size):
            with torch.no_grad():
                out = teacher(side, attention_layer=attention_layer)
            inputs = out.inputs
            weights = None
            if attention_layer is not None:
                weights = instruction_vision_attention(out.attention, inputs.vision_mask, inputs.instruction_mask)
            for b in range(inputs.batch_size):
                real = inputs.attention_mask[b]  # (L,)
                vision = inputs.vision_mask[b][real].cpu()  # (n,)
                tensors = {"hidden": inputs.hidden[b][real].to("cpu", store), "vision": vision}  # (n, D), (n,)
                if weights is not None:
                    w = weights[b].cpu().float()  # (Nv,), empty without instruction tokens
                    tensors["iva"] = w if w.numel() else torch.zeros(int(vision.sum()))
                shard_of.append(writer.add(index, tensors))
                lengths.append(int(real.sum()))
                vision_counts.append(int(vision.sum()))
                digests.append(ids_digest(side["input_ids"][b][real.to(side["input_ids"].device)]))
                index += 1
            bar.update(inputs.batch_size)
        bar.close()
        shards = writer.finish()

        head = teacher.model.get_output_embeddings()
        head_tensors = {"weight": head.weight.detach().to("cpu").contiguous()}  # (V, D)
        if getattr(head, "bias", None) is not None:
            head_tensors["bias"] = head.bias.detach().to("cpu").contiguous()  # (V,)
        save_file(head_tensors, str(tmp / HEAD_FILE), metadata={"format": CACHE_FORMAT})

        vocab_size, hidden_size = head_tensors["weight"].shape
        teacher_dir = Path(teacher_dir)
        record = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "teacher": {
                "dir": os.path.abspath(teacher_dir),
                "architecture": checkpoint_architecture(teacher_dir),
                "config_sha256": teacher_fingerprint(teacher_dir),
                "dtype": teacher_dtype,
            },
            "data": {
                **_data_identity(data),
                "images": None if images is None else os.path.abspath(images),
                "template": template,
                "max_length": max_length,
                "on_bad_sample": on_bad_sample,
                "allow_outside_images": allow_outside_images,
            },
            "dtype": dtype,
            "hidden_size": int(hidden_size),
            "vocab_size": int(vocab_size),
            "head_bias": "bias" in head_tensors,
            "attention_layer": attention_layer,
            "num_samples": len(data_set),
            "shards": shards,
            "shard_sizes": [(tmp / name).stat().st_size for name in shards],
            "shard_sha256": [file_sha256(tmp / name) for name in shards],
            "head_bytes": (tmp / HEAD_FILE).stat().st_size,
            "head_sha256": file_sha256(tmp / HEAD_FILE),
            "samples": {
                "shard": shard_of,
                "length": lengths,
                "vision_tokens": vision_counts,
                "ids_sha256": digests,
                "source": [source_key(r.source) for r in data_set.records],
            },
        }
        partial_index = tmp / (INDEX_FILE + ".tmp")
        partial_index.write_text(json.dumps(record))
        os.replace(partial_index, tmp / INDEX_FILE)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


# ---- reading ----------------------------------------------------------------------------------------------------
def _is_int(value: Any, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_file_name(value: Any) -> bool:
    """A plain file name: no folder part, not ``.`` / ``..``, not absolute."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
            and "\x00" not in value and not os.path.isabs(value))


_MISSING = object()


def _short(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the key is missing)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_index(index: Any, where: str) -> None:
    """Raise :class:`CacheError` naming the first field of a cache's ``index.json`` that is missing or malformed.

    ``where`` starts the message (``"teacher cache DIR: index.json"``)."""

    def get(obj: Any, key: str) -> Any:
        return obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING

    def expect(ok: bool, key: str, expected: str, found: Any) -> None:
        if not ok:
            raise CacheError(f"{where}: expected {key} to be {expected}, found {_short(found)}; the index is damaged "
                             f"or was edited: {_REBUILD}")

    expect(isinstance(index, dict), "the whole file", "a JSON object", index)
    fmt, version = get(index, "format"), get(index, "version")
    if fmt != CACHE_FORMAT or version not in READABLE_VERSIONS:
        raise CacheError(f"{where}: expected format {CACHE_FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
                         f", found {_short(fmt)} version {_short(version)}")
    for section, fields in (("teacher", {"dir": str, "config_sha256": str, "dtype": str}),
                            ("data", {"path": str, "size": int, "mtime_ns": int, "sha256": str, "template": str,
                                      "on_bad_sample": str})):
        value = get(index, section)
        expect(isinstance(value, dict), section, "an object", value)
        for key, kind in fields.items():
            found = get(value, key)
            ok = _is_int(found) if kind is int else isinstance(found, kind)
            expect(ok, f"{section}.{key}", "a string" if kind is str else "an integer", found)
    max_length = get(index["data"], "max_length")
    expect(max_length is None or _is_int(max_length, 1), "data.max_length", "a positive integer or null", max_length)
    expect(get(index, "dtype") in CACHE_DTYPES, "dtype", f"one of {CACHE_DTYPES}", get(index, "dtype"))
    for key in ("hidden_size", "vocab_size"):
        expect(_is_int(get(index, key), 1), key, "a positive integer", get(index, key))
    expect(isinstance(get(index, "head_bias"), bool), "head_bias", "true or false", get(index, "head_bias"))
    layer = get(index, "attention_layer")
    expect(layer is None or _is_int(layer, 0), "attention_layer", "null or a layer number", layer)
    n = get(index, "num_samples")
    expect(_is_int(n, 0), "num_samples", "a non-negative integer", n)
    shards = get(index, "shards")
    expect(isinstance(shards, list) and all(isinstance(x, str) for x in shards), "shards", "a list of file names",
           shards)
    for name in shards:
        if not _is_file_name(name):
            raise CacheError(f"{where}: shard name {name!r} is not a file name inside the cache folder (it has a "
                             f"folder part, '..', or is absolute); a cache reads only its own folder. The index is "
                             f"damaged or was edited: {_REBUILD}")
    lists = {"shard_sizes": ("a list of byte counts", lambda x: _is_int(x, 0))}
    if version >= 2:
        lists["shard_sha256"] = ("a list of SHA-256 hex digests", _is_sha256)
        expect(_is_sha256(get(index, "head_sha256")), "head_sha256", "a SHA-256 hex digest", get(index, "head_sha256"))
    for key, (expected, ok) in lists.items():
        value = get(index, key)
        expect(isinstance(value, list) and len(value) == len(shards) and all(map(ok, value)), key,
               f"{expected}, one per shard ({len(shards)})", value)
    expect(_is_int(get(index, "head_bytes"), 0), "head_bytes", "a byte count", get(index, "head_bytes"))
    samples = get(index, "samples")
    expect(isinstance(samples, dict), "samples", "an object", samples)
    for key, expected, ok in (
        ("shard", f"shard numbers in [0, {len(shards)})", lambda x: _is_int(x, 0) and x < len(shards)),
        ("length", "token counts", lambda x: _is_int(x, 0)),
        ("vision_tokens", "token counts", lambda x: _is_int(x, 0)),
        ("ids_sha256", "hex digests", lambda x: isinstance(x, str)),
        ("source", "record places ('line:index')", lambda x: isinstance(x, str)),
    ):
        value = get(samples, key)
        bad = (not isinstance(value, list) or len(value) != n) or next(
            (x for x in value if not ok(x)), _MISSING) is not _MISSING
        if bad:
            found = value
            if isinstance(value, list) and len(value) == n:
                at = next(i for i, x in enumerate(value) if not ok(x))
                key, found = f"{key}[{at}]", value[at]
            expect(False, f"samples.{key}", f"a list of {n} {expected}", found)


class TeacherCache:
    """A cache directory written by :func:`cache_teacher`, opened lazily (shards are ``safe_open``-ed on first use).

    Construction reads and checks ``index.json`` (:func:`check_index`) and, unless ``check_files`` is False, that
    every file it lists is there with its recorded size. Each shard's and the LM head's SHA-256 is checked when the
    file is first read (``index.json`` of version 2); :meth:`verify` checks everything in one pass.

    Raises (on construction) :class:`CacheMissingError` (a ``FileNotFoundError``) for a directory without
    ``index.json`` or with a missing file, :class:`CacheError` (a ``ValueError``) for an index that does not parse
    or lacks a field, another format or version, a file name outside the folder, or a file whose size differs from
    the index.
    """

    def __init__(self, path: str | os.PathLike, check_files: bool = True) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise CacheMissingError(
                f"{self.path} is not a complete teacher cache: {INDEX_FILE} is missing (it is written last, so a cache "
                "whose writing was interrupted has none); run `emkd cache-teacher` again"
            )
        where = f"teacher cache {self.path}: {INDEX_FILE}"
        try:
            index = json.loads(index_file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CacheError(f"{where} is not UTF-8 text (byte {e.start}); the file is damaged: {_REBUILD}") from None
        except json.JSONDecodeError as e:
            raise CacheError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is "
                             f"damaged or truncated: {_REBUILD}") from None
        check_index(index, where)
        self.index = index
        self._handles: dict[int, Any] = {}
        self._verified: set[str] = set()
        if check_files:
            problems = self._file_problems(checksums=False)
            if problems:
                error = CacheMissingError if problems[0].endswith("is missing") else CacheError
                raise error(f"teacher cache {self.path}: {problems[0]}")
        if not self.has_checksums:
            warnings.warn(
                f"teacher cache {self.path} (version {index['version']}) has no checksums: a file changed in place "
                f"cannot be detected; {_REBUILD} to add them",
                UserWarning,
                stacklevel=2,
            )

    @property
    def has_checksums(self) -> bool:
        return int(self.index["version"]) >= 2

    def _files(self) -> list[tuple[str, int, str | None]]:
        """``(name, size, sha256 or None)`` of every file of the cache, shards first, then the LM head."""
        index = self.index
        digests = index.get("shard_sha256") or [None] * len(index["shards"])
        return [*zip(index["shards"], index["shard_sizes"], digests),
                (HEAD_FILE, index["head_bytes"], index.get("head_sha256"))]

    def _file_problems(self, checksums: bool) -> list[str]:
        problems = []
        for name, size, digest in self._files():
            problem = self._file_problem(name, size, digest if checksums else None)
            if problem is not None:
                problems.append(problem)
            elif checksums:
                self._verified.add(name)
        return problems

    def _file_problem(self, name: str, size: int, digest: str | None) -> str | None:
        file = self.path / name
        if not file.is_file():
            return f"{name} listed in {INDEX_FILE} is missing"
        found = file.stat().st_size
        if found != size:
            return f"{name} has {found} bytes, {INDEX_FILE} recorded {size} (a truncated or replaced file); {_REBUILD}"
        if digest is not None:
            actual = file_sha256(file)
            if actual != digest:
                return (f"{name} has SHA-256 {actual[:16]}..., {INDEX_FILE} recorded {digest[:16]}... (same size: its "
                        f"bytes were changed or corrupted); {_REBUILD}")
        return None

    def _checked(self, name: str) -> Path:
        """The path of cache file ``name`` after checking its SHA-256 (once per file and process)."""
        if name not in self._verified:
            size, digest = next((size, digest) for n, size, digest in self._files() if n == name)
            problem = self._file_problem(name, size, digest)
            if problem is not None:
                raise CacheError(f"teacher cache {self.path}: {problem}")
            self._verified.add(name)
        return self.path / name

    # ---- what the cache holds ---------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def hidden_size(self) -> int:
        return int(self.index["hidden_size"])

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the hidden states are stored in."""
        return getattr(torch, self.index["dtype"])

    @property
    def attention_layer(self) -> int | None:
        return self.index["attention_layer"]

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head: ``weight`` ``[V, D]`` and ``bias`` ``[V]`` or ``None`` (CPU)."""
        path = self._checked(HEAD_FILE)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                weight = f.get_tensor("weight")
                bias = f.get_tensor("bias") if self.index["head_bias"] else None
        except Exception as e:  # safetensors raises its own error type for a damaged file or a missing tensor
            raise CacheError(f"teacher cache {self.path}: {HEAD_FILE} cannot be read ({type(e).__name__}: {e}); "
                             f"{_REBUILD}") from e
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise CacheError(f"teacher cache {self.path}: {HEAD_FILE} 'weight' has shape {tuple(weight.shape)}, "
                             f"{INDEX_FILE} records vocab_size {self.vocab_size} and hidden_size {self.hidden_size}")
        return weight, bias

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``'s tensors (CPU): ``hidden`` ``[n, D]``, ``vision`` ``[n]`` bool, and ``iva`` ``[Nv]``
        float32 when the cache has an attention layer."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"teacher cache {self.path}: sample {index} out of range (it holds {self.num_samples})")
        shard = int(self.index["samples"]["shard"][index])
        name = self.index["shards"][shard]
        try:
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(self._checked(name)), framework="pt", device="cpu")
            handle = self._handles[shard]
            names = ("hidden", "vision") + (("iva",) if self.attention_layer is not None else ())
            return {key: handle.get_tensor(f"s{index}.{key}") for key in names}
        except CacheError:
            raise
        except Exception as e:  # safetensors raises its own error type for a damaged file or a missing tensor
            raise CacheError(f"teacher cache {self.path}: sample {index} cannot be read from {name} "
                             f"({type(e).__name__}: {e}); {_REBUILD}") from e

    def verify(self, progress: bool = False) -> list[str]:
        """Check the whole cache in one pass; return every problem found (empty: the cache is intact).

        Every file listed in the index is there with its size and SHA-256 (version 2), the LM head has shape
        ``[vocab_size, hidden_size]``, and every sample ``i`` has, in its shard, ``s{i}.hidden`` ``[n_i, D]`` in the
        cache dtype, ``s{i}.vision`` ``[n_i]`` bool with ``vision_tokens[i]`` True values, and ``s{i}.iva``
        ``[vision_tokens[i]]`` float32 when the cache has an attention layer; no shard holds other tensors.
        """
        problems = self._file_problems(checksums=True)
        if not self.has_checksums:
            problems.append(f"{INDEX_FILE} has no checksums (version {self.index['version']}); only sizes and tensor "
                            f"shapes were checked: {_REBUILD} to add them")
        broken = {p.split(" ", 1)[0] for p in problems}
        if HEAD_FILE not in broken:
            try:
                self.head()
            except CacheError as e:
                problems.append(str(e).removeprefix(f"teacher cache {self.path}: "))
        samples = self.index["samples"]
        by_shard: dict[int, list[int]] = {}
        for i, shard in enumerate(samples["shard"]):
            by_shard.setdefault(int(shard), []).append(i)
        dtype = str(self.dtype).removeprefix("torch.")
        expected_dtypes = {"hidden": {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype], "vision": "BOOL",
                           "iva": "F32"}
        bar = tqdm(total=self.num_samples, desc=f"verify {self.path.name}", unit="sample", file=sys.stderr,
                   disable=not progress)
        for k, name in enumerate(self.index["shards"]):
            members = by_shard.get(k, [])
            if name in broken:
                bar.update(len(members))
                continue
            try:
                with safe_open(str(self.path / name), framework="pt", device="cpu") as f:
                    keys = set(f.keys())
                    wanted = set()
                    for i in members:
                        n, nv = samples["length"][i], samples["vision_tokens"][i]
                        shapes = {"hidden": (n, self.hidden_size), "vision": (n,)}
                        if self.attention_layer is not None:
                            shapes["iva"] = (nv,)
                        for key, shape in shapes.items():
                            tensor = f"s{i}.{key}"
                            wanted.add(tensor)
                            if tensor not in keys:
                                problems.append(f"{name}: sample {i} has no tensor {tensor!r}")
                                continue
                            piece = f.get_slice(tensor)
                            found = (tuple(piece.get_shape()), piece.get_dtype())
                            if found != (shape, expected_dtypes[key]):
                                problems.append(f"{name}: {tensor} is {found[1]} {found[0]}, expected "
                                                f"{expected_dtypes[key]} {shape}")
                            elif key == "vision" and int(f.get_tensor(tensor).sum()) != nv:
                                problems.append(f"{name}: {tensor} has {int(f.get_tensor(tensor).sum())} vision "
                                                f"positions, {INDEX_FILE} recorded {nv}")
                        bar.update(1)
                    extra = sorted(keys - wanted)
                    if extra:
                        problems.append(f"{name} holds {len(extra)} tensors no sample of it owns, e.g. {extra[0]!r}")
            except Exception as e:  # safetensors raises its own error type for a damaged file
                problems.append(f"{name} cannot be read ({type(e).__name__}: {e})")
        bar.close()
        return problems

    # ---- checks -----------------------------------------------------------------------------------------------
    def check_teacher(self, teacher_dir: str | os.PathLike) -> None:
        """Raise :class:`CacheError` when ``teacher_dir``'s config or weights are not the cache's teacher's."""
        found = teacher_fingerprint(teacher_dir)
        expected = self.index["teacher"]["config_sha256"]
        if found != expected:
            raise CacheError(
                f"teacher cache {self.path} was built from the teacher in {self.index['teacher']['dir']} (config and "
                f"weights sha256 {expected[:12]}...), but {teacher_dir} has {found[:12]}...: a different teacher"
            )

    def check_dataset(self, dataset: PairDataset) -> None:
        """Raise :class:`CacheError` when ``dataset`` is not rendered from what the cache was built from: template,
        ``max_length``, the data file's content, the number of samples and which records they are."""
        data = self.index["data"]
        where = f"teacher cache {self.path}"
        for name, cached, found in (("template", data["template"], dataset.template),
                                    ("max_length", data["max_length"], dataset.max_length)):
            if cached != found:
                raise CacheError(
                    f"{where} was rendered with {name}={cached!r}, the training data with {name}={found!r}"
                )
        stat = os.stat(dataset.path)
        same = stat.st_size == data["size"] and (
            stat.st_mtime_ns == data["mtime_ns"] or file_sha256(dataset.path) == data["sha256"]
        )
        if not same:
            raise CacheError(
                f"{where} was built from {data['path']} ({data['size']} bytes, sha256 {data['sha256'][:12]}...), "
                f"but the training data {os.path.abspath(dataset.path)} ({stat.st_size} bytes) has other content"
            )
        if len(dataset) != self.num_samples:
            raise CacheError(f"{where} holds {self.num_samples} samples, the training data set has {len(dataset)}")
        sources = self.index["samples"]["source"]
        for i, record in enumerate(dataset.records):
            if source_key(record.source) != sources[i]:
                raise CacheError(
                    f"{where}: sample {i} is record {record.source} of the training data but record "
                    f"{sources[i]!r} (line:index) in the cache; the two kept different records (on_bad_sample "
                    f"{data['on_bad_sample']!r} when caching)"
                )

    # ---- batches ----------------------------------------------------------------------------------------------
    def _samples_of(self, side: dict[str, torch.Tensor]) -> list[int]:
        if "index" not in side:
            raise ValueError(
                "the batch side has no 'index' (the samples' PairDataset indices); a cached teacher needs batches of "
                "PairCollator(..., with_index=True)"
            )
        return [int(i) for i in side["index"]]

    def teacher_inputs(
        self,
        side: dict[str, torch.Tensor],
        head_weight: torch.Tensor,
        head_bias: torch.Tensor | None = None,
        image_token_id: int | None = None,
    ) -> DistillInputs:
        """The teacher's :class:`~emkd.DistillInputs` for one collated teacher side, from the cache.

        Args:
            side: the teacher side of a batch of :class:`~emkd.data.PairCollator` with ``with_index=True``:
                ``input_ids``, ``attention_mask``, ``labels``, ``instruction_mask`` ``[B, L]`` and ``index`` ``[B]``.
            head_weight, head_bias: the teacher's LM head ``[V, D]``, ``[V]`` (see :meth:`head`); the hidden states
                are put on ``head_weight``'s device.
            image_token_id: the teacher's image token id; when given, each sample's cached vision positions must be
                exactly its ``input_ids == image_token_id`` positions.

        Returns:
            ``hidden`` ``[B, L, D]`` in the cache dtype, the cached states at every real position and zeros at
            padding; ``vision_mask`` from the cache; ``attention_mask``, ``labels``, ``instruction_mask`` from
            ``side``.

        Raises:
            CacheError: a sample whose number of real tokens, token ids or image-token positions differ from what
                was cached (the message names the sample's index and the shapes).
        """
        samples = self._samples_of(side)
        device = head_weight.device
        attention = side["attention_mask"].to(device).bool()  # (B, L)
        input_ids = side["input_ids"].to(device)  # (B, L)
        B, L = attention.shape
        hidden = torch.zeros(B, L, self.hidden_size, dtype=self.dtype, device=device)  # (B, L, D)
        vision_mask = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
        for b, i in enumerate(samples):
            cached = self.sample(i)
            n = int(attention[b].sum())
            if cached["hidden"].shape[0] != n:
                raise CacheError(
                    f"teacher cache {self.path}: sample {i} (batch row {b}) has cached hidden states of shape "
                    f"{tuple(cached['hidden'].shape)} but {n} real tokens in the rendered teacher batch "
                    f"(input_ids {tuple(input_ids.shape)}); the cache was built from other data, template, "
                    "max_length or teacher tokenizer"
                )
            ids = input_ids[b][attention[b]]  # (n,)
            if ids_digest(ids) != self.index["samples"]["ids_sha256"][i]:
                raise CacheError(
                    f"teacher cache {self.path}: sample {i} (batch row {b}) has {n} tokens as cached, but its token "
                    "ids differ from the cached ones; the cache was built from other data or another tokenizer"
                )
            vision = cached["vision"].to(device)  # (n,)
            if image_token_id is not None and not torch.equal(vision, ids == image_token_id):
                raise CacheError(
                    f"teacher cache {self.path}: sample {i} (batch row {b}) has {int(vision.sum())} cached vision "
                    f"positions, but its rendered ids have {int((ids == image_token_id).sum())} image tokens "
                    f"(id {image_token_id}) at other positions"
                )
            hidden[b, attention[b]] = cached["hidden"].to(device)
            vision_mask[b, attention[b]] = vision
        instruction = side.get("instruction_mask")
        return DistillInputs(
            hidden=hidden,
            head_weight=head_weight,
            head_bias=head_bias,
            vision_mask=vision_mask,
            attention_mask=attention,
            labels=side["labels"].to(device),
            instruction_mask=None if instruction is None else instruction.to(device),
        )

    def iva_weights(self, side: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Align-TI's IVA weights ``a_l(x)`` of each sample of a collated teacher side: one ``[Nv_b]`` float32
        tensor per sample (zeros without instruction tokens), on the side's device.

        Raises:
            CacheError: the cache was built without ``attention_layer``.
        """
        if self.attention_layer is None:
            raise CacheError(
                f"teacher cache {self.path} holds no IVA weights: build it with attention_layer (--attention-layer)"
            )
        device = side["attention_mask"].device
        return [self.sample(i)["iva"].to(device) for i in self._samples_of(side)]


class TeacherHead(torch.nn.Module):
    """The teacher's LM head read from a cache, frozen: ``weight`` ``[V, D]``, ``bias`` ``[V]`` or ``None``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V]`` of hidden states ``[..., D]``."""
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class CachedTeacher(DistillAdapter):
    """A teacher whose outputs come from a :class:`TeacherCache`: the adapter training uses with ``teacher_cache``.

    ``model`` is the teacher's LM head alone (:class:`TeacherHead`), which the trainer moves to its device and keeps
    frozen; ``side`` renders the teacher half of each batch (labels, masks, the ids that are checked against the
    cache). ``adapter(side)`` returns what the live teacher's adapter returns for the same batch (hidden states at
    real positions identical up to the cache dtype; zeros at padding), without logits.
    """

    def __init__(self, cache: TeacherCache, side: VisionSide) -> None:
        self.cache = cache
        self.side = side
        weight, bias = cache.head()
        self.model = TeacherHead(weight, bias)

    def __call__(self, batch: dict[str, torch.Tensor], attention_layer: int | None = None) -> AdapterOutput:
        if attention_layer is not None:
            raise NotImplementedError(
                f"teacher cache {self.cache.path} holds no attention maps: Align-TI's IVA weights are available "
                "from CachedTeacher.iva_weights, but its TPA runs the teacher on candidates sampled at every step; "
                "train align_ti with the live teacher"
            )
        inputs = self.cache.teacher_inputs(batch, self.model.weight, self.model.bias, self.side.image_token_id)
        return AdapterOutput(inputs=inputs)

    def iva_weights(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """See :meth:`TeacherCache.iva_weights`."""
        return self.cache.iva_weights(batch)


def load_cached_teacher(cache_dir: str | os.PathLike, teacher_dir: str | os.PathLike | None = None) -> CachedTeacher:
    """Open a cache and the teacher's vision side (config, tokenizer, image processor; no weights).

    Args:
        cache_dir: a directory written by :func:`cache_teacher`.
        teacher_dir: the teacher checkpoint (``None``: the directory recorded in the cache); its ``config.json`` must
            be the one the cache was built with.
    """
    cache = TeacherCache(cache_dir)
    teacher_dir = cache.index["teacher"]["dir"] if teacher_dir is None else teacher_dir
    cache.check_teacher(teacher_dir)
    return CachedTeacher(cache, load_teacher_side(teacher_dir))


# ---- sizes ------------------------------------------------------------------------------------------------------
def storage_summary(index: dict[str, Any]) -> dict[str, Any]:
    """Sizes of a cache (its ``index.json``) and, for comparison, of top-k logits at the same positions.

    Returns:
        ``num_samples``; ``sample_bytes`` (all shards) and ``total_bytes`` (shards + LM head); ``bytes_per_sample``
        (shards / samples); ``positions_per_sample`` (mean real tokens); and ``topk`` ``{k: {"float16": bytes,
        "float32": bytes}}``, the bytes per sample of the top-``k`` logits at every real position stored as a value
        in that dtype plus an int32 token index.
    """
    n = int(index["num_samples"])
    sample_bytes = sum(index["shard_sizes"])
    positions = sum(index["samples"]["length"]) / n
    return {
        "num_samples": n,
        "sample_bytes": sample_bytes,
        "total_bytes": sample_bytes + int(index["head_bytes"]),
        "bytes_per_sample": sample_bytes / n,
        "positions_per_sample": positions,
        "topk": {k: {name: positions * k * (size + 4) for name, size in TOPK_VALUE_BYTES.items()} for k in TOPK_SIZES},
    }


# ---- command line -----------------------------------------------------------------------------------------------
def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``emkd cache-teacher``: ``TEACHER_DIR DATA --out DIR [...]`` writes a cache; ``--verify DIR``
    checks one (and takes no other argument)."""
    parser.usage = "%(prog)s TEACHER_DIR DATA --out DIR [options]\n       %(prog)s --verify CACHE_DIR"
    parser.add_argument("teacher", metavar="TEACHER_DIR", nargs="?", help="teacher checkpoint directory")
    parser.add_argument("data", metavar="DATA", nargs="?", help="training records (LLaVA JSON/JSONL or HF messages)")
    parser.add_argument("--images", default=None, help="directory image paths resolve against (default: the data "
                        "file's directory)")
    parser.add_argument("--out", default=None, help="the cache directory to create (needed unless --verify)")
    parser.add_argument("--verify", metavar="CACHE_DIR", default=None,
                        help="check an existing cache instead of writing one: its index, the size and SHA-256 of every "
                        "file, and every sample's tensor names, shapes and dtypes; prints each problem and exits 1 if "
                        "any, 0 if none (2 when CACHE_DIR is not a readable cache). Opening a cache for training "
                        "already checks each shard's SHA-256 when it is first read")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="as the recipe's data.allow_outside_images: read image paths that are absolute or climb "
                        "out of --images")
    parser.add_argument("--template", choices=("chat", "plain"), default="chat", help="as the recipe's data.template")
    parser.add_argument("--max-length", type=int, default=2048, help="as the recipe's data.max_length")
    parser.add_argument("--on-bad-sample", choices=("error", "skip"), default="error",
                        help="as the recipe's data.on_bad_sample")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per teacher forward")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="float32", help="dtype the hidden states are stored in")
    parser.add_argument("--teacher-dtype", choices=CACHE_DTYPES, default="float32", help="dtype the teacher runs in")
    parser.add_argument("--attention-layer", type=int, default=None,
                        help="also store Align-TI's IVA weights of this teacher decoder layer")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="approximate MiB per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache directory")


def run_verify(cache_dir: str | os.PathLike, progress: bool = True) -> int:
    """``emkd cache-teacher --verify DIR``: print every problem of a cache; return 1 if any, else 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cache without checksums is reported below
        cache = TeacherCache(cache_dir, check_files=False)
    problems = cache.verify(progress=progress)
    for problem in problems:
        print(f"{cache_dir}: {problem}")
    files = len(cache.index["shards"]) + 1
    if problems:
        print(f"{cache_dir}: {len(problems)} problem(s) in {files} files and {cache.num_samples} samples")
        return 1
    print(f"{cache_dir}: {files} files and {cache.num_samples} samples verified (sizes, SHA-256, tensor shapes)")
    return 0


def run_cache_teacher(args: argparse.Namespace) -> int:
    """``emkd cache-teacher``: write the cache, then print its size and what top-k logits would take, or, with
    ``--verify DIR``, check an existing cache (:func:`run_verify`)."""
    if args.verify is not None:
        given = [name for name, value in (("TEACHER_DIR", args.teacher), ("DATA", args.data), ("--out", args.out))
                 if value is not None]
        if given:
            raise UserError(f"--verify CACHE_DIR checks an existing cache and takes no {', '.join(given)}")
        return run_verify(args.verify)
    missing = [name for name, value in (("TEACHER_DIR", args.teacher), ("DATA", args.data), ("--out DIR", args.out))
               if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: write a cache with `emkd cache-teacher TEACHER_DIR DATA --out "
                        "DIR`, or check one with `emkd cache-teacher --verify DIR`")
    index = cache_teacher(
        args.teacher, args.data, args.images, args.out, template=args.template, max_length=args.max_length,
        batch_size=args.batch_size, dtype=args.dtype, attention_layer=args.attention_layer,
        shard_bytes=max(1, int(args.shard_mb * 2**20)), teacher_dtype=args.teacher_dtype,
        on_bad_sample=args.on_bad_sample, overwrite=args.overwrite,
        allow_outside_images=getattr(args, "allow_outside_images", False),
    )
    size = storage_summary(index)
    print(
        f"cached {size['num_samples']} samples in {args.out}: {size['total_bytes']:,} bytes in total "
        f"({len(index['shards'])} shard file(s), and the LM head, {index['head_bytes']:,} bytes)"
    )
    print(
        f"bytes per sample: {size['bytes_per_sample']:,.0f} (hidden D={index['hidden_size']} in {index['dtype']} at "
        f"{size['positions_per_sample']:.1f} positions per sample)"
    )
    print("top-k logits at the same positions (value + int32 index), bytes per sample:")
    for k, by_dtype in size["topk"].items():
        print(f"  k={k:<4d} float16 {by_dtype['float16']:>14,.0f}   float32 {by_dtype['float32']:>14,.0f}")
    return 0


__all__ = [
    "CACHE_DTYPES",
    "CacheError",
    "CacheExistsError",
    "CacheMissingError",
    "CachedTeacher",
    "TeacherCache",
    "TeacherHead",
    "add_cache_arguments",
    "cache_teacher",
    "check_index",
    "clean_stale_staging",
    "load_cached_teacher",
    "run_cache_teacher",
    "run_verify",
    "storage_summary",
]

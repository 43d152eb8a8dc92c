"""Reading a teacher cache (:class:`TeacherCache`) and every check that stands between its files and training.

Using a cache checks

* when opened: ``index.json`` present, valid JSON with every field of the right type (a damaged index is a
  :class:`~emkd.cache.format.CacheError` naming the field, :func:`check_index`), format and version, file names that
  stay inside the cache folder, every shard present with its recorded size;
* when a shard (or the LM head) is first read: its SHA-256 against ``index.json`` (``shard_sha256``,
  ``head_sha256``), so a file changed in place, even at the same size, is refused before any of its samples is used;
  ``emkd cache-teacher --verify DIR`` (:meth:`TeacherCache.verify`) checks every file and every sample's tensors in
  one pass. Caches of version 1 have no checksums: they load with a warning;
* against the teacher directory: the SHA-256 of its ``config.json`` and weight files
  (:meth:`TeacherCache.check_teacher`);
* against the training data set: number of samples, template, ``max_length``, the data file's content (size, then
  SHA-256 when its modification time changed), and which records were kept (their place in the file)
  (:meth:`TeacherCache.check_dataset`);
* per batch: each sample's number of real tokens, the SHA-256 of its token ids and its image-token positions
  (:func:`emkd.cache.adapter.teacher_inputs`).

Images changed after caching are not detected unless they change the number of image tokens.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from emkd.cache.fingerprint import file_sha256, teacher_fingerprint
from emkd.cache.format import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    HEAD_FILE,
    INDEX_FILE,
    READABLE_VERSIONS,
    REBUILD,
    CacheError,
    CacheMissingError,
)
from emkd.data import PairDataset
from emkd.data.dataset import source_key

#: the tensors of sample ``i`` in its shard, ``s{i}.NAME``, and their safetensors dtypes ("hidden": the cache dtype)
SAMPLE_TENSORS = ("hidden", "vision")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_MISSING = object()


# ---- index.json -------------------------------------------------------------------------------------------------
def _is_int(value: Any, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_file_name(value: Any) -> bool:
    """A plain file name: no folder part, not ``.`` / ``..``, not absolute."""
    return (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
            and "\x00" not in value and not os.path.isabs(value))


def _short(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the key is missing)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _get(obj: Any, key: str) -> Any:
    return obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING


def _expect(where: str, ok: bool, key: str, expected: str, found: Any) -> None:
    if not ok:
        raise CacheError(f"{where}: expected {key} to be {expected}, found {_short(found)}; the index is damaged "
                         f"or was edited: {REBUILD}")


def check_index(index: Any, where: str) -> None:
    """Raise :class:`~emkd.cache.format.CacheError` naming the first field of a cache's ``index.json`` that is
    missing or malformed.

    ``where`` starts the message (``"teacher cache DIR: index.json"``). ``attention_layer`` (versions 1 and 2) is
    not looked at."""
    _expect(where, isinstance(index, dict), "the whole file", "a JSON object", index)
    fmt, version = _get(index, "format"), _get(index, "version")
    if fmt != CACHE_FORMAT or not _is_int(version) or version not in READABLE_VERSIONS:
        versions = ", ".join(map(str, READABLE_VERSIONS[:-1])) + f" or {READABLE_VERSIONS[-1]}"
        raise CacheError(f"{where}: expected format {CACHE_FORMAT!r} version {versions}, found {_short(fmt)} "
                         f"version {_short(version)}")
    _check_sections(index, where)
    _check_files(index, where)
    _check_samples(index, where)


def _check_sections(index: dict[str, Any], where: str) -> None:
    """``teacher``, ``data`` and the scalar fields."""
    for section, fields in (("teacher", {"dir": str, "config_sha256": str, "dtype": str}),
                            ("data", {"path": str, "size": int, "mtime_ns": int, "sha256": str, "template": str,
                                      "on_bad_sample": str})):
        value = _get(index, section)
        _expect(where, isinstance(value, dict), section, "an object", value)
        for key, kind in fields.items():
            found = _get(value, key)
            ok = _is_int(found) if kind is int else isinstance(found, kind)
            _expect(where, ok, f"{section}.{key}", "a string" if kind is str else "an integer", found)
    max_length = _get(index["data"], "max_length")
    _expect(where, max_length is None or _is_int(max_length, 1), "data.max_length", "a positive integer or null",
            max_length)
    _expect(where, _get(index, "dtype") in CACHE_DTYPES, "dtype", f"one of {CACHE_DTYPES}", _get(index, "dtype"))
    for key in ("hidden_size", "vocab_size"):
        _expect(where, _is_int(_get(index, key), 1), key, "a positive integer", _get(index, key))
    _expect(where, isinstance(_get(index, "head_bias"), bool), "head_bias", "true or false", _get(index, "head_bias"))
    n = _get(index, "num_samples")
    _expect(where, _is_int(n, 0), "num_samples", "a non-negative integer", n)


def _check_files(index: dict[str, Any], where: str) -> None:
    """``shards`` (plain file names), their sizes and checksums, and the LM head's."""
    shards = _get(index, "shards")
    _expect(where, isinstance(shards, list) and all(isinstance(x, str) for x in shards), "shards",
            "a list of file names", shards)
    for name in shards:
        if not _is_file_name(name):
            raise CacheError(f"{where}: shard name {name!r} is not a file name inside the cache folder (it has a "
                             f"folder part, '..', or is absolute); a cache reads only its own folder. The index is "
                             f"damaged or was edited: {REBUILD}")
    lists = {"shard_sizes": ("a list of byte counts", lambda x: _is_int(x, 0))}
    if index["version"] >= 2:
        lists["shard_sha256"] = ("a list of SHA-256 hex digests", _is_sha256)
        _expect(where, _is_sha256(_get(index, "head_sha256")), "head_sha256", "a SHA-256 hex digest",
                _get(index, "head_sha256"))
    for key, (expected, ok) in lists.items():
        value = _get(index, key)
        _expect(where, isinstance(value, list) and len(value) == len(shards) and all(map(ok, value)), key,
                f"{expected}, one per shard ({len(shards)})", value)
    _expect(where, _is_int(_get(index, "head_bytes"), 0), "head_bytes", "a byte count", _get(index, "head_bytes"))


def _check_samples(index: dict[str, Any], where: str) -> None:
    """``samples``: one entry per sample in each of its lists."""
    n, shards = index["num_samples"], index["shards"]
    samples = _get(index, "samples")
    _expect(where, isinstance(samples, dict), "samples", "an object", samples)
    for key, expected, ok in (
        ("shard", f"shard numbers in [0, {len(shards)})", lambda x: _is_int(x, 0) and x < len(shards)),
        ("length", "token counts", lambda x: _is_int(x, 0)),
        ("vision_tokens", "token counts", lambda x: _is_int(x, 0)),
        ("ids_sha256", "hex digests", lambda x: isinstance(x, str)),
        ("source", "record places ('line:index')", lambda x: isinstance(x, str)),
    ):
        value = _get(samples, key)
        if not isinstance(value, list) or len(value) != n:
            _expect(where, False, f"samples.{key}", f"a list of {n} {expected}", value)
        at = next((i for i, x in enumerate(value) if not ok(x)), None)
        if at is not None:
            _expect(where, False, f"samples.{key}[{at}]", f"a list of {n} {expected}", value[at])


def _read_index(path: Path) -> dict[str, Any]:
    """``path/index.json``, parsed and checked (:func:`check_index`)."""
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        raise CacheMissingError(
            f"{path} is not a complete teacher cache: {INDEX_FILE} is missing (it is written last, so a cache "
            "whose writing was interrupted has none); run `emkd cache-teacher` again"
        )
    where = f"teacher cache {path}: {INDEX_FILE}"
    try:
        index = json.loads(index_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CacheError(f"{where} is not UTF-8 text (byte {e.start}); the file is damaged: {REBUILD}") from None
    except json.JSONDecodeError as e:
        raise CacheError(f"{where} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is "
                         f"damaged or truncated: {REBUILD}") from None
    check_index(index, where)
    return index


# ---- the cache --------------------------------------------------------------------------------------------------
class TeacherCache:
    """A cache directory written by :func:`~emkd.cache.writer.cache_teacher`, opened lazily (shards are
    ``safe_open``-ed on first use).

    Construction reads and checks ``index.json`` (:func:`check_index`) and, unless ``check_files`` is False, that
    every file it lists is there with its recorded size. Each shard's and the LM head's SHA-256 is checked when the
    file is first read (``index.json`` of version 2 or later); :meth:`verify` checks everything in one pass.

    Raises (on construction) :class:`~emkd.cache.format.CacheMissingError` (a ``FileNotFoundError``) for a directory
    without ``index.json`` or with a missing file, :class:`~emkd.cache.format.CacheError` (a ``ValueError``) for an
    index that does not parse or lacks a field, another format or version, a file name outside the folder, or a file
    whose size differs from the index.
    """

    def __init__(self, path: str | os.PathLike, check_files: bool = True) -> None:
        self.path = Path(path)
        self.index = _read_index(self.path)
        self._handles: dict[int, Any] = {}
        self._verified: set[str] = set()
        if check_files:
            problems = self._file_problems(checksums=False)
            if problems:
                error = CacheMissingError if problems[0].endswith("is missing") else CacheError
                raise error(f"teacher cache {self.path}: {problems[0]}")
        if not self.has_checksums:
            warnings.warn(
                f"teacher cache {self.path} (version {self.index['version']}) has no checksums: a file changed in "
                f"place cannot be detected; {REBUILD} to add them",
                UserWarning,
                stacklevel=2,
            )

    @property
    def has_checksums(self) -> bool:
        return int(self.index["version"]) >= 2

    # ---- files ------------------------------------------------------------------------------------------------
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
            return f"{name} has {found} bytes, {INDEX_FILE} recorded {size} (a truncated or replaced file); {REBUILD}"
        if digest is not None:
            actual = file_sha256(file)
            if actual != digest:
                return (f"{name} has SHA-256 {actual[:16]}..., {INDEX_FILE} recorded {digest[:16]}... (same size: its "
                        f"bytes were changed or corrupted); {REBUILD}")
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

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's LM head: ``weight`` ``[V, D]`` and ``bias`` ``[V]`` or ``None`` (CPU)."""
        path = self._checked(HEAD_FILE)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                weight = f.get_tensor("weight")
                bias = f.get_tensor("bias") if self.index["head_bias"] else None
        except Exception as e:  # safetensors raises its own error type for a damaged file or a missing tensor
            raise CacheError(f"teacher cache {self.path}: {HEAD_FILE} cannot be read ({type(e).__name__}: {e}); "
                             f"{REBUILD}") from e
        if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
            raise CacheError(f"teacher cache {self.path}: {HEAD_FILE} 'weight' has shape {tuple(weight.shape)}, "
                             f"{INDEX_FILE} records vocab_size {self.vocab_size} and hidden_size {self.hidden_size}")
        return weight, bias

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``'s tensors (CPU): ``hidden`` ``[n, D]`` and ``vision`` ``[n]`` bool."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"teacher cache {self.path}: sample {index} out of range (it holds {self.num_samples})")
        shard = int(self.index["samples"]["shard"][index])
        name = self.index["shards"][shard]
        try:
            if shard not in self._handles:
                self._handles[shard] = safe_open(str(self._checked(name)), framework="pt", device="cpu")
            handle = self._handles[shard]
            return {key: handle.get_tensor(f"s{index}.{key}") for key in SAMPLE_TENSORS}
        except CacheError:
            raise
        except Exception as e:  # safetensors raises its own error type for a damaged file or a missing tensor
            raise CacheError(f"teacher cache {self.path}: sample {index} cannot be read from {name} "
                             f"({type(e).__name__}: {e}); {REBUILD}") from e

    # ---- checks -----------------------------------------------------------------------------------------------
    def verify(self, progress: bool = False) -> list[str]:
        """Check the whole cache in one pass; return every problem found (empty: the cache is intact).

        Every file listed in the index is there with its size and SHA-256 (version 2 or later), the LM head has shape
        ``[vocab_size, hidden_size]``, and every sample ``i`` has, in its shard, ``s{i}.hidden`` ``[n_i, D]`` in the
        cache dtype and ``s{i}.vision`` ``[n_i]`` bool with ``vision_tokens[i]`` True values; no shard holds other
        tensors (but the ``s{i}.iva`` of caches of versions 1 and 2, which are ignored).
        """
        problems = self._file_problems(checksums=True)
        if not self.has_checksums:
            problems.append(f"{INDEX_FILE} has no checksums (version {self.index['version']}); only sizes and tensor "
                            f"shapes were checked: {REBUILD} to add them")
        broken = {p.split(" ", 1)[0] for p in problems}
        if HEAD_FILE not in broken:
            try:
                self.head()
            except CacheError as e:
                problems.append(str(e).removeprefix(f"teacher cache {self.path}: "))
        by_shard: dict[int, list[int]] = {}
        for i, shard in enumerate(self.index["samples"]["shard"]):
            by_shard.setdefault(int(shard), []).append(i)
        bar = tqdm(total=self.num_samples, desc=f"verify {self.path.name}", unit="sample", file=sys.stderr,
                   disable=not progress)
        for k, name in enumerate(self.index["shards"]):
            members = by_shard.get(k, [])
            if name not in broken:
                try:
                    with safe_open(str(self.path / name), framework="pt", device="cpu") as f:
                        problems += self._shard_problems(name, f, members)
                except Exception as e:  # safetensors raises its own error type for a damaged file
                    problems.append(f"{name} cannot be read ({type(e).__name__}: {e})")
            bar.update(len(members))
        bar.close()
        return problems

    def _shard_problems(self, name: str, f: Any, members: list[int]) -> list[str]:
        """The problems of the tensors of samples ``members`` in shard ``name``, open as ``f``."""
        samples, problems = self.index["samples"], []
        expected_dtypes = {"hidden": _SAFETENSORS_DTYPES[self.index["dtype"]], "vision": "BOOL"}
        keys = set(f.keys())
        wanted = set()
        for i in members:
            n, nv = samples["length"][i], samples["vision_tokens"][i]
            if self.index["version"] < 3:
                wanted.add(f"s{i}.iva")  # IVA weights of an older cache: ignored, present or not
            for key, shape in (("hidden", (n, self.hidden_size)), ("vision", (n,))):
                tensor = f"s{i}.{key}"
                wanted.add(tensor)
                if tensor not in keys:
                    problems.append(f"{name}: sample {i} has no tensor {tensor!r}")
                    continue
                piece = f.get_slice(tensor)
                found = (tuple(piece.get_shape()), piece.get_dtype())
                if found != (shape, expected_dtypes[key]):
                    problems.append(f"{name}: {tensor} is {found[1]} {found[0]}, expected {expected_dtypes[key]} "
                                    f"{shape}")
                elif key == "vision" and int(f.get_tensor(tensor).sum()) != nv:
                    problems.append(f"{name}: {tensor} has {int(f.get_tensor(tensor).sum())} vision positions, "
                                    f"{INDEX_FILE} recorded {nv}")
        extra = sorted(keys - wanted)
        if extra:
            problems.append(f"{name} holds {len(extra)} tensors no sample of it owns, e.g. {extra[0]!r}")
        return problems

    def check_teacher(self, teacher_dir: str | os.PathLike) -> None:
        """Raise :class:`~emkd.cache.format.CacheError` when ``teacher_dir``'s config or weights are not the cache's
        teacher's."""
        found = teacher_fingerprint(teacher_dir)
        expected = self.index["teacher"]["config_sha256"]
        if found != expected:
            raise CacheError(
                f"teacher cache {self.path} was built from the teacher in {self.index['teacher']['dir']} (config and "
                f"weights sha256 {expected[:12]}...), but {teacher_dir} has {found[:12]}...: a different teacher"
            )

    def check_dataset(self, dataset: PairDataset) -> None:
        """Raise :class:`~emkd.cache.format.CacheError` when ``dataset`` is not rendered from what the cache was
        built from: template, ``max_length``, the data file's content, the number of samples and which records they
        are."""
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


__all__ = ["TeacherCache", "check_index"]

"""Data files besides JSON and JSONL: parquet files with embedded images, and mixture files of several sources.

* **Parquet** (``*.parquet``; a ``datasets`` ``save_to_disk`` folder holds the same rows in Arrow files, read the
  same way, memory-mapped; the layout of LLaVA-OneVision's Hugging Face data): one row per record, a
  ``conversations`` (LLaVA) or ``messages`` column (a list of structs, or the same as a JSON string), optionally an
  ``id`` column, and an ``image`` or ``images`` column whose cell is raw image bytes, a ``{"bytes": ..., "path": ...}``
  struct (Hugging Face's ``Image`` feature), a path string, or a list of those. Images with bytes are *embedded*: they
  are decoded from the file with Pillow, never looked up on disk, and named by their ``path`` (or ``image K``) in
  messages. A struct without bytes, or a string, is a path like a JSON record's. The file is read one row group at a
  time (:mod:`pyarrow`, the ``data`` extra), and a sample's images are read back from its row group when it is
  loaded (the last two row groups read are kept). A record's place is ``file.parquet:row N`` (0-based).
* **Mixture** (``*.yaml`` / ``*.yml``, as LLaVA-NeXT's data YAMLs)::

      seed: 0                      # optional: the seed of random sampling (default 0)
      datasets:
        - json_path: llava_665k.jsonl          # JSON, JSONL or parquet; relative to the mixture file
          sampling_strategy: "first:1000"      # all (default) | first:N | end:N | random:N, N a count or a percent
          image_folder: images/coco            # optional: this source's images folder (relative to the mixture)
        - json_path: ov_part0.parquet
          sampling_strategy: "random:50%"

  Records keep their own file and line (``llava_665k.jsonl:12``); a source without ``image_folder`` uses the
  caller's images folder (``data.images`` / ``--images``), else its own file's folder. ``first``/``end`` take the
  first/last N records, ``random`` N of them chosen with the seed (the same for every run with the same file and
  seed), kept in file order; a percent is rounded down. Bad records count as records when sampling. A mistake in the
  mixture file is a :class:`~emkd.errors.UserError` naming the file, the entry and the key.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from emkd.errors import UserError

MIXTURE_SUFFIXES = (".yaml", ".yml")
SAMPLING = ("all", "first", "end", "random")


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet")


def is_mixture(path: str) -> bool:
    return path.endswith(MIXTURE_SUFFIXES)


# ---- parquet --------------------------------------------------------------------------------------------------------
def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading parquet data needs pyarrow: pip install 'emkd[data]' (or pip install pyarrow)") from e
    return pq


class _ParquetImages:
    """The image cells of parquet row groups, read back by row (a small cache of the last row groups read)."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.lock = threading.Lock()
        self.groups: OrderedDict[tuple, list] = OrderedDict()
        self.layouts: dict[tuple, tuple[list[int], str | None]] = {}

    def _layout(self, path: str, stamp: tuple) -> tuple[list[int], str | None]:
        key = (path, stamp)
        if key not in self.layouts:
            pf = _pyarrow_parquet().ParquetFile(path)
            starts, total = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(g).num_rows
            self.layouts[key] = (starts, _image_column(pf.schema_arrow.names))
        return self.layouts[key]

    def put(self, path: str, stamp: tuple, group: int, cells: list) -> None:
        with self.lock:
            self.groups[(path, stamp, group)] = cells
            self.groups.move_to_end((path, stamp, group))
            while len(self.groups) > self.keep:
                self.groups.popitem(last=False)

    def cell(self, path: str, row: int) -> Any:
        st = os.stat(path)
        stamp = (st.st_size, st.st_mtime_ns)
        starts, column = self._layout(path, stamp)
        if column is None:
            return None
        group = bisect.bisect_right(starts, row) - 1  # the row group holding ``row``
        with self.lock:
            cells = self.groups.get((path, stamp, group))
        if cells is None:
            pf = _pyarrow_parquet().ParquetFile(path)
            cells = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
            self.put(path, stamp, group, cells)
        return cells[row - starts[group]]


_PARQUET_IMAGES = _ParquetImages()


def _image_column(names: list[str]) -> str | None:
    present = [n for n in ("image", "images") if n in names]
    if len(present) > 1:
        raise UserError("a parquet file may have an 'image' or an 'images' column, not both")
    return present[0] if present else None


def _image_items(cell: Any) -> list[Any]:
    if cell is None:
        return []
    return list(cell) if isinstance(cell, (list, tuple)) else [cell]


def _image_names(cell: Any) -> tuple[list[str], bool]:
    """The names of a parquet image cell's images and whether they are embedded (bytes) rather than paths."""
    names, embedded = [], []
    for k, item in enumerate(_image_items(cell)):
        if isinstance(item, (bytes, bytearray)):
            names.append(f"image {k}")
            embedded.append(True)
        elif isinstance(item, str):
            names.append(item)
            embedded.append(False)
        elif isinstance(item, dict) and item.get("bytes") is not None:
            names.append(item.get("path") or f"image {k}")
            embedded.append(True)
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            names.append(item["path"])
            embedded.append(False)
        else:
            raise ValueError(f"image {k} is neither bytes, a path, nor a {{'bytes', 'path'}} struct")
    if len(set(embedded)) > 1:
        raise ValueError("the images mix embedded bytes and file paths; use one kind per record")
    return names, bool(embedded) and embedded[0]


def embedded_image_bytes(path: str, row: int) -> list[bytes]:
    """The image bytes of row ``row`` of parquet file ``path``, in order."""
    cell = _arrow_cell(path, row) if os.path.isdir(path) else _PARQUET_IMAGES.cell(path, row)
    out = []
    for item in _image_items(cell):
        out.append(bytes(item["bytes"] if isinstance(item, dict) else item))
    return out


def read_parquet(path: str) -> Iterator[Any]:
    """The rows of a parquet file as :class:`~emkd.data.records.RawRecord` (or :class:`BadRecord`), one row group at
    a time. The image cell is replaced by the images' names; ``embedded`` says whether they are bytes."""
    pq = _pyarrow_parquet()
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    try:
        column = _image_column(pf.schema_arrow.names)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    st = os.stat(path)
    stamp = (st.st_size, st.st_mtime_ns)
    row = 0
    for group in range(pf.metadata.num_row_groups):
        rows = pf.read_row_group(group).to_pylist()
        if column is not None:
            _PARQUET_IMAGES.put(path, stamp, group, [r[column] for r in rows])
        yield from _row_records(path, rows, row, column)
        row += len(rows)
        del rows


def _row_records(path: str, rows: list[dict], first_row: int, column: str | None) -> Iterator[Any]:
    """Rows of a parquet file or Arrow data set as records; the image cell becomes the images' names."""
    from emkd.data.records import BadRecord, Problem, RawRecord, Source, _record_id

    for row, obj in enumerate(rows, start=first_row):
        source = Source(path, row=row)
        for key in ("conversations", "messages"):
            if isinstance(obj.get(key), str):
                try:
                    obj[key] = json.loads(obj[key])
                except json.JSONDecodeError as e:
                    yield BadRecord(source, _record_id(obj), (Problem("malformed_json", f"column {key!r}: {e}"),))
                    break
        else:
            embedded = False
            if column is not None:
                try:
                    names, embedded = _image_names(obj.pop(column))
                except ValueError as e:
                    yield BadRecord(source, _record_id(obj), (Problem("malformed_record", f"column {column!r}: {e}"),))
                    continue
                if names:
                    obj[column] = names
            yield RawRecord(source, obj, embedded=embedded)


# ---- Hugging Face `datasets` folders (save_to_disk) ------------------------------------------------------------------
def is_arrow_dir(path: str) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (``state.json`` and Arrow stream files)."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, "state.json"))
                                    or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def _arrow_files(path: str) -> list[str]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        raise UserError(f"{path} holds several splits ({', '.join(splits)}), not one data set: give one split's "
                        f"folder, e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        files = [os.path.join(path, f["filename"]) for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}/state.json: not a `datasets` save_to_disk state file ({type(e).__name__}: {e})"
                        ) from None
    if state.get("_indices_data_files"):
        raise UserError(f"{path}: the data set has an indices mapping (select/shuffle without flatten_indices); "
                        "save it with `ds.flatten_indices().save_to_disk(...)`")
    return files


def _arrow_tables(path: str) -> list[Any]:
    """The Arrow stream files of a ``save_to_disk`` folder as memory-mapped tables (nothing copied into memory)."""
    import pyarrow as pa

    tables = []
    for file in _arrow_files(path):
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(file)).read_all())
        except FileNotFoundError:
            raise UserError(f"{path}: {file} (listed in state.json) not found") from None
        except Exception as e:  # ArrowInvalid and friends
            raise UserError(f"{file}: not a readable Arrow stream file ({type(e).__name__}: {e})") from e
    return tables


def read_arrow_dir(path: str) -> Iterator[Any]:
    """The rows of a ``save_to_disk`` folder, one record batch at a time (the files are memory-mapped)."""
    _pyarrow_parquet()
    tables = _arrow_tables(path)
    row = 0
    for table in tables:
        try:
            column = _image_column(table.schema.names)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        for batch in table.to_batches():
            rows = batch.to_pylist()
            yield from _row_records(path, rows, row, column)
            row += len(rows)


_ARROW_TABLES: dict[str, tuple[tuple, list]] = {}  # folder -> (its files' stats, memory-mapped tables)


def _arrow_cell(path: str, row: int) -> Any:
    files = data_files(path)
    stamp = tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    cached = _ARROW_TABLES.get(path)
    if cached is None or cached[0] != stamp:
        cached = _ARROW_TABLES[path] = (stamp, _arrow_tables(path))
    for table in cached[1]:
        if row < table.num_rows:
            column = _image_column(table.schema.names)
            return None if column is None else table.column(column).slice(row, 1).to_pylist()[0]
        row -= table.num_rows
    raise IndexError(f"row {row} is past the end of {path}")


# ---- mixtures -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixtureEntry:
    """One source of a mixture: its data file, images folder (``None``: the caller's), strategy and amount."""

    index: int
    file: str
    images_dir: str | None
    strategy: str  # one of SAMPLING
    count: int | None = None  # N records, or
    percent: float | None = None  # N percent of the records

    def take(self, total: int) -> int:
        if self.strategy == "all":
            return total
        n = self.count if self.count is not None else int(total * self.percent / 100)
        return min(n, total)


def _amount(text: str, where: str) -> tuple[int | None, float | None]:
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return None, pct
        count = int(text)
        if count < 0:
            raise ValueError
        return count, None
    except ValueError:
        raise UserError(f"{where}: {text!r} is not a record count or a percent between 0% and 100%") from None


def read_mixture(path: str) -> tuple[list[MixtureEntry], int]:
    """The entries of a mixture file and its seed; raises :class:`UserError` naming the file, entry and key."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not a valid YAML mixture file ({e})".replace("\n", " ")) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise UserError(f"{path}: a mixture file needs a non-empty list 'datasets' of sources (each with json_path)")
    unknown = set(raw) - {"datasets", "seed"}
    if unknown:
        raise UserError(f"{path}: unknown key(s) {sorted(unknown)} (a mixture file has 'datasets' and 'seed')")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(f"{path}: seed: must be an integer, got {seed!r}")
    base = os.path.dirname(path)
    entries = []
    for k, item in enumerate(raw["datasets"]):
        where = f"{path}: datasets[{k}]"
        if not isinstance(item, dict):
            raise UserError(f"{where}: must be a mapping with json_path (and optionally sampling_strategy, "
                            "image_folder)")
        unknown = set(item) - {"json_path", "sampling_strategy", "image_folder"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)} (expected json_path, sampling_strategy, "
                            "image_folder)")
        file = item.get("json_path")
        if not isinstance(file, str) or not file:
            raise UserError(f"{where}.json_path: missing or not a path string")
        file = os.path.join(base, file)
        if is_mixture(file):
            raise UserError(f"{where}.json_path: {file} is a mixture file; mixtures cannot be nested")
        if not os.path.exists(file):
            raise UserError(f"{where}.json_path: {file} not found")
        folder = item.get("image_folder")
        if folder is not None and not isinstance(folder, str):
            raise UserError(f"{where}.image_folder: must be a path string, got {folder!r}")
        spec = item.get("sampling_strategy", "all")
        if not isinstance(spec, str):
            raise UserError(f"{where}.sampling_strategy: must be a string like 'first:1000', got {spec!r}")
        strategy, _, amount = spec.partition(":")
        if strategy not in SAMPLING or (strategy == "all") != (amount == ""):
            raise UserError(f"{where}.sampling_strategy: {spec!r} is not one of 'all', 'first:N', 'end:N', "
                            "'random:N' (N a count or a percent such as 50%)")
        count, percent = _amount(amount, f"{where}.sampling_strategy") if amount else (None, None)
        entries.append(MixtureEntry(k, file, None if folder is None else os.path.join(base, folder), strategy,
                                    count, percent))
    return entries, seed


def read_mixture_objects(path: str) -> Iterator[Any]:
    """The sampled records of every source of a mixture file, source after source, each in file order."""
    from emkd.data.records import RawRecord, read_objects

    entries, seed = read_mixture(path)
    for entry in entries:
        stop = None
        if entry.strategy == "all":
            chosen = None
        elif entry.strategy == "first" and entry.count is not None:  # no need to count the source
            chosen = stop = range(0, entry.count)
        else:
            total = count_records(entry.file)
            n = entry.take(total)
            if entry.strategy == "first":
                chosen = stop = range(0, n)
            elif entry.strategy == "end":
                chosen = range(total - n, total)
            else:
                chosen = set(random.Random(f"{seed}:{entry.index}").sample(range(total), n))
        for position, item in enumerate(read_objects(entry.file)):
            if stop is not None and position >= len(stop):
                break
            if chosen is not None and position not in chosen:
                continue
            if isinstance(item, RawRecord) and entry.images_dir is not None:
                item = item._replace(images_dir=entry.images_dir)
            yield item


def count_records(path: str) -> int:
    """How many records :func:`~emkd.data.records.read_objects` yields for a data file (parquet and ``datasets``
    folders: from their metadata; otherwise one streaming pass)."""
    from emkd.data.records import read_objects

    if is_parquet(path):
        return _pyarrow_parquet().ParquetFile(path).metadata.num_rows
    if is_arrow_dir(path):
        _pyarrow_parquet()
        return sum(t.num_rows for t in _arrow_tables(path))
    return sum(1 for _ in read_objects(path))


def data_files(path: str) -> list[str]:
    """Every file whose content a data path's records come from (the mixture file and its sources)."""
    if is_arrow_dir(path):
        return [os.path.join(path, "state.json"), *_arrow_files(path)]
    if not is_mixture(path):
        return [path]
    entries, _ = read_mixture(path)
    return [path] + [f for e in entries for f in data_files(e.file)]


def decode_embedded(name: str, data: bytes, convert: bool = True) -> Any:
    """An embedded image as a PIL image (RGB when ``convert``), verified; raises what Pillow raises."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if not convert:
            im.verify()
            return None
        return im.convert("RGB")

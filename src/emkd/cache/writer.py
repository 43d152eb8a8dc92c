"""Writing a teacher cache (``emkd cache-teacher``): run the frozen teacher once over a data set, store its outputs.

:func:`cache_teacher` renders the data exactly as training renders them (a :class:`~emkd.data.PairDataset` with the
teacher side), runs the teacher over them in batches, and stores per sample the hidden states at its real
(non-padding) positions with their vision mask, then the LM head, then ``index.json``
(:mod:`emkd.cache.format`).

A cache is written into a temporary sibling directory (``.NAME.partial-PID``) and renamed into place once
``index.json`` is in it, so an interrupted run never leaves a directory that loads. An existing cache that
``overwrite`` replaces is first moved aside to ``.NAME.old-PID`` and removed once the new one is in place. The next
``emkd cache-teacher`` in the same parent folder removes the staging folders of processes that no longer run
(:func:`clean_stale_staging`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from emkd.cache.fingerprint import data_identity, file_sha256, ids_digest, teacher_fingerprint
from emkd.cache.format import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_VERSION,
    DEFAULT_SHARD_BYTES,
    HEAD_FILE,
    INDEX_FILE,
    CacheExistsError,
)
from emkd.data import PairCollator, PairDataset
from emkd.data.dataset import source_key
from emkd.models.base import DistillAdapter
from emkd.models.teachers import checkpoint_architecture, load_teacher

# a staging folder of cache_teacher: ".NAME.partial-PID" (being written) or ".NAME.old-PID" (a replaced cache)
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
_CACHE_FILE = re.compile(r"^(cache-\d+(-of-\d+)?\.safetensors|head\.safetensors|index\.json(\.tmp)?)$")

logger = logging.getLogger(__name__)


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


# ---- staging folders --------------------------------------------------------------------------------------------
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


def _publish(tmp: Path, out_dir: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` into the staging folder ``tmp``, then put ``tmp`` in ``out_dir``'s place."""
    partial_index = tmp / (INDEX_FILE + ".tmp")
    partial_index.write_text(json.dumps(index))
    os.replace(partial_index, tmp / INDEX_FILE)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


# ---- what is written --------------------------------------------------------------------------------------------
def _batches(data: PairDataset, collate: PairCollator, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(data), batch_size):
        yield collate([data[i] for i in range(start, min(start + batch_size, len(data)))])["teacher"]


def _write_samples(
    teacher: DistillAdapter, data_set: PairDataset, writer: _ShardWriter, batch_size: int, store: torch.dtype,
    bar: tqdm,
) -> tuple[list[str], dict[str, list[Any]]]:
    """Run ``teacher`` over ``data_set`` and write every sample's hidden states (in ``store``) and vision mask.

    Returns the shard names and the index's per-sample lists ``shard``, ``length``, ``vision_tokens`` and
    ``ids_sha256``."""
    samples: dict[str, list[Any]] = {"shard": [], "length": [], "vision_tokens": [], "ids_sha256": []}
    collate = PairCollator(teacher.side, teacher.side)
    for side in _batches(data_set, collate, batch_size):
        with torch.no_grad():
            inputs = teacher(side).inputs
        for b in range(inputs.batch_size):
            real = inputs.attention_mask[b]  # (L,)
            vision = inputs.vision_mask[b][real].cpu()  # (n,)
            hidden = inputs.hidden[b][real].to("cpu", store)  # (n, D)
            samples["shard"].append(writer.add(len(samples["length"]), {"hidden": hidden, "vision": vision}))
            samples["length"].append(int(real.sum()))
            samples["vision_tokens"].append(int(vision.sum()))
            samples["ids_sha256"].append(ids_digest(side["input_ids"][b][real.to(side["input_ids"].device)]))
        bar.update(inputs.batch_size)
    bar.close()
    return writer.finish(), samples


def _write_head(teacher: DistillAdapter, directory: Path) -> dict[str, Any]:
    """Write the teacher's LM head to ``directory/head.safetensors``; return its part of the index."""
    head = teacher.model.get_output_embeddings()
    tensors = {"weight": head.weight.detach().to("cpu").contiguous()}  # (V, D)
    if getattr(head, "bias", None) is not None:
        tensors["bias"] = head.bias.detach().to("cpu").contiguous()  # (V,)
    path = directory / HEAD_FILE
    save_file(tensors, str(path), metadata={"format": CACHE_FORMAT})
    vocab_size, hidden_size = tensors["weight"].shape
    return {"hidden_size": int(hidden_size), "vocab_size": int(vocab_size), "head_bias": "bias" in tensors,
            "head_bytes": path.stat().st_size, "head_sha256": file_sha256(path)}


def _check_arguments(dtype: str, teacher_dtype: str, batch_size: int, shard_bytes: int, out_dir: Path,
                     overwrite: bool) -> None:
    for name, value in (("dtype", dtype), ("teacher_dtype", teacher_dtype)):
        if value not in CACHE_DTYPES:
            raise ValueError(f"{name} must be one of {CACHE_DTYPES}, got {value!r}")
    if batch_size < 1 or shard_bytes < 1:
        raise ValueError(f"batch_size and shard_bytes must be >= 1, got {batch_size} and {shard_bytes}")
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CacheExistsError(
            f"{out_dir} exists and is not an empty directory; choose another one or pass overwrite (--overwrite)"
        )


def cache_teacher(
    teacher_dir: str | os.PathLike,
    data: str | os.PathLike,
    images: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    template: str = "chat",
    max_length: int | None = 2048,
    batch_size: int = 4,
    dtype: str = "float32",
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
        shard_bytes: approximate size of one shard file.
        teacher_dtype: dtype the teacher runs in; the LM head is stored in it.
        overwrite: replace an existing ``out_dir``; otherwise an existing non-empty ``out_dir`` is an error.
        progress: show a progress bar on stderr.

    Staging folders left in ``out_dir``'s parent by runs that were killed are removed first
    (:func:`clean_stale_staging`).

    Returns:
        The index written to ``out_dir/index.json``.
    """
    out_dir = Path(out_dir)
    _check_arguments(dtype, teacher_dtype, batch_size, shard_bytes, out_dir, overwrite)
    clean_stale_staging(out_dir)
    teacher = load_teacher(teacher_dir, dtype=getattr(torch, teacher_dtype))
    teacher.return_logits = False
    rendering = {"template": template, "max_length": max_length, "on_bad_sample": on_bad_sample,
                 "allow_outside_images": allow_outside_images}
    data_set = PairDataset(data, images, teacher.side, teacher.side, **rendering)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        bar = tqdm(total=len(data_set), desc=f"cache {Path(teacher_dir).name}", unit="sample", file=sys.stderr,
                   disable=not progress)
        shards, samples = _write_samples(teacher, data_set, _ShardWriter(tmp, shard_bytes), batch_size,
                                         getattr(torch, dtype), bar)
        head = _write_head(teacher, tmp)
        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "teacher": {"dir": os.path.abspath(teacher_dir), "architecture": checkpoint_architecture(teacher_dir),
                        "config_sha256": teacher_fingerprint(teacher_dir), "dtype": teacher_dtype},
            "data": {**data_identity(data), "images": None if images is None else os.path.abspath(images),
                     **rendering},
            "dtype": dtype,
            "num_samples": len(data_set),
            "shards": shards,
            "shard_sizes": [(tmp / name).stat().st_size for name in shards],
            "shard_sha256": [file_sha256(tmp / name) for name in shards],
            **head,
            "samples": {**samples, "source": [source_key(r.source) for r in data_set.records]},
        }
        _publish(tmp, out_dir, index)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


__all__ = ["cache_teacher", "clean_stale_staging"]

"""What a teacher cache is checked against: digests of files, of token ids, of a teacher and of a data file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


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


def data_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A data file's absolute ``path``, ``size``, ``mtime_ns`` and ``sha256`` (the ``data`` section of an index)."""
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": file_sha256(path)}


__all__ = ["data_identity", "file_sha256", "ids_digest", "teacher_fingerprint"]

"""A tiny on-disk workspace for training tests: tokenizer, student, teachers, images and LLaVA JSON records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from emkd.models import build_tokenizer, save_tiny_teacher
from emkd.models.tiny import save_tiny_student

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
CORPUS = [
    "what colour is the square? the square is red green blue yellow",
    "describe the image. a small square on a grey background",
    "how many squares are there? one two three",
]


def build_workspace(
    root: Path, num_samples: int = 4, teacher_kind: str = "student", colours: list[str] | None = None
) -> dict[str, Path]:
    """Write a student, a teacher and ``num_samples`` captioned / instruction samples under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(CORPUS, vocab_size=400)
    save_tiny_student(root / "student", tokenizer, seed=0)
    if teacher_kind == "student":
        save_tiny_student(root / "teacher", tokenizer, seed=1, compressor="none", text_hidden=48)
    else:
        save_tiny_teacher(teacher_kind, root / "teacher", tokenizer, seed=1)
    images = root / "images"
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    records, captions = [], []
    names = colours or list(COLOURS)
    for i in range(num_samples):
        colour = names[i % len(names)]
        img = np.full((32, 32, 3), 128, dtype=np.uint8)
        y, x = rng.integers(0, 16, 2)
        img[y : y + 16, x : x + 16] = COLOURS[colour]
        Image.fromarray(img).save(images / f"{i}.png")
        records.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the square?"},
            {"from": "gpt", "value": f"the square is {colour}"}]})
        captions.append({"id": f"c{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": f"a small {colour} square on a grey background"}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "captions.json").write_text(json.dumps(captions))
    return {"root": root, "student": root / "student", "teacher": root / "teacher", "images": images,
            "train": root / "train.json", "captions": root / "captions.json"}


def workspace_overrides(ws: dict, out, *extra: str, teacher=None) -> list[str]:
    """``emkd train`` overrides that point a recipe at a :func:`build_workspace` (student, teacher, data) and write
    to ``out``, followed by ``extra``."""
    return [f"student={ws['student']}", f"teacher={teacher or ws['teacher']}", f"data.train={ws['train']}",
            f"data.images={ws['images']}", f"output_dir={out}", *extra]


def free_port() -> str:
    """A TCP port free on this machine now, for a torchrun rendezvous (fixed ports clash when two suites run)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])

"""The demo's data: easy-VQA ("general") and a fine-grained suite that 2 x 2 token pooling makes hard, not impossible.

The demo's teacher sees a 64 x 64 image as 64 tokens of 8 x 8 px patches; its efficient student average-pools the
8 x 8 token grid 2 x 2, so each of its 16 tokens stands for a 16 x 16 px *block* of four patches. Every fine-grained
sample draws small objects, one per 8 px cell, on black, frames one of them with a white 1 px outline, and asks
about the framed one. In half the samples (:data:`ALONE`) the framed object is alone in its block; in the other half
the block's three other cells hold distractors whose answers all differ from it and from each other. Two to four
more objects sit in other blocks.

* ``color``: a small shape in one of 10 colours, some of them near each other (red, orange, pink, brown; green,
  lime; blue, cyan, purple); "what color is the shape in the frame?" (chance: one in ten)
* ``counting``: 1-9 dots of 2 x 2 px on a 3 x 3 lattice; "how many dots are in the frame?" (one in nine)
* ``ocr``: a DejaVu Sans digit 0-9, 6 px tall; "what digit is in the frame?" (one in ten)
* ``chart``: a bar 1-12 half pixels tall (whole rows, and a row at half ink on top when the height is odd); "how
  tall is the bar in the frame?" (one in twelve)

The teacher finds the framed token and reads it. The student's one token for the block overlays the block's objects
and the frame. With a linear patch embedding (:func:`pooled_view`) that token is the same whichever object of a
crowded block is framed: the answer is one of four with nothing to choose between them (a quarter at best, against
a chance of one in nine to twelve), while an object alone in its block keeps its answer, diluted four times. The suite's
towers are *not* linear: their features come after one transformer layer (``vision_feature_layer=-1``), which can
route the framed patch to channels of its own before the pooling (the tests do it with a hand-made feature), and
then the answer survives in crowded blocks too. The student recovers it only by training its tower to carry it --
what distilling from a teacher that keeps every token is meant to teach. Easy-VQA (one large shape per image)
survives pooling and is the control.

The student starts from the tower the teacher *started* from, not from the teacher's trained tower
(:func:`emkd.demo.pipeline.init_models`), as EM-KD's student and teacher both start from the same SigLIP. What the
testbed's design went through, measured with one seed and 400 phase-2 steps:

* With the teacher's trained tower, the student did not need distillation: the teacher's tower had learned to make
  the framed patch stand out, the pooled token was that patch, and the SFT student matched or beat the teacher.
* Naming the object in the question instead of framing it ("what color is the circle?", four objects per block)
  kept the tower from knowing which object matters, but the tiny teacher stayed at chance on all four families.
* With every framed object crowded and the teacher's starting tower, SFT stayed at chance (also at 1200 steps)
  while EM-KD reached 57-96 %: no room below. Half the samples keep the answer in the pooled token for that room.
* With half the objects alone but the student's tower frozen in phase 1 (caption alignment), SFT still stayed at
  chance on every family (also after 1,000 phase-2 steps, and at 64 tokens). Training the tower on the captions in
  phase 1, which name the framed object, lifted SFT to 31 / 37 / 44 / 29 % (counting / ocr / chart / color, five
  seeds, 250 steps), with the teacher at 81-100 %. Each family of an SFT student is then either learned or left at
  chance, seed by seed; distilled students vary far less.
* With data version 3 (6 colours, 1-6 dots, digits 1-6, bars 1-6 px) and 1000 phase-2 steps from one shared phase
  1, the SFT student reached the teacher on colour, ocr and chart (99.5-99.9 %, the teacher 100 %): a trained tower
  learns to route a framed patch that shows its own frame, so once phase 2 converges such a task leaves no room.
  Finer answers (data version 5: 10 colours with near pairs, 1-9 dots, digits 0-9, bar heights in half pixels) slow
  that learning down for the student more than for the teacher: after 1000 steps two SFT seeds scored 28 / 38
  (counting), 63 / 41 (ocr), 39 / 45 (chart) and 64 / 67 % (color), the teacher 69, 79, 86 and 95 %.
* Asking about one object of a crowded block by its corner ("what digit is in the top left of the frame?", two to
  four objects in a frame round the block) or by a comparison ("the brightest shape in the frame"): the teacher
  stayed at chance on all four families after its 1500 steps, and on the corner questions after 3000 more (17-31 %).
  It learns to read one marked token; choosing among a block's tokens by the question's words or by comparing them
  is beyond this tiny teacher.
* With its tower frozen in phase 1, the data-version-5 teacher stayed at chance on every fine-grained family after
  its 1500 phase-2 steps, while the SFT student learned them; training its tower in phase 1 too, as the student's
  is, gave the shipped teacher (69 / 79 / 86 / 95 % on counting / ocr / chart / color).

Records are LLaVA JSON: ``{"id", "image", "category", "conversations", "meta"}``, the image path relative to the
images root; ``meta`` holds what draws the image and poses the question (``render(meta)`` redraws the saved image
bit for bit) and what :func:`caption_record` describes. :func:`build_demo_data` writes ``train.json``,
``test.json`` and ``captions.json`` (LLaVA "plain" template, one caption per training image) and caches them.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SIZE = 64  # image side, px
PATCH = 8  # teacher patch side, px
POOL = 2  # the student pools POOL x POOL patch tokens into one
CELLS = SIZE // PATCH  # 8 patch cells per side
DATA_VERSION = 5  # bump when any generator changes its output; invalidates cached builds

FAMILY_GROUPS = {
    "general": "General",
    "color": "Fine-grained",
    "counting": "Fine-grained",
    "ocr": "OCR & Chart",
    "chart": "OCR & Chart",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ---- shared helpers -------------------------------------------------------------------------------------------------
def pooled_view(image: np.ndarray, patch: int = PATCH, pool: int = POOL) -> np.ndarray:
    """What a token pooled from ``pool x pool`` patch tokens keeps, drawn back at full size.

    Each ``(patch * pool)``-px block is replaced by the mean of its ``pool * pool`` patches, tiled ``pool x pool``.
    For a linear patch embedding ``E``, ``avg_pool(E(image)) == avg_pool(E(pooled_view(image)))``, so two images
    with the same view give the pooled student the same first-layer tokens.

    Args:
        image: ``(H, W, C)``, ``H`` and ``W`` multiples of ``patch * pool``.

    Returns:
        ``(H, W, C)`` float32.
    """
    H, W, C = image.shape
    block = patch * pool
    if H % block or W % block:
        raise ValueError(f"pooled_view: image side must be a multiple of {block}, got shape {image.shape}")
    x = image.astype(np.float32).reshape(H // block, pool, patch, W // block, pool, patch, C)
    mean = x.mean(axis=(1, 4), keepdims=True)  # (H/b, 1, p, W/b, 1, p, C): the mean patch of each block
    return np.broadcast_to(mean, x.shape).reshape(H, W, C).copy()


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent stream per (seed, keys): ``_rng(0, "grid", "test")`` does not depend on other streams."""
    return np.random.default_rng(np.random.SeedSequence([seed, *(zlib.crc32(k.encode()) for k in keys)]))


def _balanced(answers: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` answers, each of ``answers`` ``n // len(answers)`` or one more times, in random order."""
    order = [answers[i % len(answers)] for i in range(n)]
    return [order[i] for i in rng.permutation(n)]


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


@functools.lru_cache(maxsize=None)
def _font_path() -> str:
    """Matplotlib's bundled DejaVu Sans (not ``findfont``, which may pick a system copy of another version)."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")


@functools.lru_cache(maxsize=None)
def _glyph(char: str, size: int) -> np.ndarray:
    """Coverage mask in [0, 1] of ``char`` in DejaVu Sans at ``size`` px, cropped to its ink: ``(h, w)``."""
    from PIL import ImageDraw, ImageFont

    canvas = Image.new("L", (3 * size, 3 * size))
    ImageDraw.Draw(canvas).text((size, size), char, font=ImageFont.truetype(_font_path(), size), fill=255)
    a = np.asarray(canvas, dtype=np.float32) / 255
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _paint(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, color) -> None:
    """Blend ``color`` into ``canvas`` (``(H, W, 3)`` float) through ``mask`` (``(h, w)``) at top-left ``(y, x)``."""
    h, w = mask.shape
    m = mask[:, :, None]
    canvas[y : y + h, x : x + w] = canvas[y : y + h, x : x + w] * (1 - m) + np.asarray(color, np.float32) * m


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


# ---- the fine-grained families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One fine-grained task: how to draw a sample for a given answer, and everything derived from its ``meta``.

    ``meta`` is a JSON-able dict; ``render(meta)`` is the ``(64, 64, 3)`` uint8 image, ``question(meta)`` and
    ``answer(meta)`` the turn pair and ``caption(meta)`` the phase-1 caption.
    """

    name: str
    answers: tuple[str, ...]
    sample: Callable[[np.random.Generator, str], dict]
    render: Callable[[dict], np.ndarray]
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    caption: Callable[[dict], str]


# Every family draws small objects in 8 px cells on black, fills the four cells of one pooled block (2 x 2 cells)
# with objects whose answers differ, and frames one of them; the question asks about the framed one.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 210, 30),
    "purple": (170, 60, 210),
    "orange": (250, 140, 20),
    "pink": (250, 120, 180),
    "cyan": (40, 210, 220),
    "brown": (150, 90, 40),
    "lime": (170, 240, 40),
}
FRAME_COLOR = (255, 255, 255)  # no object is white: the frame is the only white ink
INSIDE = 6  # an object fills at most the 6 x 6 px inside its cell's 1 px frame line
CLUTTER = (2, 4)  # objects outside the framed block: between 2 and 4, in cells of other blocks
ALONE = 0.5  # probability that the framed object is alone in its block (its answer survives pooling, diluted)
SHAPES = ("square", "circle", "triangle", "cross")
DOT_SLOTS = [(1 + 2 * i, 1 + 2 * j) for i in range(3) for j in range(3)]  # 2 x 2 px dots on a 3 x 3 lattice
OCR_DIGITS = "0123456789"
OCR_SIZE = 8  # DejaVu Sans digits are 6 px tall and 5 px wide at this size: one fits inside a frame


def _block(row: int, col: int) -> tuple[int, int]:
    return row // POOL, col // POOL


def _block_cells(block: tuple[int, int]) -> list[tuple[int, int]]:
    return [(block[0] * POOL + i, block[1] * POOL + j) for i in range(POOL) for j in range(POOL)]


@functools.lru_cache(maxsize=None)
def _frame() -> np.ndarray:
    """The 1 px outline of an 8 x 8 cell."""
    mask = np.zeros((PATCH, PATCH), np.float32)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def _in_cell(mask: np.ndarray) -> np.ndarray:
    """``mask`` (at most 6 x 6) centred inside an 8 x 8 cell, clear of the frame line."""
    cell = np.zeros((PATCH, PATCH), np.float32)
    h, w = mask.shape
    y, x = 1 + (INSIDE - h) // 2, 1 + (INSIDE - w) // 2
    cell[y : y + h, x : x + w] = mask
    return cell


@functools.lru_cache(maxsize=None)
def _shape(name: str) -> np.ndarray:
    """An 8 x 8 cell mask of ``name`` inside the frame line (4 x 4 supersampled)."""
    s = (np.arange(INSIDE * 4) + 0.5) / 4 - INSIDE / 2  # sub-pixel centres, origin at the middle
    x, y = s[None, :], s[:, None]
    inside = {
        "square": (abs(x) <= 2.5) & (abs(y) <= 2.5),
        "circle": x**2 + y**2 <= 2.9**2,
        "triangle": (y <= 2.8) & (y >= -2.8 + 2 * abs(x)),
        "cross": ((abs(x) <= 1) & (abs(y) <= 3)) | ((abs(y) <= 1) & (abs(x) <= 3)),
    }[name]
    small = np.broadcast_to(inside, (INSIDE * 4, INSIDE * 4)).reshape(INSIDE, 4, INSIDE, 4).mean(axis=(1, 3))
    return _in_cell(small.astype(np.float32))


def _dots(n: int, slots: list[int]) -> np.ndarray:
    mask = np.zeros((PATCH, PATCH), np.float32)
    for k in slots[:n]:
        y, x = DOT_SLOTS[k]
        mask[y : y + 2, x : x + 2] = 1
    return mask


def _bar(height: int) -> np.ndarray:
    """A bar ``height`` half pixels tall (1-12): whole rows, and a row at half ink on top when ``height`` is odd."""
    mask = np.zeros((PATCH, PATCH), np.float32)
    full = height // 2
    mask[1 + INSIDE - full : 1 + INSIDE, 2:6] = 1
    if height % 2:
        mask[INSIDE - full, 2:6] = 0.5
    return mask


def _framed_sample(answers: tuple[str, ...], extra: Callable[[np.random.Generator], dict]):
    """A sampler: the framed block's four objects take ``answer`` and three other answers; each object gets the
    ``extra`` fields drawn for it (its colour, shape, ...); clutter objects fill cells of other blocks."""

    def sample(rng: np.random.Generator, answer: str) -> dict:
        block = tuple(int(v) for v in rng.integers(0, CELLS // POOL, size=2))
        others = [answers[i] for i in rng.permutation(len(answers)) if answers[i] != answer][: POOL * POOL - 1]
        target = int(rng.integers(POOL * POOL))
        values = others[:target] + [answer] + others[target:]
        objects = [{"cell": list(cell), "value": v, **extra(rng)} for cell, v in zip(_block_cells(block), values)]
        if rng.random() < ALONE:
            objects, target = [objects[target]], 0
        free = [(r, c) for r in range(CELLS) for c in range(CELLS) if _block(r, c) != block]
        for k in rng.permutation(len(free))[: int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))]:
            objects.append({"cell": list(free[k]), "value": _pick(rng, answers), **extra(rng)})
        return {"objects": objects, "framed": target}

    return sample


def _framed_render(mask: Callable[[dict], np.ndarray], color: Callable[[dict], str] = lambda obj: obj["color"]):
    """A renderer: each object's 8 x 8 ``mask(object)`` in ``PALETTE[color(object)]``, then the frame."""

    def render(meta: dict) -> np.ndarray:
        canvas = np.zeros((SIZE, SIZE, 3), np.float32)
        for obj in meta["objects"]:
            row, col = obj["cell"]
            _paint(canvas, mask(obj), row * PATCH, col * PATCH, PALETTE[color(obj)])
        row, col = meta["objects"][meta["framed"]]["cell"]
        _paint(canvas, _frame(), row * PATCH, col * PATCH, FRAME_COLOR)
        return _to_uint8(canvas)

    return render


def _framed(meta: dict) -> dict:
    return meta["objects"][meta["framed"]]


def _any_color(rng: np.random.Generator) -> dict:
    return {"color": _pick(rng, tuple(PALETTE))}


def _any_shape(rng: np.random.Generator) -> dict:
    return {"shape": _pick(rng, SHAPES)}


def _dot_slots(rng: np.random.Generator) -> dict:
    return {"color": _pick(rng, tuple(PALETTE)), "slots": [int(k) for k in rng.permutation(len(DOT_SLOTS))]}


COLOR = Family(
    name="color",
    answers=tuple(PALETTE),
    sample=_framed_sample(tuple(PALETTE), _any_shape),
    render=_framed_render(lambda obj: _shape(obj["shape"]), color=lambda obj: obj["value"]),  # the asked colour
    question=lambda meta: "what color is the shape in the frame?",
    answer=lambda meta: _framed(meta)["value"],
    caption=lambda meta: f"a {_framed(meta)['value']} {_framed(meta)['shape']} in a frame",
)

COUNTING = Family(
    name="counting",
    answers=tuple(str(n) for n in range(1, 10)),
    sample=_framed_sample(tuple(str(n) for n in range(1, 10)), _dot_slots),
    render=_framed_render(lambda obj: _dots(int(obj["value"]), obj["slots"])),
    question=lambda meta: "how many dots are in the frame?",
    answer=lambda meta: _framed(meta)["value"],
    caption=lambda meta: f"{NUMBER_WORDS[int(_framed(meta)['value'])]} dot"
    + ("s" if _framed(meta)["value"] != "1" else "")
    + " in a frame",
)

OCR = Family(
    name="ocr",
    answers=tuple(OCR_DIGITS),
    sample=_framed_sample(tuple(OCR_DIGITS), _any_color),
    render=_framed_render(lambda obj: _in_cell(_glyph(obj["value"], OCR_SIZE))),
    question=lambda meta: "what digit is in the frame?",
    answer=lambda meta: _framed(meta)["value"],
    caption=lambda meta: f"the digit {_framed(meta)['value']} in a frame",
)

CHART = Family(
    name="chart",
    answers=tuple(str(h) for h in range(1, 2 * INSIDE + 1)),
    sample=_framed_sample(tuple(str(h) for h in range(1, 2 * INSIDE + 1)), _any_color),
    render=_framed_render(lambda obj: _bar(int(obj["value"]))),
    question=lambda meta: "how tall is the bar in the frame?",
    answer=lambda meta: _framed(meta)["value"],
    caption=lambda meta: f"a bar of height {_framed(meta)['value']} in a frame",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (COLOR, COUNTING, OCR, CHART)}


def make_family(
    family: str | Family,
    n: int,
    rng: np.random.Generator,
    image_dir: str | os.PathLike,
    *,
    images_root: str | os.PathLike | None = None,
    exclude: set[str] | None = None,
) -> list[dict]:
    """``n`` records of one fine-grained family, answers balanced; images written to ``image_dir`` as PNG.

    Args:
        family: a name in :data:`FAMILIES` or a :class:`Family`.
        n: number of records (one image each).
        rng: the only source of randomness.
        image_dir: where the images go (created); files are ``00000.png``, ``00001.png``, ...
        images_root: record image paths are relative to it (default: ``image_dir``'s parent).
        exclude: :func:`sample_key` values not to produce (e.g. the training set's, for a held-out split).
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    if n < 0:
        raise ValueError(f"make_family({fam.name!r}): n must be >= 0, got {n}")
    image_dir = Path(image_dir)
    root = Path(images_root) if images_root is not None else image_dir.parent
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, answer in enumerate(_balanced(fam.answers, n, rng)):
        for _ in range(1000):
            meta = fam.sample(rng, answer)
            if exclude is None or sample_key(fam.name, meta) not in exclude:
                break
        else:
            raise RuntimeError(f"make_family({fam.name!r}): 1000 draws for answer {answer!r} were all excluded")
        if fam.answer(meta) != answer:  # a generator bug, never the data's fault
            raise AssertionError(f"{fam.name}: sample for answer {answer!r} answers {fam.answer(meta)!r}: {meta}")
        path = image_dir / f"{i:05d}.png"
        Image.fromarray(fam.render(meta)).save(path)
        records.append(
            {
                "id": f"{image_dir.name}-{i:05d}",
                "image": path.relative_to(root).as_posix(),
                "category": fam.name,
                "conversations": _conversation(fam.question(meta), answer),
                "meta": meta,
            }
        )
    return records


def sample_key(family: str, meta: dict) -> str:
    """What makes two samples the same task (image and question meaning; the phrasing ``q`` is left out)."""
    return family + json.dumps({k: v for k, v in meta.items() if k != "q"}, sort_keys=True)


def make_counting(n: int, rng: np.random.Generator, image_dir: str | os.PathLike, **kwargs: Any) -> list[dict]:
    """``n`` "counting" records (:data:`COUNTING`); keyword arguments as :func:`make_family`."""
    return make_family(COUNTING, n, rng, image_dir, **kwargs)


def make_ocr(n: int, rng: np.random.Generator, image_dir: str | os.PathLike, **kwargs: Any) -> list[dict]:
    """``n`` "ocr" records (:data:`OCR`); keyword arguments as :func:`make_family`."""
    return make_family(OCR, n, rng, image_dir, **kwargs)


def make_color(n: int, rng: np.random.Generator, image_dir: str | os.PathLike, **kwargs: Any) -> list[dict]:
    """``n`` "color" records (:data:`COLOR`); keyword arguments as :func:`make_family`."""
    return make_family(COLOR, n, rng, image_dir, **kwargs)


def make_chart(n: int, rng: np.random.Generator, image_dir: str | os.PathLike, **kwargs: Any) -> list[dict]:
    """``n`` "chart" records (:data:`CHART`); keyword arguments as :func:`make_family`."""
    return make_family(CHART, n, rng, image_dir, **kwargs)


# ---- easy-VQA ("general") -------------------------------------------------------------------------------------------
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")
EASY_VQA_COLORS = {  # the exact fill colours easy-VQA draws its shapes with
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
_EASY_VQA_PACKED = np.array([(r << 16) | (g << 8) | b for r, g, b in EASY_VQA_COLORS.values()], dtype=np.int32)
_WHAT_COLOR = re.compile(r"what (?:color is|is the color of) the (\w+)\?")
_WHAT_SHAPE = re.compile(r"what shape (?:is in the image|does the image contain|is present)\?|what is the \w+ shape\?")
_SHAPE_WORD = re.compile(r"\b(circle|rectangle|triangle)\b")
_NEGATION = re.compile(r"\b(?:not|no)\b")


def _shape_facts(question: str, answer: str) -> tuple[str | None, str | None]:
    """``(shape present, shape absent)`` that one easy-VQA question-answer pair states."""
    if _WHAT_SHAPE.fullmatch(question):
        return answer, None
    m = _WHAT_COLOR.fullmatch(question)
    if m:
        return (m[1], None) if m[1] in EASY_VQA_SHAPES else (None, None)
    m = _SHAPE_WORD.search(question)
    if m and answer in ("yes", "no"):
        present = (answer == "yes") != bool(_NEGATION.search(question))
        return (m[1], None) if present else (None, m[1])
    return None, None


def _easy_vqa_shapes(questions: list[str], answers: list[str], image_ids: list[int]) -> dict[int, str]:
    """The shape of each image that its questions name (or exclude two of three); images with neither are left out."""
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for q, a, i in zip(questions, answers, image_ids):
        yes, no = _shape_facts(q, a)
        if yes:
            present.setdefault(i, set()).add(yes)
        if no:
            absent.setdefault(i, set()).add(no)
    shapes = {}
    for i in set(present) | set(absent):
        known = present.get(i) or set(EASY_VQA_SHAPES) - absent.get(i, set())
        if len(known) == 1:
            shapes[i] = next(iter(known))
    return shapes


def _easy_vqa_color(path: str) -> str:
    """The easy-VQA colour with the most pixels of exactly its value in the image (the shape's fill)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.int32).reshape(-1, 3)  # (H*W, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]  # (H*W,)
    counts = (packed[:, None] == _EASY_VQA_PACKED[None, :]).sum(0)  # (8,)
    return list(EASY_VQA_COLORS)[int(counts.argmax())]


def convert_easy_vqa(
    out_dir: str | os.PathLike, split: str = "train", limit: int | None = None, seed: int = 0
) -> list[dict]:
    """easy-VQA questions of ``split`` as "general" records; their images hard-linked (or copied, across file
    systems) into ``out_dir/images/easyvqa_{split}``.

    With ``limit``, ``limit`` questions are kept, spread over images: in a seeded order of images, one question of
    each image, then a second of each, and so on. Image paths are relative to ``out_dir/images``. ``meta`` holds the
    shape's colour (from its pixels) and its shape (from the image's questions; ``None`` when they do not say).
    """
    from easy_vqa import get_test_image_paths, get_test_questions, get_train_image_paths, get_train_questions

    if split not in ("train", "test"):
        raise ValueError(f"convert_easy_vqa: split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"convert_easy_vqa: limit must be >= 0 or None, got {limit}")
    questions, answers, image_ids = get_train_questions() if split == "train" else get_test_questions()
    sources = get_train_image_paths() if split == "train" else get_test_image_paths()
    chosen = _spread(image_ids, limit, _rng(seed, "easyvqa", split))
    shapes = _easy_vqa_shapes(questions, answers, image_ids)

    image_dir = Path(out_dir) / "images" / f"easyvqa_{split}"
    image_dir.mkdir(parents=True, exist_ok=True)
    colors: dict[int, str] = {}
    records = []
    for q in chosen:
        image = image_ids[q]
        if image not in colors:
            colors[image] = _easy_vqa_color(sources[image])
            target = image_dir / f"{image}.png"
            if not target.exists():
                _link_or_copy(sources[image], target)
        records.append(
            {
                "id": f"easyvqa-{split}-{q:05d}",
                "image": f"easyvqa_{split}/{image}.png",
                "category": "general",
                "conversations": _conversation(questions[q], answers[q]),
                "meta": {"shape": shapes.get(image), "color": colors[image]},
            }
        )
    return records


def _link_or_copy(source: str, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (easy-VQA's files are never written to), or copy across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _spread(image_ids: list[int], limit: int | None, rng: np.random.Generator) -> list[int]:
    """Indices of ``limit`` questions (all when ``None``), round-robin over images in a random order."""
    by_image: dict[int, list[int]] = {}
    for q, image in enumerate(image_ids):
        by_image.setdefault(image, []).append(q)
    images = sorted(by_image)
    ranked = []
    for rank, k in enumerate(rng.permutation(len(images))):
        qs = by_image[images[k]]
        ranked.extend((turn, rank, qs[j]) for turn, j in enumerate(rng.permutation(len(qs))))
    ranked.sort()
    return [q for _, _, q in ranked[: len(ranked) if limit is None else limit]]


# ---- captions -------------------------------------------------------------------------------------------------------
def caption_record(record: dict) -> dict:
    """The phase-1 ("plain" template) record of ``record``'s image: human turn ``"<image>"``, gpt turn a caption.

    Captions come from ``record["meta"]``: "a blue circle", "three dots", "the number 31", "a red square left of a
    blue square", "a bar chart of 3, 5, 2 and 6".
    """
    category, meta = record.get("category"), record.get("meta")
    if meta is None:
        raise ValueError(f"caption_record: record {record.get('id')!r} has no 'meta' to describe its image")
    if category == "general":
        caption = f"a {meta['color']} {meta['shape'] or 'shape'}"
    elif category in FAMILIES:
        caption = FAMILIES[category].caption(meta)
    else:
        raise ValueError(
            f"caption_record: record {record.get('id')!r} has category {category!r}, expected 'general' or one of "
            f"{sorted(FAMILIES)}"
        )
    return {
        "id": f"caption-{record['image'].rsplit('.', 1)[0]}",
        "image": record["image"],
        "category": category,
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}],
    }


# ---- the whole data set ---------------------------------------------------------------------------------------------
def build_demo_data(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    easy_vqa_train: int = 4000,
    easy_vqa_test: int = 500,
    per_family_train: int = 2000,
    per_family_test: int = 200,
) -> dict[str, Path]:
    """Write the demo's data under ``root`` (cached: a second call with the same arguments only reads the manifest).

    Files: ``train.json`` (``easy_vqa_train`` easy-VQA questions and ``per_family_train`` records of each
    fine-grained family, shuffled), ``test.json`` (easy-VQA's test split and ``per_family_test`` fresh records per
    family from other seed streams, none the same task as a training record), ``captions.json`` (one "plain" record
    per training image), ``manifest.json`` (arguments and counts), images under ``images/``.

    Returns:
        paths by name: ``train``, ``test``, ``captions``, ``manifest``, and ``images`` (the root image paths are
        relative to).
    """
    root = Path(root)
    images = root / "images"
    paths = {
        "train": root / "train.json",
        "test": root / "test.json",
        "captions": root / "captions.json",
        "images": images,
        "manifest": root / "manifest.json",
    }
    args = {
        "version": DATA_VERSION,
        "seed": seed,
        "easy_vqa_train": easy_vqa_train,
        "easy_vqa_test": easy_vqa_test,
        "per_family_train": per_family_train,
        "per_family_test": per_family_test,
    }
    if paths["manifest"].is_file() and all(paths[k].exists() for k in ("train", "test", "captions", "images")):
        try:
            if json.loads(paths["manifest"].read_text())["args"] == args:
                return paths
        except (ValueError, KeyError):
            pass  # an unreadable manifest: rebuild
    start = time.perf_counter()
    paths["manifest"].unlink(missing_ok=True)  # an interrupted build must not look complete
    for split in ("train", "test"):  # only the directories this function writes
        for name in ("easyvqa", *FAMILIES):
            shutil.rmtree(images / f"{name}_{split}", ignore_errors=True)

    train = convert_easy_vqa(root, "train", limit=easy_vqa_train, seed=seed)
    test = convert_easy_vqa(root, "test", limit=easy_vqa_test, seed=seed)
    for name in FAMILIES:
        made = make_family(name, per_family_train, _rng(seed, name, "train"), images / f"{name}_train")
        seen = {sample_key(name, r["meta"]) for r in made}
        train += made
        test += make_family(name, per_family_test, _rng(seed, name, "test"), images / f"{name}_test", exclude=seen)
    train = [train[i] for i in _rng(seed, "shuffle", "train").permutation(len(train))]
    test = [test[i] for i in _rng(seed, "shuffle", "test").permutation(len(test))]
    first_of_image: dict[str, dict] = {}
    for record in train:
        first_of_image.setdefault(record["image"], record)
    captions = [caption_record(r) for r in first_of_image.values()]

    for key, records in (("train", train), ("test", test), ("captions", captions)):
        _write_records(paths[key], records)
    counts = {
        split: {c: sum(r["category"] == c for r in records) for c in FAMILY_GROUPS}
        for split, records in (("train", train), ("test", test), ("captions", captions))
    }
    manifest = {
        "args": args,
        "counts": counts,
        "answers": {name: list(f.answers) for name, f in FAMILIES.items()},
        "groups": FAMILY_GROUPS,
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    _write_text(paths["manifest"], json.dumps(manifest, indent=2) + "\n")
    return paths


def _write_records(path: Path, records: list[dict]) -> None:
    """A JSON list, one record per line."""
    _write_text(path, "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

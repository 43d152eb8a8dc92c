"""The demo's data: easy-VQA ("general") and a fine-grained suite whose answers 2 x 2 token pooling can remove.

The demo's teacher sees a 64 x 64 image as 64 tokens of 8 x 8 px patches; its efficient student average-pools the
8 x 8 token grid 2 x 2, so each of its 16 tokens stands for a 16 x 16 px *block* of four patches. With a linear patch
embedding (the demo's tokens are the SigLIP embedding output: ``vision_layers=1``, ``vision_feature_layer=-2``), the
mean of four patch tokens is the embedding of the mean of the four 8 x 8 patches (:func:`pooled_view`): a pooled
token keeps everything inside an 8 x 8 patch but not *which* of its block's four patches a thing was in (position
embeddings add the same mean to every block). Each fine-grained family puts its answer in that bit when its objects
share a block, and lets them fall anywhere on the 8 px cell grid, so some samples share a block and some do not:

* ``grid``: a checkerboard of 8 px cells with two small squares in adjacent cells; "what color is the left (right,
  top, bottom) square?" (6 colours). Inside one block (4/7 of samples), swapping the colours keeps the pooled view.
* ``ocr``: a two-digit number (digits 1-4, distinct: 12 answers), dark on light, each DejaVu Sans digit inside one
  8 px cell of a cell row, both shifted alike by up to 2 px; "what number is written?". Inside one block (4/7), "31"
  and "13" have the same pooled view.
* ``chart``: four labelled blue bars A-D in consecutive cell columns, heights 1-6 cells; "how tall is bar C?" (1-6)
  or "which bar is tallest?" (A-D). Swapping the heights of two bars of one block keeps the pooled view.
* ``counting``: 1-6 dots on black, one centred in each of their cells; the dots of a
  block share the block's ink (a colour drawn for the block, divided by its number of dots). The pooled view shows
  each occupied block's ink, the same whether one dot or four hold it; dots cluster (``COUNT_CLUSTER``), so 57% of
  samples have a block with two or more, and a pooled student can at best guess the count from the number of
  occupied blocks (Bayes ceiling ~49%, against ~100% from 64 tokens).

:meth:`Family.twin` returns a sample with another answer and the same pooled view, or ``None`` when the answer
survives pooling. For grid, ocr and chart the twin is a swap that the generator draws exactly as often as the
sample, so on these samples any pooled student, however trained, can do no better than a coin flip between two
answers; the teacher tells them apart from one or two of its 64 tokens. The other samples keep the answer in the
pooled tokens, but only as layout across tokens, which is where a better-trained student can gain. Easy-VQA (one
large shape per image) survives pooling and is the control. Every fine-grained family asks one question per kind,
in one style of drawing (data version 2): the demo's tiny teacher learns grid, chart and counting above chance
within its training budget, and varied phrasings, inks and offsets kept it at chance.

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
DATA_VERSION = 2  # bump when any generator changes its output; invalidates cached builds

FAMILY_GROUPS = {
    "general": "General",
    "counting": "Fine-grained",
    "grid": "Fine-grained",
    "ocr": "OCR & Chart",
    "chart": "OCR & Chart",
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


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
    ``answer(meta)`` the turn pair, ``caption(meta)`` the phase-1 caption, and ``twin(meta)`` another meta of the
    same family with a different answer and the same :func:`pooled_view` (to one grey level), or ``None``.
    """

    name: str
    answers: tuple[str, ...]
    sample: Callable[[np.random.Generator, str], dict]
    render: Callable[[dict], np.ndarray]
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    caption: Callable[[dict], str]
    twin: Callable[[dict], dict | None]


# counting: dots on black, one per cell; the dots of a block share the block's ink ------------------------------------
COUNT_INKS = (  # a block's total colour; channels are multiples of 12, so ink / m is exact for m = 1..4 dots
    (252, 0, 0),
    (0, 252, 0),
    (96, 144, 252),
    (252, 252, 0),
    (0, 252, 252),
    (252, 0, 252),
    (252, 144, 0),
    (252, 252, 252),
)
COUNT_RADIUS = 3.0
COUNT_CLUSTER = 0.3  # probability that a dot joins a block that already has one (pooled student's ceiling ~49%)
COUNT_QUESTION = "how many dots are there?"


@functools.lru_cache(maxsize=None)
def _dot(radius: float, dx: int, dy: int) -> np.ndarray:
    """Anti-aliased disk in an 8 x 8 cell, centred ``(dx, dy)`` px off the cell centre (4 x 4 supersampling)."""
    s = (np.arange(PATCH * 4) + 0.5) / 4  # sub-pixel centres
    inside = ((s[None, :] - 4 - dx) ** 2 + (s[:, None] - 4 - dy) ** 2) <= radius**2  # (32, 32)
    return inside.reshape(PATCH, 4, PATCH, 4).mean(axis=(1, 3)).astype(np.float32)


def _block(row: int, col: int) -> tuple[int, int]:
    return row // POOL, col // POOL


def _block_cells(block: tuple[int, int]) -> list[tuple[int, int]]:
    return [(block[0] * POOL + i, block[1] * POOL + j) for i in range(POOL) for j in range(POOL)]


def _counting_sample(rng: np.random.Generator, answer: str) -> dict:
    n = int(answer)
    taken: list[tuple[int, int]] = []
    for _ in range(n):
        near = [c for b in dict.fromkeys(_block(*t) for t in taken) for c in _block_cells(b) if c not in taken]
        if near and rng.random() < COUNT_CLUSTER:
            taken.append(near[int(rng.integers(len(near)))])
        else:
            free = [(r, c) for r in range(CELLS) for c in range(CELLS) if (r, c) not in taken]
            taken.append(free[int(rng.integers(len(free)))])
    inks = {b: _pick(rng, COUNT_INKS) for b in sorted({_block(*t) for t in taken})}
    return {"dots": _ink_dots(sorted(taken), inks)}


def _ink_dots(cells: list[tuple[int, int]], inks: dict[tuple[int, int], tuple[int, ...]]) -> list[list]:
    """``[row, col, colour]`` per cell: the block's ink split evenly among the block's dots."""
    per_block = {b: sum(_block(*c) == b for c in cells) for b in inks}
    return [[r, c, [v // per_block[_block(r, c)] for v in inks[_block(r, c)]]] for r, c in cells]


def _counting_render(meta: dict) -> np.ndarray:
    canvas = np.zeros((SIZE, SIZE, 3), np.float32)
    mask = _dot(COUNT_RADIUS, 0, 0)
    for row, col, color in meta["dots"]:
        _paint(canvas, mask, row * PATCH, col * PATCH, color)
    return _to_uint8(canvas)


def _counting_twin(meta: dict) -> dict | None:
    """One dot fewer in the first block holding two or more, the block's ink kept; ``None`` when no block does."""
    cells = [(r, c) for r, c, _ in meta["dots"]]
    inks = {}
    for r, c, color in meta["dots"]:
        inks[_block(r, c)] = tuple(v * sum(_block(*x) == _block(r, c) for x in cells) for v in color)
    for k, cell in enumerate(cells):
        if sum(_block(*x) == _block(*cell) for x in cells) > 1:
            return {**meta, "dots": _ink_dots(cells[:k] + cells[k + 1 :], inks)}
    return None


COUNTING = Family(
    name="counting",
    answers=tuple(str(n) for n in range(1, 7)),
    sample=_counting_sample,
    render=_counting_render,
    question=lambda meta: COUNT_QUESTION,
    answer=lambda meta: str(len(meta["dots"])),
    caption=lambda meta: f"{NUMBER_WORDS[len(meta['dots'])]} dot{'s' if len(meta['dots']) > 1 else ''}",
    twin=_counting_twin,
)


# ocr: a two-digit number, each digit inside one 8 px cell ----------------------------------------------------------
OCR_DIGITS = "1234"
OCR_SIZE = 10  # DejaVu Sans digits are 5-6 px wide and 7 px tall at this size: one digit fits one cell
OCR_INK, OCR_PAPER = (20, 20, 20), (245, 245, 245)
OCR_QUESTION = "what number is written?"


def _ocr_sample(rng: np.random.Generator, answer: str) -> dict:
    return {
        "number": answer,
        "column": int(rng.integers(0, CELLS - 1)),  # the first digit's cell column
        "row": int(rng.integers(0, CELLS)),  # the digits' cell row
        "shift": [int(rng.integers(0, 3)), int(rng.integers(0, 2))],  # (x, y) px, the same inside both cells
    }


def _ocr_render(meta: dict) -> np.ndarray:
    canvas = np.empty((SIZE, SIZE, 3), np.float32)
    canvas[:] = OCR_PAPER
    for i, digit in enumerate(meta["number"]):
        mask = _glyph(digit, OCR_SIZE)
        x = (meta["column"] + i) * PATCH + meta["shift"][0]
        y = meta["row"] * PATCH + meta["shift"][1]
        _paint(canvas, mask, y, x, OCR_INK)
    return _to_uint8(canvas)


OCR = Family(
    name="ocr",
    answers=tuple(a + b for a in OCR_DIGITS for b in OCR_DIGITS if a != b),
    sample=_ocr_sample,
    render=_ocr_render,
    question=lambda meta: OCR_QUESTION,
    answer=lambda meta: meta["number"],
    caption=lambda meta: f"the number {meta['number']}",
    twin=lambda meta: {**meta, "number": meta["number"][::-1]} if meta["column"] % POOL == 0 else None,
)


# grid: two small squares in adjacent cells of a checkerboard --------------------------------------------------------
GRID_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "black": (20, 20, 20),
}
GRID_BOARD = ((215, 215, 215), (185, 185, 185))  # the two checkerboard shades
GRID_SIDES = {"h": ("left", "right"), "v": ("top", "bottom")}
GRID_QUESTIONS = ("what color is the {side} square?", "what is the color of the {side} square?")


def _grid_sample(rng: np.random.Generator, answer: str) -> dict:
    other = _pick(rng, [c for c in GRID_COLORS if c != answer])
    ask = int(rng.integers(2))
    size = int(rng.integers(4, 7))
    orient = _pick(rng, ("h", "v"))
    along, across = int(rng.integers(0, CELLS - 1)), int(rng.integers(0, CELLS))  # the pair's second cell is next
    row, col = (across, along) if orient == "h" else (along, across)
    return {
        "orient": orient,
        "cell": [row, col],  # the first (left or top) square's cell
        "size": size,
        "offset": [int(v) for v in rng.integers(0, PATCH - size + 1, size=2)],  # (x, y) inside both cells
        "colors": [answer, other] if ask == 0 else [other, answer],  # left/top first
        "ask": ask,
        "q": int(rng.integers(len(GRID_QUESTIONS))),
    }


def _grid_cells(meta: dict) -> list[tuple[int, int]]:
    """(row, column) of the first (left/top) and second square's cells."""
    row, col = meta["cell"]
    return [(row, col), (row, col + 1)] if meta["orient"] == "h" else [(row, col), (row + 1, col)]


def _grid_twin(meta: dict) -> dict | None:
    """The colours swapped, when both squares are in one block."""
    (r1, c1), (r2, c2) = _grid_cells(meta)
    same_block = (r1 // POOL, c1 // POOL) == (r2 // POOL, c2 // POOL)
    return {**meta, "colors": meta["colors"][::-1]} if same_block else None


def _grid_render(meta: dict) -> np.ndarray:
    rows, cols = np.indices((SIZE, SIZE)) // PATCH
    canvas = np.where(((rows + cols) % 2 == 0)[:, :, None], GRID_BOARD[0], GRID_BOARD[1]).astype(np.float32)
    s, (ox, oy) = meta["size"], meta["offset"]
    for (row, col), name in zip(_grid_cells(meta), meta["colors"]):
        _paint(canvas, np.ones((s, s), np.float32), row * PATCH + oy, col * PATCH + ox, GRID_COLORS[name])
    return _to_uint8(canvas)


def _grid_caption(meta: dict) -> str:
    first, second = meta["colors"]
    relation = "left of" if meta["orient"] == "h" else "above"
    return f"a {first} square {relation} a {second} square"


GRID = Family(
    name="grid",
    answers=tuple(GRID_COLORS),
    sample=_grid_sample,
    render=_grid_render,
    question=lambda meta: GRID_QUESTIONS[meta["q"]].format(side=GRID_SIDES[meta["orient"]][meta["ask"]]),
    answer=lambda meta: meta["colors"][meta["ask"]],
    caption=_grid_caption,
    twin=_grid_twin,
)


# chart: four bars in consecutive 8 px columns, heights in whole cells ------------------------------------------------
CHART_BARS = "ABCD"
CHART_MAX = 6  # heights 1..6 cells of 8 px, standing on the line between cell rows 6 and 7
CHART_BASE = (CELLS - 1) * PATCH  # y of the baseline; the labels sit in the last cell row
CHART_COLORS = {"blue": (40, 80, 220), "red": (220, 40, 40), "green": (40, 150, 60), "black": (30, 30, 30)}
CHART_LABEL_SIZE = 8
CHART_WIDTH, CHART_OFFSET, CHART_COLOR = 4, 2, "blue"  # every bar: 4 px wide, 2 px into its cell
CHART_QUESTIONS = {"value": "how tall is bar {bar}?", "tallest": "which bar is tallest?"}


def _chart_sample(rng: np.random.Generator, answer: str) -> dict:
    if answer in CHART_BARS:
        ask, top = "tallest", int(rng.integers(2, CHART_MAX + 1))
        values = [int(v) for v in rng.integers(1, top, size=4)]
        values[CHART_BARS.index(answer)] = top
    else:
        ask = _pick(rng, CHART_BARS)
        values = [int(v) for v in rng.integers(1, CHART_MAX + 1, size=4)]
        values[CHART_BARS.index(ask)] = int(answer)
    return {
        "values": values,
        "column": int(rng.integers(0, CELLS - len(CHART_BARS) + 1)),  # bar A's cell column
        "ask": ask,
    }


def _chart_render(meta: dict) -> np.ndarray:
    canvas = np.full((SIZE, SIZE, 3), 250, np.float32)
    x0 = meta["column"] * PATCH
    canvas[CHART_BASE, x0 : x0 + len(CHART_BARS) * PATCH] = (120, 120, 120)  # the axis, inside the label row
    for i, (bar, value) in enumerate(zip(CHART_BARS, meta["values"])):
        x = x0 + i * PATCH
        canvas[CHART_BASE - value * PATCH : CHART_BASE, x + CHART_OFFSET : x + CHART_OFFSET + CHART_WIDTH] = (
            CHART_COLORS[CHART_COLOR]
        )
        label = _glyph(bar, CHART_LABEL_SIZE)
        _paint(canvas, label, SIZE - label.shape[0] - 1, x + (PATCH - label.shape[1]) // 2, (0, 0, 0))
    return _to_uint8(canvas)


def _chart_answer(meta: dict) -> str:
    values = meta["values"]
    if meta["ask"] == "tallest":
        return CHART_BARS[values.index(max(values))]
    return str(values[CHART_BARS.index(meta["ask"])])


def _chart_question(meta: dict) -> str:
    if meta["ask"] == "tallest":
        return CHART_QUESTIONS["tallest"]
    return CHART_QUESTIONS["value"].format(bar=meta["ask"])


def _chart_twin(meta: dict) -> dict | None:
    """The heights of the asked (or tallest) bar and the bar sharing its block swapped, when they differ."""
    values = list(meta["values"])
    bar = values.index(max(values)) if meta["ask"] == "tallest" else CHART_BARS.index(meta["ask"])
    partner = bar + 1 if (meta["column"] + bar) % POOL == 0 else bar - 1
    if not 0 <= partner < len(values) or values[bar] == values[partner]:
        return None
    values[bar], values[partner] = values[partner], values[bar]
    return {**meta, "values": values}


CHART = Family(
    name="chart",
    answers=tuple(str(v) for v in range(1, CHART_MAX + 1)) + tuple(CHART_BARS),
    sample=_chart_sample,
    render=_chart_render,
    question=_chart_question,
    answer=_chart_answer,
    caption=lambda meta: "a bar chart of " + ", ".join(map(str, meta["values"][:-1])) + f" and {meta['values'][-1]}",
    twin=_chart_twin,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (COUNTING, OCR, GRID, CHART)}


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


def make_grid(n: int, rng: np.random.Generator, image_dir: str | os.PathLike, **kwargs: Any) -> list[dict]:
    """``n`` "grid" records (:data:`GRID`); keyword arguments as :func:`make_family`."""
    return make_family(GRID, n, rng, image_dir, **kwargs)


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

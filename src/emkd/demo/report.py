"""Pictures of a distillation run: loss curves, the Hungarian matching over an image, vision tokens decoded.

* :func:`plot_loss_curves` draws every logged component of every run (``output_dir/log.jsonl``).
* :func:`plot_matching` draws, over one image, a line from each student vision token to the teacher token
  Hungarian matching paired it with (EM-KD Eq. 1-2).
* :func:`plot_decoded_tokens` writes each vision token's top vocabulary word at its place on the image, for the
  teacher and the students (the EM-KD paper's Figure 2).

All figures use matplotlib's Agg canvas and never touch the global backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from emkd.losses import EMKDLoss


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(path) if '"objective"' in line]


def plot_loss_curves(runs: dict[str, str | Path], path: str | Path) -> Path:
    """One panel per component; one line per run (``runs`` maps a name to its ``log.jsonl``)."""
    logs = {name: read_log(p) for name, p in runs.items() if Path(p).is_file()}
    keys = sorted({k for rows in logs.values() for r in rows for k in r} - {"step", "epoch", "loss", "grad_norm", "learning_rate"})
    keys = ["objective"] + [k for k in keys if k != "objective"]
    cols = min(3, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows_n))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        for name, rows in logs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, label=name, lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def _token_centres(n_tokens: int, image_px: int) -> np.ndarray:
    """Centres (x, y) in pixels of ``n_tokens`` tokens laid out on a square grid over a square image."""
    side = int(round(n_tokens**0.5))
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} vision tokens do not form a square grid")
    cell = image_px / side
    idx = np.arange(n_tokens)
    return np.stack([(idx % side + 0.5) * cell, (idx // side + 0.5) * cell], axis=1)


def plot_matching(image: np.ndarray, idx_s: torch.Tensor, idx_t: torch.Tensor, n_student: int, n_teacher: int,
                  path: str | Path, title: str = "") -> Path:
    """Draw each student token (large dots, pooled grid) linked to its matched teacher token (small dots)."""
    px = image.shape[0]
    cs, ct = _token_centres(n_student, px), _token_centres(n_teacher, px)
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, extent=(0, px, px, 0))
    ax.scatter(ct[:, 0], ct[:, 1], s=6, c="white", edgecolors="black", linewidths=0.3, label=f"teacher ({n_teacher})")
    colours = [f"C{i % 10}" for i in range(len(idx_s))]
    for k, (i, j) in enumerate(zip(idx_s.tolist(), idx_t.tolist())):
        ax.plot([cs[i, 0], ct[j, 0]], [cs[i, 1], ct[j, 1]], color=colours[k], lw=1.5)
        ax.scatter([ct[j, 0]], [ct[j, 1]], s=30, color=colours[k], marker="s")
    ax.scatter(cs[:, 0], cs[:, 1], s=60, c=colours[: len(cs)], edgecolors="black", label=f"student ({n_student})")
    ax.set_xlim(0, px)
    ax.set_ylim(px, 0)
    ax.set_title(title or "Hungarian matching on vision logits")
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, Path(path))


def decode_vision_tokens(logits: torch.Tensor, tokenizer: Any) -> list[str]:
    """Top vocabulary word of each vision token's logits ``[N, V]``, special tokens (template, image) left out."""
    logits = logits.clone()
    special = [i for i in tokenizer.all_special_ids if i < logits.shape[-1]]
    logits[:, special] = float("-inf")
    return [tokenizer.decode([int(i)]).strip() or "·" for i in logits.argmax(-1)]


def plot_decoded_tokens(image: np.ndarray, panels: dict[str, list[str]], path: str | Path) -> Path:
    """One panel per model: the image with each vision token's top word written at its grid position."""
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    px = image.shape[0]
    for i, (name, words) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(image, extent=(0, px, px, 0), alpha=0.55)
        centres = _token_centres(len(words), px)
        size = 9 if len(words) <= 16 else 5.5
        for (x, y), w in zip(centres, words):
            ax.text(x, y, w[:6], ha="center", va="center", fontsize=size, color="black",
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", alpha=0.6, lw=0))
        ax.set_title(f"{name}: {len(words)} vision tokens", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save(fig, Path(path))


@torch.no_grad()
def vision_views(student, teacher, batch: dict) -> dict[str, Any]:
    """Run both adapters on a one-sample batch; return EM-KD's matches and each side's vision logits."""
    s = student(batch["student"]).inputs
    t = teacher(batch["teacher"]).inputs
    out = EMKDLoss()(s, t)
    return {
        "matches": out.matches[0],
        "student_logits": s.logits(s.vision_tokens(0)),
        "teacher_logits": t.logits(t.vision_tokens(0)),
        "n_student": int(s.vision_mask[0].sum()),
        "n_teacher": int(t.vision_mask[0].sum()),
    }

"""Pictures of a distillation run: loss curves, the Hungarian matching over an image, vision tokens decoded.

* :func:`plot_loss_curves` draws every logged component of every run (``output_dir/log.jsonl``).
* :func:`plot_matching` draws, over one image, a line from each student vision token to the teacher token
  Hungarian matching paired it with (EM-KD Eq. 1-2).
* :func:`plot_decoded_tokens` writes each vision token's top vocabulary word at its place on the image, for the
  teacher and the students (the EM-KD paper's Figure 2); :func:`vision_vocabulary` measures over many images how
  many of an image's tokens decode to its most common word.
* :func:`plot_accuracy_vs_ttft` draws accuracy against time to first token, one line per method over token budgets,
  with the teacher as a reference point (``emkd reproduce``).
* :func:`plot_match_quality` draws ``match_in_window`` (matched pairs inside the student token's pooling window) over
  training steps per run, against the random-matching baseline.

All figures use matplotlib's Agg canvas and never touch the global backend.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
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
    """One panel per component; one line per run, in the same colour in every panel (``runs`` maps a name to its
    ``log.jsonl``). The matching quality has its own figure (:func:`plot_match_quality`)."""
    logs = {name: read_log(p) for name, p in runs.items() if Path(p).is_file()}
    colors = {name: f"C{i}" for i, name in enumerate(logs)}
    skip = {"step", "epoch", "loss", "grad_norm", "learning_rate", "match_in_window", "match_in_window_random"}
    keys = sorted({k for rows in logs.values() for r in rows for k in r} - skip)
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
                ax.plot(steps, values, label=name, lw=1.2, color=colors[name])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
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


@dataclass
class VisionVocabulary:
    """What the vision tokens of one model decode to (their top word, special tokens left out), over ``images``."""

    images: int
    tokens: int
    image_word_share: float  # mean over images of the share of its tokens decoding to the image's most common word
    distinct_image_words: int  # how many different words are some image's most common one
    common_words: list[tuple[str, int]]  # the most frequent image words and how many images have each

    def sentence(self, name: str) -> str:
        words = ", ".join(f'"{w}" ({n})' for w, n in self.common_words)
        return (f"{name}: {100 * self.image_word_share:.0f} % of an image's {self.tokens // max(self.images, 1)} "
                f"vision tokens decode to the image's most common word; over {self.images} images that word is one "
                f"of {self.distinct_image_words} (most often {words}).")


def vision_vocabulary(logits: list[torch.Tensor], tokenizer: Any, top: int = 3) -> VisionVocabulary:
    """Per image ``[N, V]`` vision logits -> :class:`VisionVocabulary`: whether the tokens of one image decode to one
    word (the report's "all tokens say the same word"), and whether that word changes from image to image."""
    if not logits:
        raise ValueError("vision_vocabulary needs the vision logits of at least one image")
    shares, words = [], Counter()
    for z in logits:
        decoded = decode_vision_tokens(z, tokenizer)
        word, count = Counter(decoded).most_common(1)[0]
        shares.append(count / len(decoded))
        words[word] += 1
    return VisionVocabulary(len(logits), sum(int(z.shape[0]) for z in logits), float(np.mean(shares)), len(words),
                            words.most_common(top))


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


def plot_accuracy_vs_ttft(series: dict[str, list[dict[str, Any]]], panels: dict[str, str], path: str | Path,
                          reference: dict[str, Any] | None = None) -> Path:
    """Accuracy (%) against time to first token (ms): one panel per ``panels`` key (the value is its title).

    ``series`` maps a line's name (a method) to its points in drawing order (token budgets); a point is
    ``{"label": str, "ttft": (mean, std), KEY: (mean, std) for every panel KEY}``, the error bars being the standard
    deviations (over seeds). ``reference`` (the teacher) is one such point, drawn as a black star labelled with its
    ``label``. Points whose TTFT mean is ``None`` (not measured) are left out.
    """
    fig = Figure(figsize=(5.0 * len(panels), 4.0))
    for i, (key, title) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k, (name, all_points) in enumerate(series.items()):
            pts = [p for p in all_points if p["ttft"][0] is not None]
            if not pts:
                continue
            x, xerr = zip(*(p["ttft"] for p in pts))
            y, yerr = zip(*(p[key] for p in pts))
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", ms=5, capsize=3, lw=1.2, color=f"C{k}", label=name)
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(p["label"], (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7,
                            color=f"C{k}")
        if reference is not None and reference["ttft"][0] is not None:
            (x, xerr), (y, yerr) = reference["ttft"], reference[key]
            ax.errorbar([x], [y], xerr=[xerr], yerr=[yerr], marker="*", ms=12, color="black", ls="none",
                        label=reference["label"])
        ax.set_xlabel("time to first token (ms)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def _logged_series(path: str | Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every record of a ``log.jsonl`` that carries ``key`` (a line cut short by a crash is
    passed over)."""
    points = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get(key), (int, float)) and "step" in record:
            points.append((int(record["step"]), float(record[key])))
    return points


def runs_with_matches(logs: dict[str, str | Path]) -> list[str]:
    """The names of the runs, in ``logs``' order, whose ``log.jsonl`` has a ``match_in_window`` record: the runs
    whose method paired student and teacher vision tokens (a missing log counts as none)."""
    return [name for name, path in logs.items() if Path(path).is_file() and _logged_series(path, "match_in_window")]


def plot_match_quality(logs: dict[str, str | Path], out: str | Path, baseline: float | None = None) -> Path:
    """``match_in_window`` over training steps, one line per run, with the random-matching baseline dashed.

    ``logs`` maps a run's name to its ``log.jsonl``; ``match_in_window`` is the fraction of matched student/teacher
    vision tokens whose teacher token lies in the student token's pooling window (:mod:`emkd.matching.quality`).
    ``baseline`` is the expected fraction under a uniformly random matching
    (:func:`emkd.matching.quality.random_hit_rate`); ``None`` takes the ``match_in_window_random`` the runs logged
    (one line per run if they differ, none if no run logged it).

    Raises:
        ValueError: no run has a ``match_in_window`` record (the message names the logs read).
    """
    series = {name: _logged_series(logs[name], "match_in_window") for name in runs_with_matches(logs)}
    if not series:
        raise ValueError(f"no 'match_in_window' record in any of {[str(p) for p in logs.values()]}")
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, points) in enumerate(series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, color=f"C{k}", lw=1.4, marker="o" if len(points) < 30 else None, ms=3, label=name)
    if baseline is not None:
        baselines = {"random matching": (baseline, "black")}
    else:
        logged = {name: _logged_series(logs[name], "match_in_window_random") for name in series}
        logged = {name: points[-1][1] for name, points in logged.items() if points}
        if len(set(logged.values())) == 1:
            baselines = {"random matching": (next(iter(logged.values())), "black")}
        else:
            colours = {name: f"C{k}" for k, name in enumerate(series)}
            baselines = {f"random matching ({name})": (value, colours[name]) for name, value in logged.items()}
    for label, (value, colour) in baselines.items():
        ax.axhline(value, color=colour, ls="--", lw=1.0, label=f"{label}: {value:.3f}")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("matches inside the pooling window")
    ax.set_title("Does the matching match? (match_in_window)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(out))

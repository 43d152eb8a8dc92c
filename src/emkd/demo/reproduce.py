"""``emkd reproduce``: the demo-scale analogue of EM-KD Table 2 (methods) and Table 3 (ablations) over seeds, with
paired confidence intervals against SFT, and accuracy against time to first token over vision-token budgets.

The run, top to bottom (:func:`run_reproduce`):

1. the demo's data, tokenizer and teacher (:mod:`emkd.demo.pipeline`); the teacher is evaluated once; Align-TI's IVA
   layer is the argmax of the teacher's IRS; the teacher's outputs on the training split are cached once
   (``emkd cache-teacher``) for every method whose registry entry can read them;
2. per seed: the 16-token student's phase 1 (``recipes/demo_student_phase1.yaml``), then every variant of Tables 2
   and 3 as a phase-2 run (``demo_student_phase2.yaml``) from those weights with that seed, so every variant of a
   seed starts from the same weights and sees the data in the same order; then, per other token budget, a student
   that pools the teacher's 8 x 8 patch grid to 2 x 2 (4 tokens) or keeps it (64 tokens), with its own phase 1 and
   an SFT and an EM-KD phase 2 from it. Every run is evaluated on the held-out split (accuracy per family, TTFT);
3. the tables (:func:`results_markdown`) to ``docs/results.md`` and the token-budget plot to
   ``docs/figures/token_budget.png`` (``figures/`` next to the markdown).

Statistics, in points (accuracy in %): per task family, for the fine-grained average (the mean over every family
outside easy-VQA's "General" group of :data:`emkd.demo.datasets.FAMILY_GROUPS`) and for the macro average over all
families, the mean ± sample standard deviation over seeds; and each variant's paired difference to SFT,
``d_s = acc(variant, seed s) - acc(SFT, seed s)``, as ``mean(d) [mean(d) ∓ t(0.975, n - 1) sd(d) / sqrt(n)]``
(Student t on the ``n`` per-seed differences: :func:`paired_seed_difference`). The interval covers what the seed
changes (initial weights, data order, sampling in the losses) on one fixed held-out set; not the choice of records.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emkd.demo.datasets import FAMILY_GROUPS
from emkd.demo.pipeline import (
    QUICK,
    STUDENT,
    _recipe,
    TEACHER_SEED,
    VISION,
    DemoBudget,
    Progress,
    demo_tokenizer,
    ensure_teacher,
    init_models,
    prepare_data,
    run_train,
)
from emkd.errors import UserError
from emkd.evaluation import EvalResult
from emkd.training.methods import METHODS

# name -> (method, loss overrides); the EM-KD paper's rows.
TABLE2 = {
    "SFT": ("sft", {}),
    "MiniLLM (rkl)": ("rkl", {}),
    "LLaVA-KD*": ("llava_kd", {}),
    "Align-TI": ("align_ti", {}),
    "EM-KD": ("emkd", {}),
}
TABLE3 = {
    "SFT + VLAD": ("emkd", {"alpha": 1.0, "beta": 0.0}),
    "SFT + VLAD + VSD": ("emkd", {"alpha": 1.0}),
    "SFT + VLAD + VSD + RLD (EM-KD)": ("emkd", {}),
    "matching: avgpool": ("emkd", {"matching": "avgpool"}),
    "matching: Hungarian on hidden": ("emkd", {"matching": "hungarian_hidden"}),
    "matching: Hungarian on logits (EM-KD)": ("emkd", {}),
    "VSD on hidden states (MSE)": ("emkd", {"vsd_target": "hidden"}),
    "VSD on logits (EM-KD)": ("emkd", {}),
}
BASELINE = "SFT"  # the Table 2 row every paired difference is taken against
BUDGET_ROWS = ("SFT", "EM-KD")  # the Table 2 rows trained at every token budget
MATCHING_ROWS = {"LLaVA-KD*": TABLE2["LLaVA-KD*"], **TABLE3}  # the rows whose matching quality is reported
MATCH_KEYS = ("match_in_window", "match_in_window_random")  # read from each run's log.jsonl when logged
FINE_GRAINED = "fine-grained"  # column: mean over the fine-grained families
AVERAGE = "avg"  # column: macro average over every family (EvalResult.average)
RESOLUTION_POINTS = 2.0  # the difference the testbed should resolve on the fine-grained average
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
DEFAULT_BUDGETS = (4, 16, 64)
DEFAULT_RESULTS = "docs/results.md"  # where `emkd reproduce` writes its markdown unless --results says otherwise
PATCH_GRID = VISION["image_size"] // VISION["patch_size"]  # the teacher's patch grid side (8: 64 tokens)
MAIN_TOKENS = STUDENT["pool_size"] ** 2  # vision tokens of the students of Tables 2 and 3
CONFIDENCE = 0.95
# The demo's sizes with a held-out split four times larger on the fine-grained families (1,000 records each): with
# 250, evaluating two students on the same records alone moved their paired difference by about 2 points.
REPRODUCE_BUDGET = dataclasses.replace(DemoBudget(), per_family_test=1000)
MINUS = "\N{MINUS SIGN}"

NOT_SHOWN = [
    "One tiny model family: a student and a teacher of this project's own class, a few layers wide, trained from "
    "scratch on the demo data; the paper distills pretrained LLaVA-scale models, and effect sizes need not transfer.",
    "A synthetic fine-grained suite: its families are drawn by `emkd.demo.datasets` so that 2 x 2 pooling overlays "
    "the asked object with distractors unless the student's tower learns to keep it apart, and easy-VQA is rendered "
    "shapes; none of them is a benchmark of the paper.",
    "Seed-to-seed variation only: the intervals cover initial weights, data order and sampling on one held-out set, "
    "one teacher and one step budget; not the choice of held-out records, the teacher's training or a longer budget.",
    "No tuning per method: every method runs with its paper's loss weights and the demo's optimiser settings.",
    "Many comparisons at 95 % each: about one interval in twenty excludes zero when the true difference is zero.",
    "CPU time to first token of tiny models, batch 1, one sample: fixed per-call overhead weighs more than the "
    "number of vision tokens does at the paper's scale on a GPU.",
]


def _variant_key(method: str, loss: dict[str, Any]) -> str:
    return method + "".join(f"-{k}={v}" for k, v in sorted(loss.items()))


def pool_size_for(tokens: int) -> int:
    """Side of the pooled grid of a student with ``tokens`` vision tokens per image: 4 -> 2, 16 -> 4, 64 -> 8.

    Raises:
        UserError: ``tokens`` is not ``p * p`` for a ``p`` from 1 to the teacher's patch grid side (8).
    """
    side = math.isqrt(tokens) if tokens > 0 else 0
    if side * side != tokens or not 1 <= side <= PATCH_GRID:
        squares = ", ".join(str(p * p) for p in range(1, PATCH_GRID + 1))
        raise UserError(f"a token budget is the teacher's {PATCH_GRID} x {PATCH_GRID} patch grid pooled to p x p "
                         f"tokens ({squares}); got {tokens}")
    return side


# ---- statistics -----------------------------------------------------------------------------------------------------
def t_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of Student's t distribution with ``dof`` degrees of freedom (``t_quantile(0.975, 4)`` is
    2.776)."""
    from scipy.stats import t

    if not 0 < q < 1:
        raise ValueError(f"t_quantile: q must be in (0, 1), got {q}")
    if dof < 1:
        raise ValueError(f"t_quantile: dof must be at least 1, got {dof}")
    return float(t.ppf(q, dof))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for one value)."""
    if not values:
        raise ValueError("mean_std: no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _signed(x: float) -> str:
    """``+1.2`` / ``−0.3`` (a minus sign, not a hyphen); ``+0.0`` for anything that rounds to zero."""
    if round(x, 1) == 0:
        x = 0.0
    return f"{x:+.1f}".replace("-", MINUS)


@dataclass(frozen=True)
class SeedDifference:
    """Mean over seeds of the per-seed difference ``a - b`` (points) and its two-sided confidence interval."""

    mean: float
    low: float
    high: float
    sd: float  # sample standard deviation of the per-seed differences (nan for one seed)
    n: int  # seeds

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def __str__(self) -> str:
        if self.n < 2:
            return f"{_signed(self.mean)} (1 seed: no CI)"
        return f"{_signed(self.mean)} [{_signed(self.low)}, {_signed(self.high)}]"


def paired_seed_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> SeedDifference:
    """``a - b`` paired seed by seed (``a[i]`` and ``b[i]`` come from the same seed): the mean difference with the
    Student-t interval ``mean ∓ t((1 + confidence) / 2, n - 1) * sd / sqrt(n)`` over the ``n`` per-seed differences.
    One seed gives an infinite interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_seed_difference: {len(a)} values against {len(b)}; pair them seed by seed")
    if not a:
        raise ValueError("paired_seed_difference: no values")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_seed_difference: confidence must be in (0, 1), got {confidence}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n < 2:
        return SeedDifference(mean, -math.inf, math.inf, math.nan, 1)
    sd = statistics.stdev(diffs)
    half = t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return SeedDifference(mean, mean - half, mean + half, sd, n)


def seeds_for_half_width(sd: float, target: float, confidence: float = CONFIDENCE, limit: int = 1000) -> int | None:
    """The fewest seeds ``n >= 2`` whose paired interval half-width ``t(n - 1) * sd / sqrt(n)`` is at most
    ``target``, for per-seed differences of standard deviation ``sd``; ``None`` beyond ``limit`` seeds."""
    for n in range(2, limit + 1):
        if t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n) <= target:
            return n
    return None


def fine_grained_families(families: Iterable[str]) -> list[str]:
    """The families outside :data:`~emkd.demo.datasets.FAMILY_GROUPS`' "General" group (easy-VQA), in order."""
    return [f for f in families if FAMILY_GROUPS.get(f) != "General"]


def points(result: EvalResult, families: Sequence[str]) -> dict[str, float]:
    """Accuracy in points: each family's, ``fine-grained`` (the mean over :func:`fine_grained_families`) and ``avg``
    (the macro average over every family of ``result``)."""
    missing = [f for f in families if f not in result.accuracy]
    if missing:
        raise ValueError(f"{result.model}: no accuracy for families {missing} (has {sorted(result.accuracy)})")
    out = {f: 100 * result.accuracy[f] for f in families}
    fine = fine_grained_families(families)
    out[FINE_GRAINED] = statistics.fmean(out[f] for f in fine) if fine else math.nan
    out[AVERAGE] = 100 * result.average
    return out


def last_logged(path: str | Path, keys: Iterable[str]) -> dict[str, float]:
    """The last numeric value of each of ``keys`` in a run's ``log.jsonl`` (one JSON object per logging step).

    Keys never logged, and a missing file, give no entry; lines that are not JSON objects (a line cut short by a
    crash) are skipped.
    """
    path = Path(path)
    wanted = set(keys)
    found: dict[str, float] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        for key in wanted & record.keys():
            value = record[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[key] = float(value)
    return found


# ---- what a run measured --------------------------------------------------------------------------------------------
@dataclass
class Reproduction:
    """Everything ``emkd reproduce`` measured; :func:`results_markdown` renders it."""

    command: str  # the command line that reproduces the run
    seeds: tuple[int, ...]
    steps: int  # phase-2 steps per run
    teacher: EvalResult
    scores: dict[str, list[EvalResult]]  # variant key -> one result per seed (students of MAIN_TOKENS tokens)
    budgets: dict[int, dict[str, list[EvalResult]]] = field(default_factory=dict)  # tokens -> BUDGET_ROWS -> per seed
    matching: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # variant key -> per seed MATCH_KEYS
    timings: list[dict[str, Any]] = field(default_factory=list)  # per run: seed, run, kind, train_s, eval_s
    wall_seconds: float = 0.0
    machine: str = ""
    quick: bool = False  # the --quick pipeline check: the numbers mean nothing
    jobs: int = 1  # seeds trained at once, each in its own process
    phase1_seed: int | None = None  # every seed's students start from this seed's phase-1 weights (None: their own)
    figure: Path | None = None  # the token-budget plot
    markdown: str = ""


# ---- markdown -------------------------------------------------------------------------------------------------------
def _families(rep: Reproduction) -> list[str]:
    return sorted(rep.teacher.accuracy)


def _columns(families: list[str]) -> list[str]:
    return [*families, FINE_GRAINED, AVERAGE]


def _per_seed(results: list[EvalResult], families: list[str]) -> dict[str, list[float]]:
    """Column -> one value (points) per seed."""
    rows = [points(r, families) for r in results]
    return {c: [row[c] for row in rows] for c in _columns(families)}


def _mean_std_cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}"


def accuracy_table(rows: dict[str, tuple[str, dict]], scores: dict[str, list[EvalResult]],
                   families: list[str]) -> list[str]:
    """Markdown rows: per variant, mean ± sample std over seeds of every family, the fine-grained average and avg."""
    columns = _columns(families)
    lines = ["| variant | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, (method, loss) in rows.items():
        per_seed = _per_seed(scores[_variant_key(method, loss)], families)
        lines.append(f"| {name} | " + " | ".join(_mean_std_cell(per_seed[c]) for c in columns) + " |")
    return lines


def difference_table(rows: dict[str, tuple[str, dict]], scores: dict[str, list[EvalResult]],
                     families: list[str]) -> list[str]:
    """Markdown rows: per variant, the paired difference to SFT over seeds with its 95 % interval, per column."""
    columns = _columns(families)
    base = _per_seed(scores[_variant_key(*TABLE2[BASELINE])], families)
    lines = ["| variant | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, (method, loss) in rows.items():
        key = _variant_key(method, loss)
        if key == _variant_key(*TABLE2[BASELINE]):
            cells = ["(reference)"] * len(columns)
        else:
            per_seed = _per_seed(scores[key], families)
            cells = [str(paired_seed_difference(per_seed[c], base[c])) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def fine_grained_differences(scores: dict[str, list[EvalResult]], families: list[str]) -> dict[str, SeedDifference]:
    """Every variant of Tables 2 and 3 but SFT (first name of each distinct run) -> its paired difference to SFT on
    the fine-grained average."""
    base_key = _variant_key(*TABLE2[BASELINE])
    base = _per_seed(scores[base_key], families)[FINE_GRAINED]
    out: dict[str, SeedDifference] = {}
    seen = {base_key}
    for name, (method, loss) in {**TABLE2, **TABLE3}.items():
        key = _variant_key(method, loss)
        if key not in seen:
            seen.add(key)
            out[name] = paired_seed_difference(_per_seed(scores[key], families)[FINE_GRAINED], base)
    return out


def resolution_lines(differences: dict[str, SeedDifference], target: float = RESOLUTION_POINTS) -> list[str]:
    """Whether the paired intervals on the fine-grained average are narrow enough to resolve ``target`` points."""
    if not differences:
        return []
    n = next(iter(differences.values())).n
    if n < 2:
        return [f"With one seed there is no interval: whether the testbed resolves a {target:g}-point difference on "
                "the fine-grained average is not known."]
    halves = {name: d.half_width for name, d in differences.items()}
    narrow = [name for name, h in halves.items() if h <= target]
    low, high, median = min(halves.values()), max(halves.values()), statistics.median(halves.values())
    text = (f"Fine-grained average, paired {100 * CONFIDENCE:.0f} % CI half-width over {n} seeds: {low:.1f} to "
            f"{high:.1f} points (median {median:.1f}) across the {len(halves)} variants compared with SFT. ")
    if len(narrow) == len(halves):
        text += (f"The testbed **resolves** a {target:g}-point difference on the fine-grained average: every "
                 f"half-width is ≤ {target:g} points.")
    elif not narrow:
        text += (f"The testbed **does not resolve** a {target:g}-point difference on the fine-grained average: no "
                 f"half-width is ≤ {target:g} points.")
    else:
        text += (f"The testbed resolves a {target:g}-point difference on the fine-grained average **only for "
                 f"{len(narrow)} of {len(halves)} variants** (half-width ≤ {target:g} points: "
                 + ", ".join(narrow) + ").")
    if len(narrow) < len(halves):
        widest = max(differences, key=lambda name: differences[name].sd)
        sd = differences[widest].sd
        needed = seeds_for_half_width(sd, target)
        text += (f" At the largest standard deviation of the per-seed differences ({sd:.1f} points, {widest}), "
                 + (f"{needed} seeds would bring every half-width to {target:g} points or less."
                    if needed is not None else "no practical number of seeds would."))
    return [text]


def _budget_rows(rep: Reproduction, families: list[str]) -> list[str]:
    """Markdown table of the token-budget students and the teacher."""
    lines = [
        "| model | vision tokens | TTFT ms | fine-grained | avg | EM-KD − SFT, fine-grained | EM-KD − SFT, avg |",
        "|" + " --- |" * 7,
    ]
    teacher = points(rep.teacher, families)
    ttft = "—" if rep.teacher.ttft_ms is None else f"{rep.teacher.ttft_ms:.2f}"
    lines.append(f"| teacher | {_tokens(rep.teacher)} | {ttft} | {teacher[FINE_GRAINED]:.1f} | "
                 f"{teacher[AVERAGE]:.1f} | | |")
    for tokens, by_row in rep.budgets.items():
        base = _per_seed(by_row[BASELINE], families)
        for name, results in by_row.items():
            per_seed = _per_seed(results, families)
            times = [r.ttft_ms for r in results if r.ttft_ms is not None]
            ttft = "—" if not times else "{:.2f} ± {:.2f}".format(*mean_std(times))
            diffs = ["", ""] if name == BASELINE else [
                str(paired_seed_difference(per_seed[c], base[c])) for c in (FINE_GRAINED, AVERAGE)]
            lines.append(f"| student, {name} | {_tokens(results[0], tokens)} | {ttft} | "
                         f"{_mean_std_cell(per_seed[FINE_GRAINED])} | {_mean_std_cell(per_seed[AVERAGE])} | "
                         f"{diffs[0]} | {diffs[1]} |")
    return lines


def _tokens(result: EvalResult, expected: int | None = None) -> str:
    measured = result.vision_tokens_per_image
    if measured is None:
        return "—" if expected is None else str(expected)
    return f"{measured:g}"


def budget_series(rep: Reproduction, families: list[str]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The token-budget points for :func:`emkd.demo.report.plot_accuracy_vs_ttft`: per BUDGET_ROWS name, one point
    per budget (mean and std over seeds of TTFT, fine-grained average and avg); and the teacher's point."""
    series: dict[str, list[dict[str, Any]]] = {name: [] for name in BUDGET_ROWS}
    for tokens, by_row in rep.budgets.items():
        for name, results in by_row.items():
            per_seed = _per_seed(results, families)
            times = [r.ttft_ms for r in results if r.ttft_ms is not None]
            series[name].append({
                "label": f"{tokens} tok",
                "ttft": mean_std(times) if times else (None, None),
                FINE_GRAINED: mean_std(per_seed[FINE_GRAINED]),
                AVERAGE: mean_std(per_seed[AVERAGE]),
            })
    teacher = points(rep.teacher, families)
    reference = {"label": "teacher", "ttft": (rep.teacher.ttft_ms, 0.0),
                 FINE_GRAINED: (teacher[FINE_GRAINED], 0.0), AVERAGE: (teacher[AVERAGE], 0.0)}
    return series, reference


def matching_table(rep: Reproduction) -> list[str]:
    """Markdown rows: per matching row (LLaVA-KD* and the EM-KD ablations, one row per distinct run), mean ± std over
    seeds of the last logged ``match_in_window`` and ``match_in_window_random``; ``—`` where no seed logged it."""
    lines = ["| variant | match_in_window | random matching | seeds logged |", "| --- | --- | --- | --- |"]
    seen = set()
    for name, (method, loss) in MATCHING_ROWS.items():
        key = _variant_key(method, loss)
        if key in seen:
            continue
        seen.add(key)
        logged = rep.matching.get(key, [])
        cells = []
        for k in MATCH_KEYS:
            values = [seed[k] for seed in logged if k in seed]
            cells.append("—" if not values else "{:.3f} ± {:.3f}".format(*mean_std(values)))
        count = sum(MATCH_KEYS[0] in seed for seed in logged)
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {count} of {len(rep.seeds)} |")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _timing_text(rep: Reproduction) -> str:
    timed = [t for t in rep.timings if "train_s" in t]  # a reused run without a recorded time is only counted
    phase1 = [t["train_s"] for t in timed if t["kind"] == "phase1"]
    phase2 = [t["train_s"] + t["eval_s"] for t in timed if t["kind"] == "phase2"]
    parts = [f"Wall time: {_duration(rep.wall_seconds)} in total"]
    if phase2:
        parts.append(f"{statistics.fmean(phase2):.0f} s per phase-2 run with its evaluation (mean over "
                     f"{_count(len(phase2), 'run')}, {min(phase2):.0f} to {max(phase2):.0f} s)")
    if phase1:
        parts.append(f"{statistics.fmean(phase1):.0f} s per phase-1 run")
    if rep.jobs > 1:
        parts.append(f"{rep.jobs} seeds trained at once, one process each (per-run times are each process's own)")
    reused = [t for t in rep.timings if t.get("reused")]
    if reused:
        untimed = len(rep.timings) - len(timed)
        parts.append(f"{_count(len(reused), 'run')} finished by an earlier, interrupted invocation of this command "
                     "and reused, so the total covers only what this invocation trained"
                     + (f" ({untimed} of them left no time and are not in the per-run figures)" if untimed else ""))
    return "; ".join(parts) + "."


def results_markdown(rep: Reproduction, figure: str | None = None) -> str:
    """``docs/results.md``: command, machine and wall time; the Table 2 and 3 analogues (mean ± std, paired difference
    to SFT with its interval); whether the testbed resolves a 2-point difference; the token-budget table and plot
    (``figure``: its path relative to the markdown); matching quality; what the run does not show."""
    families = _families(rep)
    fine = fine_grained_families(families)
    teacher = points(rep.teacher, families)
    n = len(rep.seeds)
    seeds = ", ".join(map(str, rep.seeds))
    live = " and ".join(name for name, (m, _) in TABLE2.items()
                        if METHODS[m].needs_teacher and not METHODS[m].supports_teacher_cache) or "none"
    lines = [
        "# Results",
        "",
        f"Command: `{rep.command}`. {_timing_text(rep)} Machine: {rep.machine}.",
        "",
        *(["`--quick` is a pipeline check: every stage ran on a tiny budget, and the students have not learned the "
           "task, so these numbers say nothing about the methods.", ""] if rep.quick else []),
        f"Every student is phase-2 trained for {rep.steps} steps from "
        + ("the phase-1 weights of its seed (the same weights and data order for every variant of a seed)"
           if rep.phase1_seed is None else
           f"one set of phase-1 weights per token budget, trained once with seed {rep.phase1_seed} (the seeds differ "
           "in phase 2's data order alone; every variant of a seed sees the same order)")
        + " against the same teacher, read from `emkd "
        f"cache-teacher` by every distillation method but {live} (a cached teacher gives the live teacher's losses). "
        f"Accuracy (%) on the held-out split ({rep.teacher.num_samples} records), seeds {seeds}. "
        f"Fine-grained: the mean over {', '.join(fine)} (every family but "
        f"{', '.join(f for f in families if f not in fine) or 'none'}); avg: the mean over all families.",
        "",
        f"Teacher ({_tokens(rep.teacher)} vision tokens): "
        + ", ".join(f"{f} {teacher[f]:.1f}" for f in families)
        + f", fine-grained {teacher[FINE_GRAINED]:.1f}, avg {teacher[AVERAGE]:.1f}. "
        f"Students of Tables 2 and 3: {MAIN_TOKENS} vision tokens.",
        "",
    ]
    diff_caption = (f"Paired difference to SFT (points): the mean over seeds of variant − SFT on the same seed "
                    f"[{100 * CONFIDENCE:.0f} % CI, Student t with n − 1 = {n - 1} degrees of freedom].")
    for title, rows in (("Table 2 analogue: distillation methods", TABLE2),
                        ("Table 3 analogue: EM-KD ablations", TABLE3)) if rep.scores else ():
        lines += [
            f"## {title}",
            "",
            f"Accuracy (%), mean ± sample std over {n} seeds.",
            "",
            *accuracy_table(rows, rep.scores, families),
            "",
            diff_caption,
            "",
            *difference_table(rows, rep.scores, families),
            "",
        ]
    if rep.scores:
        lines += ["## Resolution", "", *resolution_lines(fine_grained_differences(rep.scores, families)), ""]
    if rep.budgets:
        lines += [
            "## Token budget: accuracy against time to first token",
            "",
            "Students that pool the teacher's "
            f"{PATCH_GRID} x {PATCH_GRID} patch grid to "
            + ", ".join(f"{pool_size_for(t)} x {pool_size_for(t)} ({t} tokens)" for t in rep.budgets)
            + (f", each with its own phase 1 (one per budget, trained once with seed {rep.phase1_seed})"
               if rep.phase1_seed is not None else ", each with its own phase 1 per seed")
            + " and an SFT and an EM-KD phase 2 from it. TTFT: the median of "
            f"{_count(len(rep.teacher.ttft_samples_ms), 'prefill run')} (batch 1, "
            f"{_count(rep.teacher.ttft_threads, 'thread')}) per model, mean ± std "
            "over seeds; the teacher (every patch token, a larger LLM) is the reference. Last two columns: "
            "EM-KD − SFT paired over seeds [95 % CI].",
            "",
            *_budget_rows(rep, families),
            "",
        ]
        if figure is not None:
            lines += ["![accuracy against time to first token](" + figure + ")", ""]
    lines += [] if not rep.scores else [
        "## Matching quality",
        "",
        "How often the matching pairs a student vision token with a teacher token of its own pooling window "
        "(`emkd.matching.quality`): the last logged `match_in_window` of each run, and `match_in_window_random`, its "
        "expected value under a uniformly random matching; mean ± std over the seeds that logged it, — where no run "
        "did.",
        "",
        *matching_table(rep),
        "",
    ]
    lines += ["## Students that answer a family with a constant", "", *constant_answer_lines(rep), ""]
    lines += [
        "## What this does not show",
        "",
        *(f"- {sentence}" for sentence in NOT_SHOWN),
        "",
    ]
    return "\n".join(lines)


def constant_answer_lines(rep: Reproduction) -> list[str]:
    """Markdown lines naming every student run that gave one answer to every held-out record of a family
    (:meth:`~emkd.evaluation.EvalResult.constant_answers`): a run that stalled or collapsed, whose score on that
    family is the family's prior, not what its method taught."""
    runs: list[tuple[str, int, EvalResult]] = []
    names = {_variant_key(m, loss): name for name, (m, loss) in {**TABLE2, **TABLE3}.items()}
    for key, results in rep.scores.items():
        runs += [(f"{names.get(key, key)}, {MAIN_TOKENS} tokens", seed, r) for seed, r in zip(rep.seeds, results)]
    for tokens, by_row in rep.budgets.items():
        if tokens == MAIN_TOKENS and rep.scores:
            continue  # the same runs as Table 2's
        for row, results in by_row.items():
            runs += [(f"{row}, {tokens} tokens", seed, r) for seed, r in zip(rep.seeds, results)]
    found = [(name, seed, r.constant_answers()) for name, seed, r in runs]
    found = [(name, seed, constant) for name, seed, constant in found if constant]
    if not found:
        return [f"No student run gave one answer to every held-out record of a family ({len(runs)} runs checked)."]
    lines = [
        f"{len(found)} of {len(runs)} student runs gave one and the same answer to every held-out record of at least "
        "one family: they learned the family's prior, not the task, so their score there is chance, whatever their "
        "method. Read their rows above with that in mind.",
        "",
        "| run | seed | families answered with a constant |",
        "| --- | --- | --- |",
    ]
    for name, seed, constant in found:
        lines.append(f"| {name} | {seed} | " + ", ".join(f"{f} (\"{a}\")" for f, a in sorted(constant.items())) + " |")
    return lines


def machine_description() -> str:
    """CPU model and architecture, cores, Python, torch, and the GPU if there is one."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu + ', ' if cpu else ''}{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}, {gpu}")


# ---- the run --------------------------------------------------------------------------------------------------------
@dataclass
class _Runner:
    """What every run of one ``emkd reproduce`` shares: data, teacher, its cache and IRS layer, budget and steps.

    Every model's TTFT is timed on one thread (``ttft_threads=1``), so that other processes on the machine's other
    cores change it less.
    """

    root: Path
    data: dict[str, Path]
    tokenizer: Any
    teacher: Path
    cache: Path
    irs_layer: int
    budget: DemoBudget
    steps: int
    log: Progress
    timings: list[dict[str, Any]]

    def evaluate(self, model: Path) -> EvalResult:
        from emkd.evaluation import evaluate

        return evaluate(model, self.data["test"], images_dir=self.data["images"], limit=self.budget.eval_limit,
                        ttft_runs=self.budget.ttft_runs, ttft_threads=1, batch_size=self.budget.eval_batch_size,
                        progress=False)

    def common(self, seed: int) -> list[str]:
        return [f"data.images={self.data['images']}", f"batch_size={self.budget.batch_size}", f"seed={seed}"]

    def phase1(self, seed: int, tokens: int, directory: Path) -> Path:
        """A student with ``tokens`` vision tokens, the teacher's vision tower, caption-aligned: its final weights."""
        _, init_student = init_models(self.tokenizer, directory, seed, pool_size=pool_size_for(tokens),
                                      tower_seed=TEACHER_SEED)
        recipe = "demo_student_phase1.yaml"
        overrides = [f"student={init_student}", f"data.train={self.data['captions']}",
                     f"output_dir={directory / 'phase1'}", f"max_steps={self.budget.student_phase1_steps}",
                     *self.common(seed)]
        if finished_run(recipe, overrides, directory / "phase1"):
            self.timings.append(_reused_timing(directory / "phase1", {"seed": seed, "run": f"phase1-{tokens}tok",
                                                                      "kind": "phase1"}))
            self.log(f"  phase 1 ({tokens} vision tokens) seed {seed}: (reused: finished in {directory / 'phase1'})")
            return directory / "phase1" / "final"
        start = time.perf_counter()
        summary = run_train(recipe, overrides, self.log)
        seconds = time.perf_counter() - start
        timing = {"seed": seed, "run": f"phase1-{tokens}tok", "kind": "phase1", "train_s": seconds, "eval_s": 0.0}
        (directory / "phase1" / "timing.json").write_text(json.dumps(timing) + "\n")
        self.timings.append(timing)
        self.log(f"  phase 1 ({tokens} vision tokens) seed {seed}: {seconds:.0f} s")
        return Path(summary["final_model"])

    def phase2(self, seed: int, student: Path, out: Path, method: str, loss: dict[str, Any]) -> EvalResult:
        """Train ``method`` from ``student`` into ``out`` and evaluate it; the result is also ``out/eval.json``."""
        cls = METHODS[method]
        overrides = [f"method={method}", f"student={student}", f"teacher={self.teacher}",
                     f"data.train={self.data['train']}", f"output_dir={out}", f"max_steps={self.steps}",
                     # a recipe key of every method; those that derive a loss option from it read it
                     # (Method.run_options: Align-TI's iva_layer), the others ignore it
                     f"irs_layer={self.irs_layer}", *self.common(seed)]
        if cls.needs_teacher and cls.supports_teacher_cache:
            overrides.append(f"teacher_cache={self.cache}")
        overrides += [f"loss.{k}={v}" for k, v in loss.items()]
        reused = self.reuse(seed, out, overrides)
        if reused is not None:
            return reused
        start = time.perf_counter()
        summary = run_train("demo_student_phase2.yaml", overrides, self.log)
        trained = time.perf_counter()
        result = self.evaluate(Path(summary["final_model"]))
        done = time.perf_counter()
        result.write_json(out / "eval.json")
        timing = {"seed": seed, "run": out.name, "kind": "phase2", "train_s": trained - start, "eval_s": done - trained}
        (out / "timing.json").write_text(json.dumps(timing) + "\n")
        self.timings.append(timing)
        self.log(f"  {out.name} seed {seed}: avg {100 * result.average:.1f} ({trained - start:.0f} s training, "
                 f"{done - trained:.0f} s evaluation)")
        return result

    def reuse(self, seed: int, out: Path, overrides: list[str]) -> EvalResult | None:
        """The evaluation of a phase-2 run that an earlier ``emkd reproduce`` finished in ``out`` with exactly these
        overrides (:func:`finished_run`) and evaluated on this held-out split; ``None`` when there is none."""
        try:
            result = EvalResult.from_dict(json.loads((out / "eval.json").read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not finished_run("demo_student_phase2.yaml", overrides, out) or result.counts != _category_counts(
                str(self.data["test"])):
            return None
        self.timings.append(_reused_timing(out, {"seed": seed, "run": out.name, "kind": "phase2"}))
        self.log(f"  {out.name} seed {seed}: avg {100 * result.average:.1f} (reused: finished in {out})")
        return result


@functools.lru_cache(maxsize=None)
def _category_counts(path: str) -> dict[str, int]:
    """Records per category of a data file (what an evaluation of it holds in ``counts``), read once per file."""
    counts: dict[str, int] = {}
    for record in json.loads(Path(path).read_text()):
        counts[record.get("category")] = counts.get(record.get("category"), 0) + 1
    return counts


def _reused_timing(out: Path, timing: dict[str, Any]) -> dict[str, Any]:
    """The timing entry of a reused run, marked ``reused``: with the times its ``timing.json`` recorded when it was
    trained, or without times when it has none (counted, not timed)."""
    try:
        recorded = json.loads((out / "timing.json").read_text())
    except (OSError, ValueError):
        recorded = {}
    return {**timing, **{k: recorded[k] for k in ("train_s", "eval_s") if k in recorded}, "reused": True}


def finished_run(recipe: str, overrides: list[str], out: Path) -> bool:
    """Whether ``out`` holds a finished training run of ``recipe`` with ``overrides``: its ``recipe.json`` is what
    they resolve to now, its ``summary.json`` says it finished uninterrupted, and its final weights are there. What
    lets a rerun of an interrupted ``emkd reproduce`` keep the runs it had finished instead of training them again."""
    from emkd.training.config import load_recipe

    try:
        saved = json.loads((out / "recipe.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = json.loads(json.dumps(dataclasses.asdict(load_recipe(_recipe(recipe), overrides))))
    return (saved == wanted and summary.get("status") == "finished" and not summary.get("interrupted")
            and (out / "final" / "config.json").is_file())


def run_reproduce(root: str | Path = "runs/reproduce", seeds: Sequence[int] = DEFAULT_SEEDS,
                  steps: int = 250, results_md: str | Path | None = DEFAULT_RESULTS,
                  print_fn: Callable[[str], None] = print, quick: bool = False,
                  budgets: Sequence[int] = DEFAULT_BUDGETS, tables: bool = True, jobs: int = 1,
                  phase1_seed: int | None = None) -> Reproduction:
    """Train and evaluate every variant of Tables 2 and 3 for each seed, and SFT / EM-KD students at each token
    budget (vision tokens per image; empty: none); write the markdown to ``results_md`` and the token-budget plot to
    ``figures/token_budget.png`` next to it (under ``root`` when ``results_md`` is ``None``). ``tables=False`` runs
    the token budgets only (the 16-token students then get their own SFT and EM-KD runs). ``jobs > 1`` trains that
    many seeds at once, each in its own process with ``cpu_count // jobs`` torch threads (:func:`_run_seeds`).
    ``phase1_seed``: every seed's students start from one phase 1 per token budget, trained once with that seed, so
    that the seeds differ in phase 2 alone (its data order); ``None`` (default): each seed trains its own phase 1."""
    from emkd.demo.report import plot_accuracy_vs_ttft

    started = time.perf_counter()
    seeds, budgets = tuple(seeds), tuple(sorted(budgets))
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct and at least one, got {list(seeds)}")
    if len(set(budgets)) != len(budgets):
        raise UserError(f"token budgets must be distinct, got {list(budgets)}")
    if not tables and not budgets:
        raise UserError("nothing to run: --no-tables needs token budgets (--budgets 4,16,64)")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    for tokens in budgets:
        pool_size_for(tokens)  # every budget checked before any training
    budget = QUICK if quick else REPRODUCE_BUDGET
    if quick:
        steps = min(steps, QUICK.student_phase2_steps)
    root = Path(root)
    log = Progress(print_fn)
    data = prepare_data(root / "data", budget, 0)
    tokenizer = demo_tokenizer(root / "data", root / "tokenizer")
    teacher = ensure_teacher(root, data, tokenizer, budget, TEACHER_SEED, log)
    runner = _Runner(root, data, tokenizer, teacher, _teacher_cache(teacher, data, root, log),
                     _irs_layer(teacher, data, log, root), budget, steps, log, [])
    teacher_result = runner.evaluate(teacher)
    command = ("emkd reproduce" + (" --quick" if quick else "") + f" --seeds {','.join(map(str, seeds))} --steps "
               f"{steps} " + (f"--budgets {','.join(map(str, budgets))}" if budgets else "--no-budgets")
               + ("" if tables else " --no-tables") + (f" --jobs {jobs}" if jobs > 1 else "")
               + (f" --phase1-seed {phase1_seed}" if phase1_seed is not None else "")
               + (f" --results {Path(results_md).as_posix()}"
                  if results_md is not None and Path(results_md) != Path(DEFAULT_RESULTS) else ""))
    rep = Reproduction(command, seeds, steps, teacher_result, {}, timings=list(runner.timings),
                       machine=machine_description(), quick=quick, jobs=jobs, phase1_seed=phase1_seed)

    variants = {_variant_key(m, l): (m, l) for m, l in list(TABLE2.values()) + list(TABLE3.values())} if tables else {}
    rep.scores = {k: [] for k in variants}
    rep.matching = {k: [] for k in variants}
    side_budgets = [t for t in budgets if t != MAIN_TOKENS or not tables]  # MAIN_TOKENS reuses the Table 2 runs
    side_scores: dict[int, dict[str, list[EvalResult]]] = {t: {name: [] for name in BUDGET_ROWS} for t in side_budgets}
    shared: dict[int, Path] = {}  # token budget -> the phase-1 weights every seed starts from (--phase1-seed)
    if phase1_seed is not None:
        for tokens in ([MAIN_TOKENS] if variants else []) + list(side_budgets):
            shared[tokens] = runner.phase1(phase1_seed, tokens, root / f"phase1-seed{phase1_seed}" / f"tokens{tokens}")
        rep.timings.extend(runner.timings[len(rep.timings):])
    for outcome in _run_seeds(runner, seeds, variants, side_budgets, jobs, shared):
        rep.timings.extend(outcome.timings)
        for key in variants:
            rep.scores[key].append(outcome.scores[key])
            rep.matching[key].append(outcome.matching[key])
        for tokens in side_budgets:
            for name in BUDGET_ROWS:
                side_scores[tokens][name].append(outcome.side[tokens][name])

    for tokens in budgets:
        if tokens == MAIN_TOKENS and tables:
            rep.budgets[tokens] = {name: rep.scores[_variant_key(*TABLE2[name])] for name in BUDGET_ROWS}
        else:
            rep.budgets[tokens] = side_scores[tokens]
    rep.wall_seconds = time.perf_counter() - started
    (root / "timings.json").write_text(json.dumps(rep.timings, indent=2) + "\n")

    families = _families(rep)
    md_dir = Path(results_md).parent if results_md else root
    figure_ref = None
    if rep.budgets:
        series, reference = budget_series(rep, families)
        rep.figure = plot_accuracy_vs_ttft(series, {FINE_GRAINED: "fine-grained average", AVERAGE: "average (all "
                                           "families)"}, md_dir / "figures" / "token_budget.png", reference=reference)
        figure_ref = Path(os.path.relpath(rep.figure, md_dir)).as_posix()
    rep.markdown = results_markdown(rep, figure_ref)
    if results_md:
        Path(results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(results_md).write_text(rep.markdown)
        log(f"wrote {results_md}" + (f" and {rep.figure}" if rep.figure else ""))
    print_fn(rep.markdown)
    return rep


@dataclass
class _SeedOutcome:
    """What one seed's runs measured (returned from a worker process when ``jobs > 1``)."""

    seed: int
    scores: dict[str, EvalResult]  # variant key -> result of the MAIN_TOKENS student
    matching: dict[str, dict[str, float]]  # variant key -> last logged MATCH_KEYS
    side: dict[int, dict[str, EvalResult]]  # other token budget -> BUDGET_ROWS -> result
    timings: list[dict[str, Any]]


def _run_seed(runner: _Runner, seed: int, variants: dict[str, tuple[str, dict[str, Any]]],
              side_budgets: Sequence[int], shared: dict[int, Path] | None = None) -> _SeedOutcome:
    """Every run of one seed: the 16-token phase 1 and the table variants, then each other budget's students.
    ``shared``: token budget -> phase-1 weights to start from instead of the seed's own phase 1."""
    runner = dataclasses.replace(runner, timings=[])
    seed_dir = runner.root / f"seed{seed}"
    outcome = _SeedOutcome(seed, {}, {}, {}, runner.timings)
    shared = shared or {}

    def phase1(tokens: int, directory: Path) -> Path:
        return shared[tokens] if tokens in shared else runner.phase1(seed, tokens, directory)

    p1 = phase1(MAIN_TOKENS, seed_dir) if variants else None
    for key, (method, loss) in variants.items():
        outcome.scores[key] = runner.phase2(seed, p1, seed_dir / key, method, loss)
        outcome.matching[key] = last_logged(seed_dir / key / "log.jsonl", MATCH_KEYS)
    for tokens in side_budgets:
        directory = seed_dir / f"tokens{tokens}"
        p1_budget = phase1(tokens, directory)
        outcome.side[tokens] = {}
        for name in BUDGET_ROWS:
            method, loss = TABLE2[name]
            out = directory / _variant_key(method, loss)
            outcome.side[tokens][name] = runner.phase2(seed, p1_budget, out, method, loss)
    return outcome


#: the thread pools a worker's libraries start (torch's OpenMP, numpy's BLAS, MKL, numba), each sized by these
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def _end_with_parent(parent: int) -> None:
    """Ask Linux to send this process SIGTERM when ``parent`` (the process that started it) ends, so that a killed
    ``emkd reproduce`` leaves no worker training on; if ``parent`` has already ended, end now. Elsewhere nothing: a
    worker then ends when its pool's pipe closes, after its current run."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_setup(threads: int, cores: Any, parent: int) -> None:
    """A worker's start: it ends with ``parent`` (:func:`_end_with_parent`); ``threads`` torch threads, and, where
    the system allows it, its own cores (from the queue ``cores``), so that no pool of one worker spins on the other's
    cores."""
    _end_with_parent(parent)
    torch.set_num_threads(threads)
    own = cores.get()
    if own and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, own)


def _run_seeds(runner: _Runner, seeds: Sequence[int], variants: dict[str, tuple[str, dict[str, Any]]],
               side_budgets: Sequence[int], jobs: int, shared: dict[int, Path] | None = None
               ) -> Iterable[_SeedOutcome]:
    """Each seed's outcome, in seed order. ``jobs > 1``: seeds run in that many spawned processes at once, each with
    ``cores // jobs`` threads in every library's pool, and its own cores where the system allows pinning; their
    progress lines go to standard output as they happen."""
    started = time.perf_counter()
    if jobs == 1:
        for i, seed in enumerate(seeds):
            yield _run_seed(runner, seed, variants, side_budgets, shared)
            left = len(seeds) - i - 1
            _log_seed_done(runner.log, seed, left, (time.perf_counter() - started) / (i + 1) * left)
        return
    import concurrent.futures
    import multiprocessing

    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    threads = max(1, (len(available) or os.cpu_count() or 1) // jobs)
    runner.log(f"{jobs} seeds at a time, {threads} torch thread(s) each")
    worker = dataclasses.replace(runner, log=Progress(functools.partial(print, flush=True)))  # seen as it happens
    context = multiprocessing.get_context("spawn")
    cores = context.Queue()
    for j in range(jobs):  # each worker its own cores when there are enough, else the system places them
        cores.put(set(available[j * threads:(j + 1) * threads]) if len(available) >= jobs * threads else None)
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads) for name in THREAD_VARIABLES})  # read by the workers' libraries at start
    try:
        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_setup,
                                                      initargs=(threads, cores, os.getpid()))
        futures = [pool.submit(_run_seed, worker, seed, variants, side_budgets, shared) for seed in seeds]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with pool:
        for i, future in enumerate(futures):
            outcome = future.result()
            rounds_done = -(-(i + 1) // jobs)  # seeds run in rounds of ``jobs``: the time left is per round
            rounds_left = -(-len(seeds) // jobs) - rounds_done
            per_round = (time.perf_counter() - started) / rounds_done
            _log_seed_done(runner.log, outcome.seed, len(seeds) - i - 1, per_round * rounds_left)
            yield outcome


def _log_seed_done(log: Progress, seed: int, left: int, seconds_left: float) -> None:
    log(f"seed {seed} done; {left} seed(s) to go" + (f", about {_duration(seconds_left)} more" if left else ""))


def _teacher_cache(teacher: Path, data: dict[str, Path], root: Path, log: Progress) -> Path:
    """The teacher's outputs on the training split, computed once for every seed and variant."""
    from emkd.cache import INDEX_FILE, cache_teacher

    cache = root / "teacher-cache"
    if not (cache / INDEX_FILE).is_file():
        log(f"teacher cache: running the teacher once over {data['train'].name} -> {cache}")
        cache_teacher(teacher, data["train"], data["images"], cache, template="chat", max_length=256, batch_size=32,
                      overwrite=cache.exists(), progress=False)
    return cache


def _irs_layer(teacher: Path, data: dict[str, Path], log: Progress, root: Path) -> int:
    """Align-TI's IVA layer: the argmax of the teacher's IRS on 64 training samples."""
    from emkd.data import PairCollator, PairDataset
    from emkd.models import load_teacher
    from emkd.training.irs import compute_irs, write_irs

    adapter = load_teacher(teacher)
    records = json.loads(data["train"].read_text())[:64]
    calib = root / "irs_calibration.json"
    calib.write_text(json.dumps(records))
    pairs = PairDataset(calib, data["images"], adapter.side, adapter.side, template="chat", max_length=None)
    collate = PairCollator(adapter.side, adapter.side)
    batches = [collate([pairs[i] for i in range(j, min(j + 8, len(pairs)))])["teacher"] for j in range(0, len(pairs), 8)]
    result = compute_irs(adapter, batches)
    write_irs(result, root / "irs")
    log(f"IRS per teacher layer: {[round(s, 4) for s in result['scores']]} -> layer {result['best_layer']}")
    return int(result["best_layer"])

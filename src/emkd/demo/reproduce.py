"""``emkd reproduce``: the demo-scale analogue of EM-KD Table 2 (methods) and Table 3 (ablations), over seeds.

Every variant is a phase-2 run of ``recipes/demo_student_phase2.yaml`` from the phase-1 student of its seed, against
the same teacher as ``emkd demo``; every run is evaluated on the held-out split. The tables report, per task family
and on average, the mean ± sample standard deviation over seeds, and are written to ``docs/results.md`` with the
exact command and the machine they came from.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from emkd.demo.pipeline import (
    DemoBudget,
    Progress,
    _copy_tower,
    demo_tokenizer,
    ensure_teacher,
    init_models,
    prepare_data,
    run_train,
)

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


def _variant_key(method: str, loss: dict[str, Any]) -> str:
    return method + "".join(f"-{k}={v}" for k, v in sorted(loss.items()))


def _fmt(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def _table(rows: dict[str, tuple[str, dict]], scores: dict[str, list[Any]], families: list[str]) -> list[str]:
    header = "| variant | " + " | ".join(families) + " | avg |"
    lines = [header, "|" + " --- |" * (len(families) + 2)]
    for name, (method, loss) in rows.items():
        results = scores[_variant_key(method, loss)]
        cells = [_fmt([r.accuracy[f] for r in results]) for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt([r.average for r in results])} |")
    return lines


CACHED_METHODS = ("kd", "rkl", "llava_kd", "emkd")  # read the teacher from `emkd cache-teacher`; Align-TI cannot


def run_reproduce(root: str | Path = "runs/reproduce", seeds: tuple[int, ...] = (0, 1, 2),
                  steps: int = 250, results_md: str | Path | None = "docs/results.md",
                  print_fn: Callable[[str], None] = print, quick: bool = False) -> dict[str, Any]:
    """Train and evaluate every variant of Tables 2 and 3 for each seed; write the tables."""
    from emkd.evaluation import evaluate

    started = time.time()
    budget = DemoBudget()
    if quick:
        from emkd.demo.pipeline import QUICK

        budget = QUICK
        steps = min(steps, QUICK.student_phase2_steps)
    root = Path(root)
    log = Progress(print_fn)
    data = prepare_data(root / "data", budget, 0)
    tokenizer = demo_tokenizer(root / "data", root / "tokenizer")
    teacher = ensure_teacher(root, data, tokenizer, budget, 0, log)

    variants = {_variant_key(m, l): (m, l) for m, l in list(TABLE2.values()) + list(TABLE3.values())}
    scores: dict[str, list[Any]] = {k: [] for k in variants}
    irs_layer = _irs_layer(teacher, data, log, root)
    cache = _teacher_cache(teacher, data, root, log)
    for seed in seeds:
        _, init_student = init_models(tokenizer, root / f"seed{seed}", seed)
        _copy_tower(teacher, init_student, tokenizer)
        common = [f"data.images={data['images']}", f"batch_size={budget.batch_size}", f"seed={seed}"]
        p1 = run_train("demo_student_phase1.yaml", [f"student={init_student}", f"data.train={data['captions']}",
                       f"output_dir={root / f'seed{seed}' / 'phase1'}", f"max_steps={budget.student_phase1_steps}",
                       *common], log)
        for key, (method, loss) in variants.items():
            out = root / f"seed{seed}" / key
            overrides = [f"method={method}", f"student={p1['final_model']}", f"teacher={teacher}",
                         f"data.train={data['train']}", f"output_dir={out}", f"max_steps={steps}", *common]
            overrides += [f"loss.{k}={v}" for k, v in loss.items()]
            if method == "align_ti":
                overrides.append(f"irs_layer={irs_layer}")
            if method in CACHED_METHODS:
                overrides.append(f"teacher_cache={cache}")
            summary = run_train("demo_student_phase2.yaml", overrides, log)
            result = evaluate(summary["final_model"], data["test"], images_dir=data["images"], ttft_runs=3,
                              batch_size=budget.eval_batch_size, progress=False)
            log(f"  {key} seed {seed}: avg {100 * result.average:.1f}")
            scores[key].append(result)
            (out / "eval.json").write_text(json.dumps(result.to_dict(), indent=2))
    teacher_result = evaluate(teacher, data["test"], images_dir=data["images"], ttft_runs=3,
                              batch_size=budget.eval_batch_size, progress=False)
    families = sorted(teacher_result.accuracy)
    minutes = (time.time() - started) / 60
    command = "emkd reproduce" + (" --quick" if quick else "") + f" --seeds {','.join(map(str, seeds))} --steps {steps}"
    lines = [
        "# Results",
        "",
        f"Command: `{command}` ({minutes:.0f} minutes). Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU. Each cell: accuracy (%) on the held-out "
        f"split, mean ± sample std over seeds {', '.join(map(str, seeds))}; every student is phase-2 trained for "
        f"{steps} steps from the phase-1 weights of its seed against the same teacher (read from `emkd cache-teacher` "
        "by every method but SFT and Align-TI; a cached teacher gives the live teacher's losses).",
        "",
        "Teacher (64 vision tokens): " + ", ".join(f"{f} {100 * teacher_result.accuracy[f]:.1f}" for f in families)
        + f", avg {100 * teacher_result.average:.1f}. Students: 16 vision tokens.",
        "",
        "## Table 2 analogue: distillation methods",
        "",
        *_table(TABLE2, scores, families),
        "",
        "## Table 3 analogue: EM-KD ablations",
        "",
        *_table(TABLE3, scores, families),
        "",
    ]
    if results_md:
        Path(results_md).parent.mkdir(parents=True, exist_ok=True)
        Path(results_md).write_text("\n".join(lines))
        log(f"wrote {results_md}")
    print_fn("\n".join(lines))
    return {"scores": scores, "teacher": teacher_result, "markdown": "\n".join(lines)}


def _teacher_cache(teacher: Path, data: dict[str, Path], root: Path, log: Progress) -> Path:
    """The teacher's outputs on the training split, computed once for every seed and variant."""
    from emkd.training.teacher_cache import INDEX_FILE, cache_teacher

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

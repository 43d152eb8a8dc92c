"""``emkd demo``: distill a tiny efficient MLLM on real data on this machine and print the paper's comparison.

The run, top to bottom (every training step goes through ``emkd train``'s code and the recipes in ``recipes/``):

1. data: easy-VQA (real VQA, 64 x 64 px) plus a fine-grained suite where pooling vision tokens overlays the asked
   object with its neighbours, unless the student's tower learns to keep it apart (:mod:`emkd.demo.datasets`),
   written as LLaVA JSON;
2. teacher: a vanilla MLLM of the project's own class that keeps all 64 patch tokens and has the larger LLM, trained
   by ``recipes/demo_teacher_phase1.yaml`` + ``demo_teacher_phase2.yaml`` (caption alignment, then SFT); the
   checkpoint is cached in ``runs/demo/teacher`` (or shipped in ``emkd/demo/assets/teacher``) and reused;
3. student: the efficient model, 2 x 2 average pooling (16 tokens per image, 4x fewer) and a smaller LLM, with the
   vision tower the teacher started from (not the teacher's trained one); phase 1 (``demo_student_phase1.yaml``)
   aligns it on captions, tower included (the small pretraining a SigLIP tower brings in the papers' setting);
4. phase 2 from the same phase-1 weights and seed, once per method (``sft`` and ``emkd`` by default), the whole
   student trained, tower included (``demo_student_phase2.yaml``);
5. ``emkd eval`` of the teacher and every student on the held-out split: accuracy per task family, TTFT, vision
   tokens per image; a table on the console, ``runs/demo/results.json`` and ``runs/demo/report.md`` with plots.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO_RECIPES = Path(__file__).resolve().parents[3] / "recipes"
ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass
class DemoBudget:
    """Sizes of one demo run (the defaults take about 4 minutes on 2 idle CPU cores; ``QUICK`` under one)."""

    easy_vqa_train: int = 4000
    easy_vqa_test: int = 300
    per_family_train: int = 2000
    per_family_test: int = 250
    teacher_phase1_steps: int = 300
    teacher_phase2_steps: int = 1500
    student_phase1_steps: int = 200
    student_phase2_steps: int = 400
    batch_size: int = 32
    eval_limit: int | None = None
    ttft_runs: int = 10
    eval_batch_size: int = 64  # prompts per generate call: 1,300 records in 7 s at 64, 13 s at 16 (1 thread)


QUICK = DemoBudget(
    easy_vqa_train=200, easy_vqa_test=40, per_family_train=60, per_family_test=12,
    teacher_phase1_steps=10, teacher_phase2_steps=30, student_phase1_steps=6, student_phase2_steps=12,
    batch_size=16, eval_limit=None, ttft_runs=3,
)

# The two models. Both see 64 x 64 images through the same 1-layer SigLIP tower with 8 px patches (8 x 8 = 64
# patch tokens); the teacher keeps all of them, the student average-pools the grid to 4 x 4 = 16.
VISION = dict(image_size=64, patch_size=8, vision_hidden=64, vision_layers=1, vision_feature_layer=-1)
TEACHER = dict(compressor="none", text_hidden=128, layers=4, heads=4, kv_heads=2)
TEACHER_SEED = 0  # the demo's teacher (shipped in assets/teacher) is trained from this seed's initial weights
STUDENT = dict(compressor="pool", pool_size=4, text_hidden=128, layers=2, heads=4, kv_heads=2)


def _recipe(name: str) -> Path:
    path = REPO_RECIPES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `emkd demo` runs from a clone of the repository (recipes/)")
    return path


class Progress:
    """Prints what the demo is doing, with the time since it started."""

    def __init__(self, print_fn: Callable[[str], None] = print) -> None:
        self.start = time.perf_counter()
        self.print = print_fn

    def __call__(self, message: str) -> None:
        self.print(f"[{time.perf_counter() - self.start:6.1f}s] {message}")


def demo_tokenizer(data_dir: Path, out_dir: Path, use_shipped: bool = True):
    """The shipped teacher's tokenizer when there is one; else a byte-level BPE over the demo's questions, answers
    and captions, built once and cached in ``out_dir``."""
    from transformers import AutoTokenizer

    from emkd.models import build_tokenizer

    if use_shipped and (ASSETS / "teacher" / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(ASSETS / "teacher")
    if (out_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(out_dir)
    corpus = []
    for name in ("train.json", "captions.json"):
        for record in json.loads((data_dir / name).read_text()):
            corpus.extend(turn["value"].replace("<image>", "") for turn in record["conversations"])
    tokenizer = build_tokenizer(corpus, vocab_size=600)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_model(model, tokenizer, directory: Path) -> Path:
    from emkd.models.tiny import tiny_image_processor

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tiny_image_processor(model.config.tile_size).save_pretrained(directory)
    return directory


def init_models(tokenizer, root: Path, seed: int, pool_size: int | None = None,
                tower_seed: int | None = None) -> tuple[Path, Path]:
    """Random-initialised teacher and student; the student gets the teacher's *initial* vision tower.

    Student and teacher start from the same tower, as EM-KD's start from the same SigLIP; the teacher's tower is then
    trained with the teacher, and the student never sees that trained tower: in its phase 2 its own tower has to
    learn to carry the fine detail through the pooling.

    ``pool_size``: side of the student's pooled token grid (``pool_size**2`` vision tokens per image, at most the
    teacher's 8 x 8); ``None`` keeps ``STUDENT``'s. The student's other weights do not depend on it.
    ``tower_seed``: the seed of the teacher whose initial tower the student takes (default ``seed``); the demo and
    ``emkd reproduce`` pass :data:`TEACHER_SEED`, the seed the demo's teacher was trained from.
    """
    from emkd.models.tiny import build_tiny_student

    student_config = STUDENT if pool_size is None else {**STUDENT, "pool_size": pool_size}
    teacher = build_tiny_student(tokenizer, seed=seed, **VISION, **TEACHER)
    student = build_tiny_student(tokenizer, seed=seed + 1, **VISION, **student_config)
    tower_from = teacher if tower_seed in (None, seed) else build_tiny_student(tokenizer, seed=tower_seed, **VISION,
                                                                               **TEACHER)
    student.vision_tower.load_state_dict(tower_from.vision_tower.state_dict())
    return save_model(teacher, tokenizer, root / "init_teacher"), save_model(student, tokenizer, root / "init_student")


def run_train(recipe: str, overrides: list[str], log: Progress) -> dict[str, Any]:
    from emkd.training.config import load_recipe
    from emkd.training.run import train

    config = load_recipe(_recipe(recipe), overrides)
    log(f"train {recipe}: method={config.method} stage={config.stage} steps={config.max_steps} -> {config.output_dir}")
    summary = train(config, overwrite=True)  # the demo owns runs/demo and reruns into it
    log(f"  done: {summary['global_step']} steps, mean loss {summary['train_loss']:.4f}")
    return summary


def ensure_teacher(root: Path, data: dict[str, Path], tokenizer, budget: DemoBudget, seed: int, log: Progress,
                   retrain: bool = False) -> Path:
    """The trained teacher: shipped assets, else a cached run, else train it now (phase 1 + phase 2 SFT)."""
    cached = root / "teacher" / "phase2" / "final"
    if not retrain:
        for candidate in (ASSETS / "teacher", cached):
            if (candidate / "config.json").is_file() and _same_tokenizer(candidate, tokenizer):
                log(f"teacher: using the trained checkpoint in {candidate}")
                return candidate
    init_teacher, _ = init_models(tokenizer, root / "teacher", seed)
    common = [f"data.images={data['images']}", f"batch_size={budget.batch_size}", f"seed={seed}"]
    p1 = run_train("demo_teacher_phase1.yaml", [f"student={init_teacher}", f"data.train={data['captions']}",
                   f"output_dir={root / 'teacher' / 'phase1'}", f"max_steps={budget.teacher_phase1_steps}", *common], log)
    run_train("demo_teacher_phase2.yaml", [f"student={p1['final_model']}", f"data.train={data['train']}",
              f"output_dir={root / 'teacher' / 'phase2'}", f"max_steps={budget.teacher_phase2_steps}", *common], log)
    return cached


def _same_tokenizer(directory: Path, tokenizer) -> bool:
    from transformers import AutoTokenizer

    try:
        other = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        return False
    return other.get_vocab() == tokenizer.get_vocab()


def prepare_data(data_dir: Path, budget: DemoBudget, seed: int) -> dict[str, Path]:
    """Build (or reuse) the demo data in ``data_dir``; return the paths of its splits and images."""
    from emkd.demo.datasets import build_demo_data

    build_demo_data(data_dir, seed=seed, easy_vqa_train=budget.easy_vqa_train, easy_vqa_test=budget.easy_vqa_test,
                    per_family_train=budget.per_family_train, per_family_test=budget.per_family_test)
    return {"train": data_dir / "train.json", "test": data_dir / "test.json",
            "captions": data_dir / "captions.json", "images": data_dir / "images"}


def run_demo(root: str | Path = "runs/demo", quick: bool = False, seed: int = 0,
             methods: tuple[str, ...] = ("sft", "emkd"), retrain_teacher: bool = False,
             print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; return the evaluation results by model name."""
    from emkd.evaluation import evaluate, format_table

    torch.set_num_threads(max(1, torch.get_num_threads()))
    budget = QUICK if quick else DemoBudget()
    root = Path(root)
    log = Progress(print_fn)
    log(f"emkd demo ({'quick' if quick else 'full'}): teacher with 64 vision tokens, student with 16, in {root}")

    log("data: easy-VQA and the fine-grained suite (cached after the first run)")
    data = prepare_data(root / "data", budget, seed)
    tokenizer = demo_tokenizer(root / "data", root / "tokenizer", use_shipped=not retrain_teacher)

    teacher_dir = ensure_teacher(root, data, tokenizer, budget, TEACHER_SEED, log, retrain=retrain_teacher)
    _, init_student = init_models(tokenizer, root / "student", seed, tower_seed=TEACHER_SEED)

    common = [f"data.images={data['images']}", f"batch_size={budget.batch_size}", f"seed={seed}"]
    p1 = run_train("demo_student_phase1.yaml", [f"student={init_student}", f"data.train={data['captions']}",
                   f"output_dir={root / 'student' / 'phase1'}", f"max_steps={budget.student_phase1_steps}", *common], log)
    finals = {}
    for method in methods:
        summary = run_train("demo_student_phase2.yaml", [
            f"method={method}", f"student={p1['final_model']}", f"teacher={teacher_dir}", f"data.train={data['train']}",
            f"output_dir={root / 'student' / method}", f"max_steps={budget.student_phase2_steps}", *common], log)
        finals[method] = Path(summary["final_model"])

    results = {}
    for name, path in [("teacher", teacher_dir), *[(f"student-{m}", p) for m, p in finals.items()]]:
        log(f"eval {name} on {data['test'].name}")
        results[name] = evaluate(path, data["test"], images_dir=data["images"], limit=budget.eval_limit,
                                 ttft_runs=budget.ttft_runs, batch_size=budget.eval_batch_size, progress=True)
    table = format_table(list(results.values()), list(results))
    print_fn("\n" + table + "\n\n" + what_it_shows(results, budget, quick) + "\n")
    (root / "results.json").write_text(json.dumps({k: _as_dict(v) for k, v in results.items()}, indent=2))
    report = write_report(root, data, teacher_dir, finals, results, table, tokenizer, quick)
    log(f"report: {report}")
    return results


def what_it_shows(results: dict[str, Any], budget: DemoBudget, quick: bool) -> str:
    """The sentences printed under the demo's table: what the numbers show, and what they do not."""
    from emkd.evaluation import paired_difference

    n = next(iter(results.values())).num_samples
    if quick:
        return (
            f"What this shows: `--quick` is a pipeline check. Every stage ran (data, teacher, student phase 1, phase 2 "
            f"per method, evaluation, report), but on a tiny budget ({budget.student_phase1_steps} phase-1 and "
            f"{budget.student_phase2_steps} phase-2 steps, {n} held-out records): the students have not learned the "
            f"task, so their scores say nothing about the methods, and the teacher's are those of a checkpoint "
            f"trained in full, on a sample too small to compare. Run `emkd demo` (about 4 minutes) for the "
            f"comparison, and `emkd reproduce` for one over seeds."
        )
    lines = [f"What this shows: one seed, {budget.student_phase2_steps} phase-2 steps per student, {n} held-out "
             "records. Paired differences of micro accuracy (same records; the interval covers the choice of records, "
             "not the seed -- `emkd reproduce` measures that):"]
    names = [k for k in results if k.startswith("student-")]
    base = "student-sft" if "student-sft" in results else None
    for name in names:
        if base is not None and name != base:
            lines.append(f"  {name} - {base}: {paired_difference(results[name], results[base])}")
    if "teacher" in results:
        for name in names:
            lines.append(f"  teacher - {name}: {paired_difference(results['teacher'], results[name])}")
    return "\n".join(lines)


def _as_dict(result) -> dict[str, Any]:
    out = dataclasses.asdict(result)
    out.pop("predictions", None)
    return out


VOCABULARY_IMAGES = 64  # held-out images the report's vision-vocabulary sentence is measured on


@torch.no_grad()
def _vision_logits(student, teacher, records: Path, images: Path, batch_size: int = 16
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every record's student and teacher vision logits ``[N, V]`` (one entry per record with an image)."""
    from emkd.data import PairCollator, PairDataset

    pairs = PairDataset(records, images, student.side, teacher.side, template="chat", max_length=None)
    collate = PairCollator(student.side, teacher.side)
    out_s: list[torch.Tensor] = []
    out_t: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        batch = collate([pairs[i] for i in range(start, min(start + batch_size, len(pairs)))])
        s, t = student(batch["student"]).inputs, teacher(batch["teacher"]).inputs
        for b in range(s.batch_size):
            out_s.append(s.logits(s.vision_tokens(b)))
            out_t.append(t.logits(t.vision_tokens(b)))
    return out_s, out_t


def write_report(root: Path, data: dict[str, Path], teacher_dir: Path, finals: dict[str, Path],
                 results: dict[str, Any], table: str, tokenizer, quick: bool) -> Path:
    """``report.md`` with the table, loss curves, the matching over an image and the decoded vision tokens."""
    from PIL import Image

    from emkd.data import PairCollator, PairDataset
    from emkd.demo.report import (
        VisionVocabulary,
        decode_vision_tokens,
        plot_decoded_tokens,
        plot_loss_curves,
        plot_match_quality,
        plot_matching,
        runs_with_matches,
        vision_views,
        vision_vocabulary,
    )
    from emkd.models import EfficientMLLMAdapter, load_student, load_teacher

    figures = root / "figures"
    runs = {m: root / "student" / m / "log.jsonl" for m in finals}
    plot_loss_curves(runs, figures / "loss_curves.png")
    matched = runs_with_matches(runs)  # the runs whose method paired vision tokens
    match_figure = plot_match_quality(runs, figures / "match_quality.png") if matched else None
    shown = matched[0] if matched else next(iter(finals))  # whose student the matching picture draws

    teacher = load_teacher(teacher_dir)
    records = json.loads(data["test"].read_text())
    pick = next(i for i, r in enumerate(records) if r.get("category") not in (None, "general")) if len(records) else 0
    one = root / "figures" / "sample.json"
    one.write_text(json.dumps([records[pick]]))
    panels: dict[str, list[str]] = {}
    image = None
    with_images = [r for r in records if r.get("image")][:VOCABULARY_IMAGES]
    many = root / "figures" / "vocabulary_sample.json"
    many.write_text(json.dumps(with_images))
    vocabulary: dict[str, VisionVocabulary] = {}
    for method, path in finals.items():
        model, side = load_student(path)
        student = EfficientMLLMAdapter(model, side)
        if with_images:
            student_logits, teacher_logits = _vision_logits(student, teacher, many, data["images"])
            vocabulary.setdefault("teacher", vision_vocabulary(teacher_logits, tokenizer))
            vocabulary[f"student ({method})"] = vision_vocabulary(student_logits, tokenizer)
        pair = PairDataset(one, data["images"], side, teacher.side, template="chat", max_length=None)
        batch = PairCollator(side, teacher.side)([pair[0]])
        views = vision_views(student, teacher, batch)
        if image is None:
            image = np.asarray(Image.open(data["images"] / records[pick]["image"]).convert("RGB"))
            panels["teacher"] = decode_vision_tokens(views["teacher_logits"], tokenizer)
        panels[f"student ({method})"] = decode_vision_tokens(views["student_logits"], tokenizer)
        if method == shown:
            idx_s, idx_t = views["matches"]
            plot_matching(image, idx_s, idx_t, views["n_student"], views["n_teacher"], figures / "matching.png",
                          title=f"EM-KD matching, {records[pick].get('category', '')} sample")
    plot_decoded_tokens(image, panels, figures / "decoded_tokens.png")

    question = records[pick]["conversations"][0]["value"].replace("<image>", "").strip()
    lines = [
        "# emkd demo report",
        "",
        f"Run: `emkd demo{' --quick' if quick else ''}`. Teacher: {teacher_dir} (64 vision tokens per image, LLM hidden "
        f"{TEACHER['text_hidden']} x {TEACHER['layers']} layers). Students: 16 vision tokens per image (2 x 2 pooling), "
        f"LLM hidden {STUDENT['text_hidden']} x {STUDENT['layers']} layers, phase 2 with "
        + ", ".join(f"`{m}`" for m in finals) + " from the same phase-1 weights and seed.",
        "",
        "## Held-out accuracy, time to first token, vision tokens",
        "",
        "```",
        table,
        "```",
        "",
        what_it_shows(results, QUICK if quick else DemoBudget(), quick),
        "",
        "## Loss curves (phase 2)",
        "",
        "![loss curves](figures/loss_curves.png)",
        "",
        f"## Hungarian matching over a test image (question: \"{question}\")",
        "",
        "Each large dot is a student vision token (4 x 4 grid); its line ends at the teacher token (8 x 8 grid) that "
        "matching on the Manhattan distance of vision logits paired it with.",
        "",
        "![matching](figures/matching.png)",
        "",
        *([
            "## Does the matching match?",
            "",
            "The fraction of matched pairs whose teacher token lies inside the student token's 2 x 2 pooling window, "
            "over training (logged as `match_in_window`), against what a random one-to-one matching gives "
            "(dashed, 1/16).",
            "",
            "![match quality](figures/match_quality.png)",
            "",
        ] if match_figure is not None else []),
        "## Vision tokens decoded to their top vocabulary word (EM-KD Figure 2)",
        "",
        "![decoded vision tokens](figures/decoded_tokens.png)",
        "",
        *([f"Over the first {len(with_images)} held-out images:", "",
           *(f"- {v.sentence(name)}" for name, v in vocabulary.items()), "",
           "No model here is trained with a loss at image positions, so a vision token's top word is what the "
           "image as a whole leans to (an answer word such as a colour or a number, or a frequent word), not what "
           "its patch shows: the SFT student, which no teacher pulls, does the same. VSD pulls the student's "
           "vision logits, and so its words, towards the teacher's matched tokens.", ""]
          if vocabulary else []),
    ]
    path = root / "report.md"
    path.write_text("\n".join(lines))
    return path

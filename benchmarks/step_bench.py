"""Cost of one training step per method at the demo's scale, measured side by side.

    python benchmarks/step_bench.py                  # 20 timed steps per method after 3 warm-up steps
    python benchmarks/step_bench.py --steps 40 --methods sft emkd kd align_ti llava_kd rkl
    python benchmarks/step_bench.py --methods sft emkd emkd+cache kd+cache    # teacher read from `emkd cache-teacher`

Everything is the demo's (``emkd.demo.pipeline``): the shipped teacher (64 vision tokens, LLM 128 x 4), a freshly
initialised student (2 x 2 pooling to 16 tokens, LLM 128 x 2), batches of 32 records of the demo data (easy-VQA and
the fine-grained suite, chat template), ``recipes/demo_student_phase2.yaml``. One step = ``Trainer.training_step``
(every model forward, the loss, backward) + the optimizer step. The methods take turns step by step, on the same
batches, so machine load falls on all of them alike; the median step time of each is reported, with the ratios the
EM-KD and Align-TI papers discuss (EM-KD / SFT, Align-TI / vanilla KD), each with a 95 % bootstrap interval over the
timed steps (a step is resampled with every method's time on it, since they ran on the same batch, back to back).
The interval covers step-to-step noise within this run only, not a machine that is busier or quieter for a whole run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(methods: list[str], work: Path, batch_size: int, implementation: str):
    from emkd.demo.pipeline import ASSETS, QUICK, STUDENT, VISION, demo_tokenizer, prepare_data, save_model
    from emkd.models import load_student
    from emkd.models.tiny import build_tiny_student
    from emkd.training.config import load_recipe
    from emkd.training.run import build_trainer

    data = prepare_data(work / "data", QUICK, seed=0)
    tokenizer = demo_tokenizer(work / "data", work / "tokenizer")
    teacher_dir = ASSETS / "teacher"
    student = build_tiny_student(tokenizer, seed=1, **VISION, **STUDENT)
    teacher, _ = load_student(teacher_dir)
    student.vision_tower.load_state_dict(teacher.vision_tower.state_dict())
    student_dir = save_model(student, tokenizer, work / "student")

    cache = None
    if any(m.endswith("+cache") for m in methods):
        from emkd.cache import cache_teacher

        cache = work / "teacher-cache"
        cache_teacher(teacher_dir, data["train"], data["images"], cache, max_length=256, batch_size=16, progress=False)

    trainers = {}
    for name in methods:
        method = name.removesuffix("+cache")
        overrides = [f"method={method}", f"student={student_dir}", f"teacher={teacher_dir}",
                     f"data.train={data['train']}", f"data.images={data['images']}", f"output_dir={work / name}",
                     f"batch_size={batch_size}", "max_steps=1000", "seed=0"]
        if method == "align_ti":
            overrides.append("irs_layer=-1")
        if implementation != "fused" or method != "sft":
            overrides.append(f"loss.implementation={implementation}")
        if name.endswith("+cache"):
            overrides.append(f"teacher_cache={cache}")
        trainer = build_trainer(load_recipe(REPO / "recipes" / "demo_student_phase2.yaml", overrides))
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which this one replaces
        trainers[name] = trainer
    # a loader that renders the teacher's side and carries dataset indices serves every method
    richest = sorted(trainers, key=lambda n: (trainers[n].teacher_adapter is not None, n.endswith("+cache")))[-1]
    loader = trainers[richest].get_train_dataloader()
    return trainers, loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["sft", "emkd", "kd", "align_ti"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--implementation", choices=("fused", "naive"), default="fused")
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trainers, loader = build(args.methods, Path(tmp), args.batch_size, args.implementation)
        batches = iter(loader)
        times: dict[str, list[float]] = {m: [] for m in args.methods}
        for step in range(args.warmup + args.steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            for method, trainer in trainers.items():
                start = time.perf_counter()
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()
                if step >= args.warmup:
                    times[method].append(time.perf_counter() - start)
            print(f"step {step + 1}/{args.warmup + args.steps}" + ("" if step >= args.warmup else " (warm-up)"),
                  flush=True)

    median = {m: statistics.median(t) for m, t in times.items()}
    print(f"\nmedian step time, batch {args.batch_size}, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, losses {args.implementation}:")
    for method, value in median.items():
        print(f"  {method:9s} {value * 1000:8.1f} ms")
    ratios, intervals = {}, {}
    for num, den in (("emkd", "sft"), ("align_ti", "kd"), ("kd", "sft"), ("llava_kd", "sft"), ("emkd", "kd"),
                     ("emkd+cache", "sft"), ("kd+cache", "sft")):
        if num in median and den in median:
            key = f"{num}/{den}"
            ratios[key] = median[num] / median[den]
            intervals[key] = ratio_interval(times[num], times[den])
            low, high = intervals[key]
            print(f"  {num} / {den}: {ratios[key]:.2f}x  [95 % bootstrap interval {low:.2f}, {high:.2f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"median_s": median, "ratios": ratios, "ratio_intervals_95": intervals, "times_s": times}, indent=2))


def ratio_interval(num: list[float], den: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``median(num) / median(den)``, resampling whole steps: step ``i`` of
    both methods ran on the same batch, one right after the other, so a step is drawn with both of its times."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.tensor(num), torch.tensor(den)
    picks = torch.randint(0, len(a), (draws, len(a)), generator=generator)  # (draws, steps)
    ratio = a[picks].median(dim=1).values / b[picks].median(dim=1).values  # (draws,)
    return float(ratio.quantile(0.025)), float(ratio.quantile(0.975))


if __name__ == "__main__":
    main()

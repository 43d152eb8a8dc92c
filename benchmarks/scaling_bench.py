"""How the fused EM-KD loss scales: time and memory against Nt, V and B, with a least-squares line per axis.

    python benchmarks/scaling_bench.py                 # full run: 8.7 min on 2 shared cores (docs §7)
    python benchmarks/scaling_bench.py --quick         # small vocabularies, about 2 minutes
    python benchmarks/scaling_bench.py --l1 cdist --vocab-values 0 --batch-values 0 --runs 3   # the loss before numba
    python benchmarks/scaling_bench.py --nt-values 144 576 1024 --vocab-values 0 --batch-values 0   # Nt axis only

Inputs are ``benchmarks/loss_bench.py``'s (its ``build_inputs``: random float32 hidden states and heads, Ds = Dt =
896, per sample Ns = 144 student vision tokens and 128 text tokens of which the last 64 are response; the student's
hidden states and head require grad). One run = forward + backward of ``EMKDLoss()`` (defaults: fused path, paper
hyperparameters, ``hungarian_logits`` matching, the L1 backend ``auto``: numba when installed; ``--l1 cdist`` hides
numba as ``benchmarks/l1_bench.py`` does, for the loss as it was before the kernel).

Three axes, each varied with the other two at the base point (``--base-nt``, ``--base-vocab``, ``--base-batch``):

* Nt, the teacher's vision tokens per sample (``--nt-values``; default 144, 324, 576, 729, 1024);
* V, the vocabulary of both heads (``--vocab-values``; default 16,384, 32,768, 65,536, 151,936; ``--quick``:
  4,096, 8,192, 16,384);
* B, the batch (``--batch-values``; default 1, 2, 4).

The base point is Nt = 729, B = 2 and V = 32,768 (``--quick``: 8,192): the paper's V = 151,936 costs about 6 s per
run here (far more while the machine is busy), too much for every point of the Nt and B axes; it is the V axis's last
point.

Every point (the base point once, shared by the three axes) runs in its own process per round (``--runs``: 5, quick
3), as in ``loss_bench.py``: a tiny warm-up call, then ``--inner`` (2) timed forward + backward runs, each on freshly
built inputs. The points take turns in each round (the order rotates from round to round) so that machine load falls
on all of them alike. Memory is
``loss_bench.py``'s: peak resident set size minus the resident size once the inputs exist, with
``MALLOC_MMAP_THRESHOLD_=131072``, from each process's first run; reported with and without the gradient buffers
autograd returns (student hidden and head weight; the head's gradient alone is V x D x 4 bytes).

Reported: per point the median time and the single runs, the median memory added; per axis ordinary least-squares
lines ``time = a + b * x`` with the standard errors of a and b and R^2: through the per-point medians (the
headline: the shared machine's load bursts make single runs up to 10 x slower now and then, and a line through every run
follows them) and through every run; and the line for the memory added without gradient buffers. ``--json`` writes
everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_bench import MALLOC_ENV, build_inputs, peak_rss_bytes, rss_bytes  # noqa: E402  (benchmarks/ is no package)

AXES = ("nt", "vocab", "batch")
AXIS_LABEL = {"nt": "Nt", "vocab": "V", "batch": "B"}
FULL = {"nt": [144, 324, 576, 729, 1024], "vocab": [16_384, 32_768, 65_536, 151_936], "batch": [1, 2, 4],
        "base": {"nt": 729, "vocab": 32_768, "batch": 2}, "runs": 5}
QUICK = {"nt": [144, 324, 576, 729, 1024], "vocab": [4_096, 8_192, 16_384], "batch": [1, 2, 4],
         "base": {"nt": 729, "vocab": 8_192, "batch": 2}, "runs": 3}


def worker(args: argparse.Namespace) -> None:
    from emkd import EMKDLoss

    if args.l1 == "cdist":  # the L1 matching cost as before the numba kernel: `auto` falls back to cdist
        from l1_bench import numba_hidden

        hidden = numba_hidden()
        hidden.__enter__()  # (kept referenced: a collected generator would run its `finally` and restore numba)
    torch.manual_seed(args.seed)
    loss_fn = EMKDLoss()
    # as loss_bench.py: a tiny call first loads every code path (SciPy, numba, thread pools) outside the measurement
    tiny = argparse.Namespace(**{**vars(args), "vocab": 64, "hidden": 8, "nt": 9, "ns": 4, "text": 6, "response": 3})
    loss_fn(*build_inputs(tiny)).loss.backward()
    load_before = os.getloadavg()[0]
    times = []
    for i in range(args.inner):
        # fresh inputs every run (a DistillInputs holds rows gathered from the hidden states, part of one graph)
        student = teacher = out = None
        student, teacher = build_inputs(args)
        if i == 0:
            base = rss_bytes()
        start = time.perf_counter()
        out = loss_fn(student, teacher)
        out.loss.backward()
        times.append(time.perf_counter() - start)
        if i == 0:  # memory from the first run only, exactly as loss_bench.py measures it
            peak = peak_rss_bytes()
            grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (student.hidden, student.head_weight))
    Path(args.result_out).write_text(json.dumps({
        "times_s": times, "added_bytes": peak - base, "grad_buffer_bytes": grad_bytes,
        "loss": float(out.loss.detach()), "load": [load_before, os.getloadavg()[0]],
    }))


def run_point(point: dict, args: argparse.Namespace, tmp: Path, tag: str) -> dict:
    result = tmp / f"{tag}.json"
    shape = {"vocab": point["vocab"], "hidden": args.hidden, "nt": point["nt"], "ns": args.ns, "text": args.text,
             "response": args.response, "batch": point["batch"], "seed": args.seed, "inner": args.inner, "l1": args.l1}
    cmd = [sys.executable, __file__, "--worker", "--result-out", str(result)] + [
        f"--{k}={v}" for k, v in shape.items()]
    subprocess.run(cmd, check=True, env={**os.environ, **MALLOC_ENV})
    return json.loads(result.read_text())


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Ordinary least squares ``y = a + b x``: a, b, their standard errors, R^2 (needs >= 3 points, 2 distinct x)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx
    a = my - b * mx
    ssr = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    s2 = ssr / (n - 2) if n > 2 else float("nan")
    return {"a": a, "b": b, "se_a": math.sqrt(s2 * (1 / n + mx**2 / sxx)), "se_b": math.sqrt(s2 / sxx),
            "r2": 1 - ssr / syy if syy > 0 else float("nan"), "n": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small vocabularies (4k-16k, base 8k), 3 rounds")
    parser.add_argument("--nt-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--vocab-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--batch-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--base-nt", type=int, default=None)
    parser.add_argument("--base-vocab", type=int, default=None)
    parser.add_argument("--base-batch", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="rounds: processes per point (5 full, 3 quick)")
    parser.add_argument("--inner", type=int, default=2, help="timed forward + backward runs per process")
    parser.add_argument("--l1", choices=("auto", "cdist"), default="auto",
                        help="the matching cost's L1 backend: auto (numba when installed) or cdist (numba hidden, as "
                             "l1_bench.py does)")
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--ns", type=int, default=144)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write every run and fit here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nt", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result-out", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    preset = QUICK if args.quick else FULL
    base = {ax: getattr(args, f"base_{ax}") or preset["base"][ax] for ax in AXES}
    values = {ax: [v for v in (getattr(args, f"{ax}_values") or preset[ax]) if v > 0] for ax in AXES}
    runs = args.runs or preset["runs"]
    # the distinct points: the base point plus each axis's values with the other two at the base
    points: list[tuple] = []
    for ax in AXES:
        for v in values[ax]:
            p = tuple(sorted({**base, ax: v}.items()))
            if p not in points:
                points.append(p)
    if tuple(sorted(base.items())) not in points:
        points.insert(0, tuple(sorted(base.items())))

    print(f"EMKDLoss() forward + backward (fused), D={args.hidden}, Ns={args.ns}, text={args.text} (response "
          f"{args.response}), float32, base Nt={base['nt']} V={base['vocab']} B={base['batch']}; "
          f"{len(points)} points x "
          f"{runs} runs; L1 backend {args.l1}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)
    started = time.perf_counter()
    results: dict[tuple, list[dict]] = {p: [] for p in points}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(runs):
            shift = rep % len(points)
            for i, p in enumerate(points[shift:] + points[:shift]):
                r = run_point(dict(p), args, Path(tmp), f"{rep}-{i}")
                results[p].append(r)
                d = dict(p)
                times = ", ".join(f"{t:.2f}" for t in r["times_s"])
                without = (r["added_bytes"] - r["grad_buffer_bytes"]) / 2**20
                print(f"  round {rep + 1}/{runs}  Nt={d['nt']:5d} V={d['vocab']:7d} B={d['batch']}: {times} s, "
                      f"adds {r['added_bytes'] / 2**20:6.0f} MiB ({without:4.0f} "
                      f"without gradients), load {r['load'][0]:.1f}", flush=True)
    wall = time.perf_counter() - started

    rows = []
    for p in points:
        rs = results[p]
        rows.append({**dict(p),
                     "times_s": [t for r in rs for t in r["times_s"]],
                     "median_s": statistics.median(t for r in rs for t in r["times_s"]),
                     "added_mib": statistics.median(r["added_bytes"] for r in rs) / 2**20,
                     "grad_buffers_mib": rs[0]["grad_buffer_bytes"] / 2**20,
                     "added_without_grads_mib": statistics.median(r["added_bytes"] - r["grad_buffer_bytes"]
                                                                  for r in rs) / 2**20,
                     "loss": rs[0]["loss"]})
    loads = [x for rs in results.values() for r in rs for x in r["load"]]

    print()
    print(f"wall time {wall / 60:.1f} min; load average (1 min) seen by the workers {min(loads):.1f}-{max(loads):.1f}")
    fits = {}
    for ax in AXES:
        if len(values[ax]) < 2:
            continue
        others = [o for o in AXES if o != ax]
        axis_rows = sorted((r for r in rows if all(r[o] == base[o] for o in others)), key=lambda r: r[ax])
        print()
        print(f"{AXIS_LABEL[ax]} axis ({', '.join(f'{AXIS_LABEL[o]} = {base[o]}' for o in others)}):")
        print()
        print(f"| {AXIS_LABEL[ax]} | median time (s) | single runs (s) | memory added (MiB) "
              "| of which gradient buffers | added without gradients |")
        print("| ---: | ---: | --- | ---: | ---: | ---: |")
        for r in axis_rows:
            print(f"| {r[ax]:,} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} | "
                  f"{r['added_mib']:.0f} | {r['grad_buffers_mib']:.0f} | {r['added_without_grads_mib']:.0f} |")
        xm = [float(r[ax]) for r in axis_rows]
        if len(xm) < 3:
            continue
        xs = [float(r[ax]) for r in axis_rows for _ in r["times_s"]]
        ts = [t for r in axis_rows for t in r["times_s"]]
        # the line through the per-point medians is the headline (load bursts of the shared machine make single runs
        # up to 10x slower now and then, and least squares over every run follows them); the line over every run is
        # shown too
        fits[ax] = {"time_s_medians": linear_fit(xm, [r["median_s"] for r in axis_rows]),
                    "time_s_all_runs": linear_fit(xs, ts),
                    "added_without_grads_mib_medians": linear_fit(
                        xm, [r["added_without_grads_mib"] for r in axis_rows])}
        per = {"nt": "teacher vision token per sample", "vocab": "1,000 vocabulary entries", "batch": "sample"}[ax]
        scale, unit = {"nt": (1e3, "ms"), "vocab": (1e6, "ms"), "batch": (1.0, "s")}[ax]
        print()
        for key, what in (("time_s_medians", f"per-point medians, {len(xm)} points"), ("time_s_all_runs",
                                                                                     f"every run, {len(xs)} runs")):
            f = fits[ax][key]
            print(f"time = {f['a']:.3f} s (± {f['se_a']:.3f}) + {f['b'] * scale:.3f} {unit} "
                  f"(± {f['se_b'] * scale:.3f}) "
                  f"per {per}; R² {f['r2']:.3f}; least squares over {what}")
        fm = fits[ax]["added_without_grads_mib_medians"]
        mscale = {"nt": 1.0, "vocab": 1e3, "batch": 1.0}[ax]
        print(f"memory added without gradients = {fm['a']:.1f} MiB (± {fm['se_a']:.1f}) + {fm['b'] * mscale:.3g} MiB "
              f"(± {fm['se_b'] * mscale:.2g}) per {per}; least squares over the per-point medians")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "base": base, "values": values, "runs": runs, "l1": args.l1, "shape": {k: getattr(args, k) for k in
                                                                    ("hidden", "ns", "text", "response", "seed")},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_s": wall,
            "load_range": [min(loads), max(loads)], "points": rows, "fits": fits}, indent=2))


if __name__ == "__main__":
    main()

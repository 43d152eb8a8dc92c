"""How the fused EM-KD loss scales: time and memory against Nt, V and B, with a least-squares line per axis.

    python benchmarks/scaling_bench.py                 # full run: V up to 151,936, 3 processes per point
    python benchmarks/scaling_bench.py --quick         # small vocabularies, 2 processes per point, about a minute
    python benchmarks/scaling_bench.py --nt-values 144 576 1024 --vocab-values 0 --batch-values 0   # Nt axis only

Inputs are ``benchmarks/loss_bench.py``'s (its ``build_inputs``: random float32 hidden states and heads, Ds = Dt =
896, per sample Ns = 144 student vision tokens and 128 text tokens of which the last 64 are response; the student's
hidden states and head require grad). One run = forward + backward of ``EMKDLoss()`` (defaults: fused path, paper
hyperparameters, ``hungarian_logits`` matching, the L1 backend ``auto``).

Three axes, each varied with the other two at the base point (``--base-nt``, ``--base-vocab``, ``--base-batch``):

* Nt, the teacher's vision tokens per sample (``--nt-values``);
* V, the vocabulary of both heads (``--vocab-values``);
* B, the batch (``--batch-values``).

Every point (the base point once, shared by the three axes) runs in its own process per repetition, as in
``loss_bench.py``: a tiny warm-up call, the inputs, then one timed forward + backward. The points take turns in
each round (the order rotates from round to round) so that machine load falls on all of them alike. Memory is
``loss_bench.py``'s: peak resident set size minus the resident size once the inputs exist, with
``MALLOC_MMAP_THRESHOLD_=131072``; reported with and without the gradient buffers autograd returns (student hidden
and head weight; the head's gradient alone is V x D x 4 bytes).

Reported: per point the median time and the single runs, the median memory added; per axis an ordinary
least-squares line ``time = a + b * x`` over every single run (not the medians), with the standard errors of a
and b, R^2, and the same line for the memory added without gradient buffers. ``--json`` writes everything.
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
        "base": {"nt": 729, "vocab": 65_536, "batch": 2}, "runs": 3}
QUICK = {"nt": [144, 324, 576, 729, 1024], "vocab": [4_096, 8_192, 16_384], "batch": [1, 2, 4],
         "base": {"nt": 729, "vocab": 8_192, "batch": 2}, "runs": 2}


def worker(args: argparse.Namespace) -> None:
    from emkd import EMKDLoss

    torch.manual_seed(args.seed)
    loss_fn = EMKDLoss()
    # as loss_bench.py: a tiny call first loads every code path (SciPy, numba, thread pools) outside the measurement
    tiny = argparse.Namespace(**{**vars(args), "vocab": 64, "hidden": 8, "nt": 9, "ns": 4, "text": 6, "response": 3})
    loss_fn(*build_inputs(tiny)).loss.backward()
    student, teacher = build_inputs(args)
    base = rss_bytes()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    out = loss_fn(student, teacher)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    peak = peak_rss_bytes()
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (student.hidden, student.head_weight))
    Path(args.result_out).write_text(json.dumps({
        "time_s": elapsed, "added_bytes": peak - base, "grad_buffer_bytes": grad_bytes,
        "loss": float(out.loss.detach()), "load": [load_before, os.getloadavg()[0]],
    }))


def run_point(point: dict, args: argparse.Namespace, tmp: Path, tag: str) -> dict:
    result = tmp / f"{tag}.json"
    shape = {"vocab": point["vocab"], "hidden": args.hidden, "nt": point["nt"], "ns": args.ns, "text": args.text,
             "response": args.response, "batch": point["batch"], "seed": args.seed}
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
    parser.add_argument("--quick", action="store_true", help="small vocabularies (4k-16k, base 8k), 2 runs per point")
    parser.add_argument("--nt-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--vocab-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--batch-values", type=int, nargs="+", default=None, help="0 skips the axis")
    parser.add_argument("--base-nt", type=int, default=None)
    parser.add_argument("--base-vocab", type=int, default=None)
    parser.add_argument("--base-batch", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="processes per point (3 full, 2 quick)")
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
          f"{args.response}), float32, base Nt={base['nt']} V={base['vocab']} B={base['batch']}; {len(points)} points x "
          f"{runs} runs; torch {torch.__version__}, {torch.get_num_threads()} threads, "
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
                print(f"  round {rep + 1}/{runs}  Nt={d['nt']:5d} V={d['vocab']:7d} B={d['batch']}: {r['time_s']:7.2f} s, "
                      f"adds {r['added_bytes'] / 2**20:6.0f} MiB ({(r['added_bytes'] - r['grad_buffer_bytes']) / 2**20:4.0f} "
                      f"without gradients), load {r['load'][0]:.1f}", flush=True)
    wall = time.perf_counter() - started

    rows = []
    for p in points:
        rs = results[p]
        rows.append({**dict(p),
                     "times_s": [r["time_s"] for r in rs],
                     "median_s": statistics.median(r["time_s"] for r in rs),
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
        print(f"| {AXIS_LABEL[ax]} | median time (s) | single runs (s) | memory added (MiB) | of which gradient buffers "
              f"| added without gradients |")
        print("| ---: | ---: | --- | ---: | ---: | ---: |")
        for r in axis_rows:
            print(f"| {r[ax]:,} | {r['median_s']:.2f} | {', '.join(f'{t:.2f}' for t in r['times_s'])} | "
                  f"{r['added_mib']:.0f} | {r['grad_buffers_mib']:.0f} | {r['added_without_grads_mib']:.0f} |")
        xs = [float(r[ax]) for r in axis_rows for _ in r["times_s"]]
        ts = [t for r in axis_rows for t in r["times_s"]]
        ms = [(res["added_bytes"] - res["grad_buffer_bytes"]) / 2**20 for r in axis_rows
              for res in results[tuple(sorted((k, r[k]) for k in AXES))]]
        if len(set(xs)) >= 2 and len(xs) >= 3:
            ft, fm = linear_fit(xs, ts), linear_fit(xs, ms)
            fits[ax] = {"time_s": ft, "added_without_grads_mib": fm}
            unit, scale = ("ms", 1e3) if ax != "batch" else ("s", 1.0)
            per = {"nt": "teacher vision token per sample", "batch": "sample"}
            if ax == "vocab":
                print(f"\ntime = {ft['a']:.2f} s (± {ft['se_a']:.2f}) + {ft['b'] * 1e3 * 1000:.1f} ms (± "
                      f"{ft['se_b'] * 1e6:.1f}) per 1,000 vocabulary entries; R² {ft['r2']:.3f}, {ft['n']} runs")
            else:
                print(f"\ntime = {ft['a']:.2f} s (± {ft['se_a']:.2f}) + {ft['b'] * scale:.2f} {unit} (± "
                      f"{ft['se_b'] * scale:.2f}) per {per[ax]}; R² {ft['r2']:.3f}, {ft['n']} runs")
            print(f"memory added without gradients = {fm['a']:.1f} MiB (± {fm['se_a']:.1f}) + "
                  f"{fm['b']:.3g} MiB (± {fm['se_b']:.2g}) per unit of {AXIS_LABEL[ax]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "base": base, "values": values, "runs": runs, "shape": {k: getattr(args, k) for k in
                                                                    ("hidden", "ns", "text", "response", "seed")},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_s": wall,
            "load_range": [min(loads), max(loads)], "points": rows, "fits": fits}, indent=2))


if __name__ == "__main__":
    main()

"""EM-KD's loss at the paper's scale: the fused (chunked) path against the naive (full-logit) path.

    python benchmarks/loss_bench.py                 # paper scale (SPEC §7), 3 timed runs per path
    python benchmarks/loss_bench.py --runs 5 --vocab 32000
    python benchmarks/loss_bench.py --naive-l1 cdist   # the naive path's matching cost by torch.cdist, the reference

Random inputs: V = 151,936, Ds = Dt = 896, batch 2, per sample Nt = 729 teacher and Ns = 144 student vision tokens
and 128 text tokens of which the last 64 are response; float32; the student's hidden states and LM head (weight)
are trainable, the teacher is frozen. One run = forward + backward of ``EMKDLoss`` (paper hyperparameters, matching
``hungarian_logits``). Each path runs in its own process (``--worker``), alternating naive / fused, so both see
the same machine load. Each worker reports:

* wall time of one run, in a process with the C library's default allocator settings (as a user's process runs);
* the memory the loss adds on top of its inputs, in a second process per path and run: peak resident set size
  (``getrusage``) minus the resident size once the inputs exist, with and without the gradient buffers autograd
  returns (student hidden, head weight); that process runs with ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed
  buffers leave the resident set. The fixed threshold maps and unmaps every buffer of 128 KiB or more on each
  allocation, which slows the fused path's chunk buffers by about a quarter, so its times are printed but not used;
* the loss components and gradients, which the parent compares between the two paths.

The time ratio is the median of the paired ratios (each run of the fused path against the naive run just before it),
printed with their smallest and largest.

Both paths take the L1 matching cost's ``backend="auto"`` (the numba kernel when numba imports). ``--naive-l1 cdist``
runs the naive worker with the kernel hidden, so that its cost comes from ``torch.cdist(p=1)``: the reference path
as it stood before the kernel, which the issue's "fused <= 0.5 x naive" target was set against.

The figures in docs/performance.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from emkd.chunking import DEFAULT_CHUNK_SIZE


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_inputs(args: argparse.Namespace):
    """The two sides of one batch as :class:`emkd.DistillInputs` (student leaves require grad)."""
    from emkd import DistillInputs

    gen = torch.Generator().manual_seed(args.seed)
    B, V, D, Nt, Ns, K, R = args.batch, args.vocab, args.hidden, args.nt, args.ns, args.text, args.response
    sides = {}
    for name, n_vision in (("student", Ns), ("teacher", Nt)):
        L = n_vision + K
        hidden = torch.randn(B, L, D, generator=gen) * 2.0
        weight = torch.randn(V, D, generator=gen) * D**-0.5
        vision = torch.zeros(B, L, dtype=torch.bool)
        vision[:, 2 : 2 + n_vision] = True  # 2 prompt tokens, then the image, then the rest of the text
        labels = torch.full((B, L), -100, dtype=torch.long)
        labels[:, L - R :] = torch.randint(0, V, (B, R), generator=torch.Generator().manual_seed(args.seed + 1))
        if name == "student":
            hidden.requires_grad_(True)
            weight.requires_grad_(True)
        sides[name] = DistillInputs(hidden=hidden, head_weight=weight, vision_mask=vision,
                                    attention_mask=torch.ones(B, L, dtype=torch.long), labels=labels)
    return sides["student"], sides["teacher"]


def worker(args: argparse.Namespace) -> None:
    from emkd import EMKDLoss

    if args.worker == "naive" and args.naive_l1 == "cdist":
        from emkd.matching import l1_kernels

        l1_kernels._KERNELS["numba"] = "hidden by loss_bench.py --naive-l1 cdist"  # `auto` falls back to cdist
    torch.manual_seed(args.seed)
    loss_fn = EMKDLoss(implementation=args.worker, chunk_size=args.chunk_size)
    # a tiny warm-up call loads every code path (SciPy, thread pools) so it is not counted as the loss's memory
    tiny = argparse.Namespace(**{**vars(args), "vocab": 64, "hidden": 8, "nt": 9, "ns": 4, "text": 6, "response": 3})
    loss_fn(*build_inputs(tiny)).loss.backward()
    student, teacher = build_inputs(args)
    base = rss_bytes()
    times = []
    out = None
    for _ in range(args.runs):
        student.hidden.grad = None
        student.head_weight.grad = None
        start = time.perf_counter()
        out = loss_fn(student, teacher)
        out.loss.backward()
        times.append(time.perf_counter() - start)
    peak = peak_rss_bytes()
    grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in (student.hidden, student.head_weight))
    result = {
        "implementation": args.worker,
        "times_s": times,
        "rss_inputs_bytes": base,
        "peak_rss_bytes": peak,
        "added_bytes": peak - base,
        "grad_buffer_bytes": grad_bytes,
        "components": out.components(),
        "matches": [m[1].tolist() for m in out.matches],
    }
    torch.save({"hidden": student.hidden.grad, "head": student.head_weight.grad}, args.grads_out)
    Path(args.result_out).write_text(json.dumps(result))


def run_worker(implementation: str, args: argparse.Namespace, tmp: Path, rep: int, measure: str) -> dict:
    """One worker process; ``measure="time"`` runs with the default allocator, ``"memory"`` with ``MALLOC_ENV``."""
    grads = tmp / f"{implementation}-{rep}-{measure}.pt"
    result = tmp / f"{implementation}-{rep}-{measure}.json"
    cmd = [sys.executable, __file__, "--worker", implementation, "--runs", "1", "--grads-out", str(grads),
           "--result-out", str(result)] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE_ARGS]
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    subprocess.run(cmd, check=True, env={**env, **MALLOC_ENV} if measure == "memory" else env)
    out = json.loads(result.read_text())
    out["grads"] = str(grads)
    return out


# glibc's default raises its mmap threshold after large frees and then keeps freed blocks in the heap, so resident
# memory would count buffers already released. A fixed threshold returns every block of 128 KiB or more to the
# system when it is freed: peak RSS then follows the memory the computation holds.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

SHAPE_ARGS = ("vocab", "hidden", "nt", "ns", "text", "response", "batch", "seed", "chunk_size", "naive_l1")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--nt", type=int, default=729)
    parser.add_argument("--ns", type=int, default=144)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--runs", type=int, default=3, help="processes per path; each times one forward + backward")
    parser.add_argument("--json", type=str, default=None, help="also write the summary here")
    parser.add_argument("--naive-l1", choices=("auto", "cdist"), default="auto",
                        help="the naive path's L1 matching cost: auto (as the fused path) or cdist (the reference)")
    parser.add_argument("--worker", choices=("naive", "fused"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--grads-out", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-out", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"EMKDLoss forward + backward, V={args.vocab}, D={args.hidden}, B={args.batch}, Nt={args.nt}, Ns={args.ns}, "
          f"text={args.text} (response {args.response}), float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"naive path's L1 cost: {args.naive_l1}", flush=True)
    results: dict[str, list[dict]] = {"naive": [], "fused": []}  # the timed processes
    memory: dict[str, list[dict]] = {"naive": [], "fused": []}  # the processes that measure memory
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.runs):
            for impl in ("naive", "fused"):
                r = run_worker(impl, args, Path(tmp), rep, "time")
                results[impl].append(r)
                print(f"  run {rep + 1}/{args.runs} {impl:5s}: {r['times_s'][0]:7.2f} s", flush=True)
            for impl in ("naive", "fused"):
                m = run_worker(impl, args, Path(tmp), rep, "memory")
                memory[impl].append(m)
                print(f"  run {rep + 1}/{args.runs} {impl:5s}: loss adds {m['added_bytes'] / 2**20:7.0f} MiB (peak RSS "
                      f"{m['peak_rss_bytes'] / 2**20:.0f} MiB; {m['times_s'][0]:.2f} s with the fixed mmap threshold)",
                      flush=True)
        naive_grads = torch.load(results["naive"][0]["grads"])
        fused_grads = torch.load(results["fused"][0]["grads"])
        grad_err = {k: rel_err(fused_grads[k], naive_grads[k]) for k in naive_grads}

    summary = {"shape": {k: getattr(args, k) for k in SHAPE_ARGS}, "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    for impl, rs in results.items():
        ms = memory[impl]
        summary[impl] = {
            "median_s": statistics.median(r["times_s"][0] for r in rs),
            "times_s": [r["times_s"][0] for r in rs],
            "times_fixed_mmap_threshold_s": [m["times_s"][0] for m in ms],
            "added_mib": statistics.median(m["added_bytes"] for m in ms) / 2**20,
            "added_without_grads_mib": statistics.median(m["added_bytes"] - m["grad_buffer_bytes"] for m in ms) / 2**20,
            "grad_buffers_mib": ms[0]["grad_buffer_bytes"] / 2**20,
            "components": rs[0]["components"],
        }
    n, f = summary["naive"], summary["fused"]
    summary["loss_rel_err"] = {k: abs(f["components"][k] - n["components"][k]) / max(abs(n["components"][k]), 1e-30)
                               for k in n["components"]}
    summary["grad_rel_err"] = grad_err
    summary["same_matches"] = results["naive"][0]["matches"] == results["fused"][0]["matches"]
    paired = sorted(ft / nt for ft, nt in zip(f["times_s"], n["times_s"]))
    summary["ratios"] = {
        "time_fused_over_naive": statistics.median(paired),
        "time_paired_ratios": paired,
        "added_memory_fused_over_naive": f["added_mib"] / n["added_mib"],
        "added_memory_without_grads_fused_over_naive": f["added_without_grads_mib"] / n["added_without_grads_mib"],
    }

    print()
    print("| path | median time (s) | memory added (MiB) | of which gradient buffers | added without gradients |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for impl in ("naive", "fused"):
        s = summary[impl]
        print(f"| {impl} | {s['median_s']:.2f} | {s['added_mib']:.0f} | {s['grad_buffers_mib']:.0f} | "
              f"{s['added_without_grads_mib']:.0f} |")
    r = summary["ratios"]
    print()
    print(f"fused / naive: time {r['time_fused_over_naive']:.3f}x (median of the paired runs; "
          f"{paired[0]:.3f}x to {paired[-1]:.3f}x), memory added {r['added_memory_fused_over_naive']:.3f}x, "
          f"without gradient buffers {r['added_memory_without_grads_fused_over_naive']:.3f}x")
    print("loss components, max relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in summary["loss_rel_err"].items()))
    print("gradients, max abs difference / max abs value: "
          + ", ".join(f"{k} {v:.1e}" for k, v in grad_err.items()) + f"; same matches: {summary['same_matches']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

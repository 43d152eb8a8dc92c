"""EM-KD's L1 matching cost at the paper's scale: ``torch.cdist`` (the reference) against the numba kernel, and the
effect of bfloat16 matching logits.

    python benchmarks/l1_bench.py                          # paper scale, about 3-5 minutes on 2 cores
    python benchmarks/l1_bench.py --vocab 16384 --e2e-repeats 1   # a quick look
    python benchmarks/l1_bench.py --device cuda --backends cdist triton   # only the L1 backends, on a GPU

Inputs (random, float32, SPEC §7): ``V = 151,936``, ``Ds = Dt = 896``, ``B = 2`` samples of ``Ns = 144`` student and
``Nt = 729`` teacher vision tokens, in two kinds:

* ``random``: as ``benchmarks/loss_bench.py``: independent hidden states (std 2) and heads (std ``D**-0.5``); every
  pair costs about the same, so the assignment is decided by small differences (the hard case for bfloat16).
* ``related``: the student's tokens are the teacher's, average-pooled 729 -> 144, plus noise (std 0.5); the student
  head is the teacher's plus 10 % noise: the situation EM-KD's matching is for.

Parts, all in one process so that each comparison sees the same machine load:

1. ``probe``: the machine's sustained ``acc += |x - c|`` rate on data in the L1 cache (numba, every thread).
2. ``kernels``: one pass over the vocabulary per input kind; for each chunk of ``--chunk-size`` logits (computed
   once, not timed) ``cdist`` and the numba kernel add to their own ``[B, Ns, Nt]`` cost, in alternating order. The
   same pass computes the chunk's logits in float32 and in bfloat16 (timed, alternating) and adds the bfloat16
   logits' cost with the numba kernel. Reported: total L1 time per backend, the ratio, G ``|a - b|`` per second,
   the share of the probe's rate; the costs' largest relative difference and whether the Hungarian assignments
   (SciPy) are the same; for bfloat16, how many of the ``B x Ns`` matches change and the costs' difference.
3. ``head_l1_cost``: the whole function as the loss calls it (logits + L1), ``cdist`` / ``numba`` /
   ``numba + bfloat16``, ``--e2e-repeats`` interleaved calls each, median.
4. ``EMKDLoss`` (``--loss-repeats``, off by default): forward + backward of the fused loss on
   ``benchmarks/loss_bench.py``'s inputs, with the L1 backend ``auto`` (numba) against numba hidden (``auto`` falls
   back to ``cdist``, today's path), interleaved; the loss terms, gradients and matches of the two are compared.
   Memory is ``loss_bench.py``'s business: the numba kernel allocates nothing beyond the ``[G, Ns, Nt]`` cost.

With ``--backends``, the script runs only a pass like part 2 for the backends named, on ``--device``: the logits
and costs live on that device, every backend adds to its own cost from the same chunks in rotating order, each call
timed between two device synchronisations; reported per backend: total time, G ``|a - b|`` per second, the speed-up
over the first backend named, the costs' largest relative difference from it and the Hungarian matches changed.
``triton`` needs CUDA tensors (or ``TRITON_INTERPRET=1`` set before the run, far too slow to time).

The figures in docs/performance.md (section 5) come from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from emkd.chunking import DEFAULT_CHUNK_SIZE, chunk_logits
from emkd.matching import head_l1_cost, hungarian_match, l1_kernels

KINDS = ("random", "related")


def build(kind: str, args: argparse.Namespace, seed: int):
    """``(hs [B, Ns, D], ws [V, D], ht [B, Nt, D], wt [V, D])`` float32 of one input kind (see the docstring)."""
    gen = torch.Generator().manual_seed(seed)
    B, V, D, Ns, Nt = args.batch, args.vocab, args.hidden, args.ns, args.nt
    ht = torch.randn(B, Nt, D, generator=gen) * 2.0  # (B, Nt, D)
    wt = torch.randn(V, D, generator=gen) * D**-0.5  # (V, D)
    if kind == "random":
        hs = torch.randn(B, Ns, D, generator=gen) * 2.0  # (B, Ns, D)
        ws = torch.randn(V, D, generator=gen) * D**-0.5  # (V, D)
    else:
        pooled = F.adaptive_avg_pool1d(ht.transpose(1, 2), Ns).transpose(1, 2)  # (B, Ns, D)
        hs = pooled + 0.5 * torch.randn(B, Ns, D, generator=gen)
        ws = wt + 0.1 * D**-0.5 * torch.randn(V, D, generator=gen)
    return hs, ws, ht, wt


def bf16_logits(h: torch.Tensor, w: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """What ``head_l1_cost(..., matching_dtype="bfloat16")`` computes for one chunk (no bias here)."""
    return (h.bfloat16() @ w[start:stop].bfloat16().T).float()


def assignments(cost: torch.Tensor) -> list[list[int]]:
    """The teacher index matched to each student row, per sample (SciPy's Hungarian)."""
    return [hungarian_match(cost[g])[1].tolist() for g in range(cost.shape[0])]


def changed(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|a - ref| / |ref|`` over the entries."""
    return float(((a.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30)).max())


class Probe:
    """The machine's sustained ``acc += |x - c|`` rate on float32 data in the L1 cache: ``_l1_numba``'s probe kernel
    on as many threads as torch uses, ``repeats`` calibrated so that one measurement takes about ``seconds``."""

    def __init__(self, seconds: float) -> None:
        from emkd.matching import _l1_numba

        self.kernels = _l1_numba
        with _l1_numba.threads(torch.get_num_threads()) as threads:
            self.threads = threads
            self.x = np.random.default_rng(0).random((threads, 1024), dtype=np.float32)  # (T, 1024): 4 KiB each
            _l1_numba.sub_abs_add_probe(self.x, 1)  # compile or load from the cache
            self.repeats, elapsed = 16, 0.0
            while elapsed < seconds / 2:
                self.repeats *= 2
                elapsed = self._time()

    def _time(self) -> float:
        start = time.perf_counter()
        self.kernels.sub_abs_add_probe(self.x, self.repeats)
        return time.perf_counter() - start

    def rate(self) -> float:
        """Steps per second of one measurement."""
        with self.kernels.threads(self.threads):
            seconds = self._time()
        return self.threads * self.x.shape[1] * self.kernels.PROBE_CENTRES * self.repeats / seconds


def kernels_pass(kind: str, args: argparse.Namespace, probe: Probe) -> dict:
    """Part 2 for one input kind: a pass over the vocabulary, both L1 backends and both logit dtypes per chunk, and a
    probe measurement after every 4th chunk (so the probe sees the same machine load as the kernels)."""
    hs, ws, ht, wt = build(kind, args, args.seed)
    B, Ns, Nt, V = args.batch, args.ns, args.nt, args.vocab
    costs = {name: torch.zeros(B, Ns, Nt) for name in ("cdist", "numba", "numba_bf16")}
    seconds = {name: 0.0 for name in ("cdist", "numba", "logits_f32", "logits_bf16")}
    chunk_ratios, probe_rates = [], []
    bf16_logits(ht, wt, 0, args.chunk_size)  # warm-up: oneDNN sets up its bfloat16 kernels on first use
    l1_kernels.l1_accumulate(hs[:, :, :8].contiguous(), ht[:, :, :8].contiguous(), torch.zeros(B, Ns, Nt), "numba")
    for k, start in enumerate(range(0, V, args.chunk_size)):
        stop = min(start + args.chunk_size, V)
        logits = {}
        for dtype in (("f32", "bf16") if k % 2 == 0 else ("bf16", "f32")):
            t0 = time.perf_counter()
            if dtype == "f32":
                logits[dtype] = (chunk_logits(hs, ws, None, start, stop), chunk_logits(ht, wt, None, start, stop))
            else:
                logits[dtype] = (bf16_logits(hs, ws, start, stop), bf16_logits(ht, wt, start, stop))
            seconds[f"logits_{dtype}"] += time.perf_counter() - t0
        zs, zt = logits["f32"]  # (B, Ns, C), (B, Nt, C)
        took = {}
        for backend in (("cdist", "numba") if k % 2 == 0 else ("numba", "cdist")):
            t0 = time.perf_counter()
            l1_kernels.l1_accumulate(zs, zt, costs[backend], backend)
            took[backend] = time.perf_counter() - t0
            seconds[backend] += took[backend]
        chunk_ratios.append(took["cdist"] / took["numba"])
        l1_kernels.l1_accumulate(*logits["bf16"], costs["numba_bf16"], "numba")
        if k % 4 == 0:
            probe_rates.append(probe.rate())
    reference = assignments(costs["cdist"])
    return {
        "seconds": seconds,
        "chunk_ratio_median": statistics.median(chunk_ratios),
        "probe": statistics.median(probe_rates),
        "numba_rel_diff": rel_diff(costs["numba"], costs["cdist"]),
        "numba_changed": changed(assignments(costs["numba"]), reference),
        "bf16_rel_diff": rel_diff(costs["numba_bf16"], costs["cdist"]),
        "bf16_changed": changed(assignments(costs["numba_bf16"]), reference),
        "matches": B * min(Ns, Nt),
        "abs_diffs": B * Ns * Nt * V,
    }


def end_to_end(args: argparse.Namespace) -> dict[str, float]:
    """Part 3: median seconds of ``head_l1_cost`` per configuration, calls interleaved."""
    hs, ws, ht, wt = build("random", args, args.seed)
    configs = {
        "cdist": dict(backend="cdist"),
        "numba": dict(backend="numba"),
        "numba + bfloat16 logits": dict(backend="numba", matching_dtype="bfloat16"),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(args.e2e_repeats):
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))
        for name in order:
            t0 = time.perf_counter()
            head_l1_cost(hs, ws, None, ht, wt, None, args.chunk_size, **configs[name])
            times[name].append(time.perf_counter() - t0)
            print(f"    head_l1_cost {name}: {times[name][-1]:.2f} s", flush=True)
    return {name: statistics.median(ts) for name, ts in times.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer sees a kernel's whole run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backends_pass(kind: str, args: argparse.Namespace) -> dict:
    """``--backends``: one pass over the vocabulary on ``--device``, every backend adding each chunk's L1 cost to its
    own ``[B, Ns, Nt]`` cost, in an order that rotates per chunk."""
    device = torch.device(args.device)
    hs, ws, ht, wt = (x.to(device) for x in build(kind, args, args.seed))
    B, Ns, Nt, V = args.batch, args.ns, args.nt, args.vocab
    backends = [l1_kernels.resolve_backend(name, hs, ht) for name in args.backends]
    costs = {name: torch.zeros(B, Ns, Nt, device=device) for name in backends}
    seconds = {name: 0.0 for name in backends}
    warm = hs[:, :, :8].contiguous(), ht[:, :, :8].contiguous()
    for name in backends:  # compile, load or warm up every kernel before the timed pass
        l1_kernels.l1_accumulate(*warm, torch.zeros(B, Ns, Nt, device=device), name)
    for k, start in enumerate(range(0, V, args.chunk_size)):
        stop = min(start + args.chunk_size, V)
        zs, zt = chunk_logits(hs, ws, None, start, stop), chunk_logits(ht, wt, None, start, stop)  # (B, Ns|Nt, C)
        for i in range(len(backends)):
            name = backends[(k + i) % len(backends)]
            synchronize(device)
            t0 = time.perf_counter()
            l1_kernels.l1_accumulate(zs, zt, costs[name], name)
            synchronize(device)
            seconds[name] += time.perf_counter() - t0
    reference = assignments(costs[backends[0]])
    return {
        "backends": backends,
        "seconds": seconds,
        "rel_diff": {name: rel_diff(costs[name], costs[backends[0]]) for name in backends},
        "changed": {name: changed(assignments(costs[name]), reference) for name in backends},
        "matches": B * min(Ns, Nt),
        "abs_diffs": B * Ns * Nt * V,
    }


def backends_only(args: argparse.Namespace) -> None:
    """The ``--backends`` run: :func:`backends_pass` per input kind, one table."""
    print(f"python benchmarks/l1_bench.py {' '.join(sys.argv[1:])}".rstrip())
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.machine()
    print(f"{args.device} ({where}), torch {torch.__version__}; V={args.vocab}, D={args.hidden}, B={args.batch}, "
          f"Ns={args.ns}, Nt={args.nt}, chunk {args.chunk_size}")
    first = args.backends[0]
    print(f"| inputs | backend | L1 time (s) | G/s | speed-up over {first} | cost max rel. diff | matches changed |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind in args.kinds:
        r = backends_pass(kind, args)
        s = r["seconds"]
        for name in r["backends"]:
            print(f"| {kind} | {name} | {s[name]:.3f} | {r['abs_diffs'] / s[name] / 1e9:.2f} | "
                  f"{s[r['backends'][0]] / s[name]:.2f} x | {r['rel_diff'][name]:.1e} | "
                  f"{r['changed'][name]} of {r['matches']} |", flush=True)


@contextlib.contextmanager
def numba_hidden():
    """Inside the block, ``backend="auto"`` behaves as without numba installed (today's ``cdist`` path)."""
    saved = l1_kernels._kernels("numba")
    l1_kernels._KERNELS["numba"] = "hidden by benchmarks/l1_bench.py"
    try:
        yield
    finally:
        l1_kernels._KERNELS["numba"] = saved


def whole_loss(args: argparse.Namespace) -> None:
    """Part 4: ``EMKDLoss`` forward + backward with and without the numba kernel, interleaved."""
    from loss_bench import build_inputs  # benchmarks/ is on sys.path when this file runs as a script

    from emkd import EMKDLoss

    shape = argparse.Namespace(vocab=args.vocab, hidden=args.hidden, nt=args.nt, ns=args.ns, text=128, response=64,
                               batch=args.batch, seed=args.seed)
    loss_fn = EMKDLoss(chunk_size=args.chunk_size)
    times: dict[str, list[float]] = {"cdist": [], "numba": []}
    results = {}
    for rep in range(args.loss_repeats):
        for name in (("cdist", "numba") if rep % 2 == 0 else ("numba", "cdist")):
            student, teacher = build_inputs(shape)  # the same seeded inputs, fresh leaves (not timed)
            with numba_hidden() if name == "cdist" else contextlib.nullcontext():
                t0 = time.perf_counter()
                out = loss_fn(student, teacher)
                out.loss.backward()
                times[name].append(time.perf_counter() - t0)
            print(f"    EMKDLoss fused, L1 {name}: {times[name][-1]:.2f} s", flush=True)
            results[name] = (out.components(), [m[1].tolist() for m in out.matches],
                             student.hidden.grad.clone(), student.head_weight.grad.clone())
    (ref_c, ref_m, ref_gh, ref_gw), (c, m, gh, gw) = results["cdist"], results["numba"]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print("| EMKDLoss fused, forward + backward | median (s) |")
    print("| --- | ---: |")
    for name in ("cdist", "numba"):
        print(f"| L1 cost {name} | {med[name]:.2f} |")
    grad_err = {k: float((g - r).abs().max() / r.abs().max()) for k, g, r in (("hidden", gh, ref_gh),
                                                                               ("head", gw, ref_gw))}
    print(f"numba / cdist time {med['numba'] / med['cdist']:.3f} x; loss terms max rel. diff "
          + ", ".join(f"{k} {abs(c[k] - ref_c[k]) / max(abs(ref_c[k]), 1e-30):.1e}" for k in ref_c)
          + "; gradients (max abs diff / max abs) " + ", ".join(f"{k} {v:.1e}" for k, v in grad_err.items())
          + f"; same matches: {m == ref_m}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--nt", type=int, default=729)
    parser.add_argument("--ns", type=int, default=144)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--e2e-repeats", type=int, default=2, help="calls of head_l1_cost per configuration (0: skip)")
    parser.add_argument("--loss-repeats", type=int, default=0, help="EMKDLoss calls per L1 backend (0: skip)")
    parser.add_argument("--probe-seconds", type=float, default=0.1,
                        help="length of one probe measurement (it includes one parallel launch, 0.02-7 ms here)")
    parser.add_argument("--threading-layer", default=None, choices=("omp", "tbb", "workqueue"),
                        help="numba threading layer for this process (default: numba's choice, omp here)")
    parser.add_argument("--backends", nargs="+", default=None, choices=[b for b in l1_kernels.BACKENDS if b != "auto"],
                        help="run only a timed pass of these L1 backends on --device (the first is the reference)")
    parser.add_argument("--device", default="cpu", help="device of the --backends pass, e.g. cuda or cuda:1")
    args = parser.parse_args()
    if args.backends:
        backends_only(args)
        return
    if args.device != "cpu":
        raise SystemExit("benchmarks/l1_bench.py: --device is for the --backends pass, e.g. --backends cdist triton")
    if not l1_kernels.numba_available():
        raise SystemExit("benchmarks/l1_bench.py needs numba: pip install 'emkd[fast]'")
    import numba

    if args.threading_layer:
        numba.config.THREADING_LAYER = args.threading_layer  # before numba's first parallel launch
    print(f"python benchmarks/l1_bench.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU(s), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), numba {numba.__version__}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"V={args.vocab}, D={args.hidden}, B={args.batch}, Ns={args.ns}, Nt={args.nt}, chunk {args.chunk_size}")

    probe = Probe(args.probe_seconds)
    rates = [probe.rate() for _ in range(5)]
    print(f"\n1. probe: sustained |x - c| accumulate rate on {probe.threads} thread(s), {args.probe_seconds * 1e3:.0f} "
          f"ms per measurement: median {statistics.median(rates) / 1e9:.1f} G/s, best {max(rates) / 1e9:.1f} G/s "
          f"(part 2 measures it again after every 4th chunk); numba threading layer {numba.threading_layer()}", flush=True)

    print("\n2. L1 kernels on the same logit chunks (logits not timed), cdist and numba alternating per chunk")
    print("| inputs | cdist (s) | numba (s) | numba / cdist speed | median per chunk | cdist G/s | numba G/s | "
          "probe G/s (median over chunks) | numba % of probe | cost max rel. diff | matches changed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    passes = {}
    for kind in args.kinds:
        r = passes[kind] = kernels_pass(kind, args, probe)
        s = r["seconds"]
        print(f"| {kind} | {s['cdist']:.2f} | {s['numba']:.2f} | {s['cdist'] / s['numba']:.1f} x | "
              f"{r['chunk_ratio_median']:.1f} x | {r['abs_diffs'] / s['cdist'] / 1e9:.2f} | "
              f"{r['abs_diffs'] / s['numba'] / 1e9:.2f} | {r['probe'] / 1e9:.1f} | "
              f"{100 * r['abs_diffs'] / s['numba'] / r['probe']:.0f} % | "
              f"{r['numba_rel_diff']:.1e} | {r['numba_changed']} of {r['matches']} |", flush=True)

    print("\n   bfloat16 matching logits (numba L1), against the float32 cdist reference")
    print("| inputs | logits float32 (s) | logits bfloat16 (s) | cost max rel. diff | matches changed |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, r in passes.items():
        s = r["seconds"]
        print(f"| {kind} | {s['logits_f32']:.2f} | {s['logits_bf16']:.2f} | {r['bf16_rel_diff']:.1e} | "
              f"{r['bf16_changed']} of {r['matches']} |")

    if args.e2e_repeats > 0:
        print(f"\n3. head_l1_cost (logits + L1) on the random inputs, median of {args.e2e_repeats}, interleaved",
              flush=True)
        medians = end_to_end(args)
        print("| configuration | median (s) | speed-up over cdist |")
        print("| --- | ---: | ---: |")
        for name, seconds in medians.items():
            print(f"| {name} | {seconds:.2f} | {medians['cdist'] / seconds:.1f} x |")
    if args.loss_repeats > 0:
        print(f"\n4. EMKDLoss (fused) forward + backward, L1 cost numba against cdist, median of {args.loss_repeats}",
              flush=True)
        whole_loss(args)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

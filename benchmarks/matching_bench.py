"""Wall time of the two vision-token matching backends, SciPy and the batched auction, at two scales.

Each case is a batch of ``B`` cost matrices ``[Ns, Nt]``, L1 distances between random "logit" rows as EM-KD computes
them (SPEC §2): the paper's scale (144 student tokens against 729 teacher tokens per tile) and the demo's (16 x 64).
Cost construction is not timed. For each backend the script prints the median wall time of ``--runs`` calls of
``hungarian_match_batch`` and, per case, how far the auction's total cost is from SciPy's optimum.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/matching_bench.py [--runs 7] [--vocab 4096] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from emkd.matching import hungarian_match_batch, l1_cost

CASES = (("paper", 2, 144, 729), ("demo", 2, 16, 64))  # (name, B, Ns, Nt)


def make_costs(batch: int, ns: int, nt: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """``batch`` float32 costs ``[ns, nt]``: L1 distances between random logits of width ``vocab`` (about 1e4-1e5)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        l1_cost(torch.randn(ns, vocab, generator=gen) * 3, torch.randn(nt, vocab, generator=gen) * 3)
        for _ in range(batch)
    ]


def median_seconds(fn, runs: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def total(cost: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    idx_s, idx_t = pairs
    return float(cost.double().cpu()[idx_s.cpu(), idx_t.cpu()].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed calls per backend and case (median reported)")
    parser.add_argument("--vocab", type=int, default=4096, help="width of the random logit rows behind the costs")
    parser.add_argument("--device", default="cpu", help="device of the auction backend (SciPy always runs on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), auction on {device}")
    header = f"{'case':<6} {'B x Ns x Nt':<14} {'scipy ms':>9} {'auction ms':>11} {'ratio':>6} {'max rel. excess':>16}"
    print(header)
    for name, batch, ns, nt in CASES:
        costs = make_costs(batch, ns, nt, args.vocab, args.seed)
        on_device = [cost.to(device) for cost in costs]
        t_scipy = median_seconds(lambda: hungarian_match_batch(costs, backend="scipy"), args.runs, torch.device("cpu"))
        t_auction = median_seconds(lambda: hungarian_match_batch(on_device, backend="auction"), args.runs, device)
        reference = hungarian_match_batch(costs, backend="scipy")
        auction = hungarian_match_batch(on_device, backend="auction")
        excess = max(
            (total(cost, got) - total(cost, ref)) / total(cost, ref)
            for cost, got, ref in zip(costs, auction, reference)
        )
        print(
            f"{name:<6} {f'{batch} x {ns} x {nt}':<14} {t_scipy * 1e3:>9.2f} {t_auction * 1e3:>11.2f} "
            f"{t_auction / t_scipy:>6.1f} {excess:>16.2e}"
        )


if __name__ == "__main__":
    main()

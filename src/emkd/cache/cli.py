"""``emkd cache-teacher``: write a teacher cache and report its size, or check one (``--verify DIR``)."""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

from emkd.cache.format import CACHE_DTYPES, DEFAULT_SHARD_BYTES
from emkd.cache.reader import TeacherCache
from emkd.cache.writer import cache_teacher
from emkd.errors import UserError

# top-k logits the size report compares with: k, and the bytes of one value in each dtype (+ an int32 index)
TOPK_SIZES = (8, 32, 100)
TOPK_VALUE_BYTES = {"float16": 2, "float32": 4}


def storage_summary(index: dict[str, Any]) -> dict[str, Any]:
    """Sizes of a cache (its ``index.json``) and, for comparison, of top-k logits at the same positions.

    Returns:
        ``num_samples``; ``sample_bytes`` (all shards) and ``total_bytes`` (shards + LM head); ``bytes_per_sample``
        (shards / samples); ``positions_per_sample`` (mean real tokens); and ``topk`` ``{k: {"float16": bytes,
        "float32": bytes}}``, the bytes per sample of the top-``k`` logits at every real position stored as a value
        in that dtype plus an int32 token index.
    """
    n = int(index["num_samples"])
    sample_bytes = sum(index["shard_sizes"])
    positions = sum(index["samples"]["length"]) / n
    return {
        "num_samples": n,
        "sample_bytes": sample_bytes,
        "total_bytes": sample_bytes + int(index["head_bytes"]),
        "bytes_per_sample": sample_bytes / n,
        "positions_per_sample": positions,
        "topk": {k: {name: positions * k * (size + 4) for name, size in TOPK_VALUE_BYTES.items()} for k in TOPK_SIZES},
    }


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``emkd cache-teacher``: ``TEACHER_DIR DATA --out DIR [...]`` writes a cache; ``--verify DIR``
    checks one (and takes no other argument)."""
    parser.usage = "%(prog)s TEACHER_DIR DATA --out DIR [options]\n       %(prog)s --verify CACHE_DIR"
    parser.add_argument("teacher", metavar="TEACHER_DIR", nargs="?", help="teacher checkpoint directory")
    parser.add_argument("data", metavar="DATA", nargs="?", help="training records (LLaVA JSON/JSONL or HF messages)")
    parser.add_argument("--images", default=None, help="directory image paths resolve against (default: the data "
                        "file's directory)")
    parser.add_argument("--out", default=None, help="the cache directory to create (needed unless --verify)")
    parser.add_argument("--verify", metavar="CACHE_DIR", default=None,
                        help="check an existing cache instead of writing one: its index, the size and SHA-256 of every "
                        "file, and every sample's tensor names, shapes and dtypes; prints each problem and exits 1 if "
                        "any, 0 if none (2 when CACHE_DIR is not a readable cache). Opening a cache for training "
                        "already checks each shard's SHA-256 when it is first read")
    parser.add_argument("--allow-outside-images", action="store_true",
                        help="as the recipe's data.allow_outside_images: read image paths that are absolute or climb "
                        "out of --images")
    parser.add_argument("--template", choices=("chat", "plain"), default="chat", help="as the recipe's data.template")
    parser.add_argument("--max-length", type=int, default=2048, help="as the recipe's data.max_length")
    parser.add_argument("--on-bad-sample", choices=("error", "skip"), default="error",
                        help="as the recipe's data.on_bad_sample")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per teacher forward")
    parser.add_argument("--dtype", choices=CACHE_DTYPES, default="float32",
                        help="dtype the hidden states are stored in")
    parser.add_argument("--teacher-dtype", choices=CACHE_DTYPES, default="float32", help="dtype the teacher runs in")
    parser.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="approximate MiB per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache directory")


def run_verify(cache_dir: str | os.PathLike, progress: bool = True) -> int:
    """``emkd cache-teacher --verify DIR``: print every problem of a cache; return 1 if any, else 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cache without checksums is reported below
        cache = TeacherCache(cache_dir, check_files=False)
    problems = cache.verify(progress=progress)
    for problem in problems:
        print(f"{cache_dir}: {problem}")
    files = len(cache.index["shards"]) + 1
    if problems:
        print(f"{cache_dir}: {len(problems)} problem(s) in {files} files and {cache.num_samples} samples")
        return 1
    print(f"{cache_dir}: {files} files and {cache.num_samples} samples verified (sizes, SHA-256, tensor shapes)")
    return 0


def run_cache_teacher(args: argparse.Namespace) -> int:
    """``emkd cache-teacher``: write the cache, then print its size and what top-k logits would take, or, with
    ``--verify DIR``, check an existing cache (:func:`run_verify`)."""
    if args.verify is not None:
        given = [name for name, value in (("TEACHER_DIR", args.teacher), ("DATA", args.data), ("--out", args.out))
                 if value is not None]
        if given:
            raise UserError(f"--verify CACHE_DIR checks an existing cache and takes no {', '.join(given)}")
        return run_verify(args.verify)
    missing = [name for name, value in (("TEACHER_DIR", args.teacher), ("DATA", args.data), ("--out DIR", args.out))
               if value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: write a cache with `emkd cache-teacher TEACHER_DIR DATA --out "
                        "DIR`, or check one with `emkd cache-teacher --verify DIR`")
    index = cache_teacher(
        args.teacher, args.data, args.images, args.out, template=args.template, max_length=args.max_length,
        batch_size=args.batch_size, dtype=args.dtype, shard_bytes=max(1, int(args.shard_mb * 2**20)),
        teacher_dtype=args.teacher_dtype, on_bad_sample=args.on_bad_sample, overwrite=args.overwrite,
        allow_outside_images=getattr(args, "allow_outside_images", False),
    )
    _print_sizes(index, args.out)
    return 0


def _print_sizes(index: dict[str, Any], out: str) -> None:
    size = storage_summary(index)
    print(
        f"cached {size['num_samples']} samples in {out}: {size['total_bytes']:,} bytes in total "
        f"({len(index['shards'])} shard file(s), and the LM head, {index['head_bytes']:,} bytes)"
    )
    print(
        f"bytes per sample: {size['bytes_per_sample']:,.0f} (hidden D={index['hidden_size']} in {index['dtype']} at "
        f"{size['positions_per_sample']:.1f} positions per sample)"
    )
    print("top-k logits at the same positions (value + int32 index), bytes per sample:")
    for k, by_dtype in size["topk"].items():
        print(f"  k={k:<4d} float16 {by_dtype['float16']:>14,.0f}   float32 {by_dtype['float32']:>14,.0f}")


__all__ = ["add_cache_arguments", "run_cache_teacher", "run_verify", "storage_summary"]

"""The ``emkd`` command line: ``emkd <command> [options]``."""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emkd",
        description="Distill efficient multimodal LLMs (few vision tokens) from vanilla teachers with EM-KD, "
        "LLaVA-KD, Align-TI and response KD.",
    )
    parser.add_argument("--version", action="store_true",
                        help="print the versions of emkd, Python and the libraries it depends on, and exit")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of errors in what was given (a recipe, a path, a record); "
                        "also EMKD_DEBUG=1")
    sub = parser.add_subparsers(dest="command", metavar="command")
    demo = sub.add_parser("demo", help="distill a tiny efficient MLLM on real data and print the comparison")
    demo.add_argument("--quick", action="store_true",
                      help="a pipeline check on a tiny budget (seconds when idle, under a minute when busy): every "
                      "stage runs, but the students do not learn enough for their scores to mean anything")
    demo.add_argument("--out", default="runs/demo",
                      help="where data, checkpoints and the report go (a previous demo's runs there are replaced)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--methods", default="sft,emkd", help="comma-separated phase-2 methods to compare")
    demo.add_argument("--retrain-teacher", action="store_true", help="train the teacher even if one is cached")
    demo.set_defaults(func=_run_demo)

    rep = sub.add_parser("reproduce", help="the analogues of EM-KD Tables 2 and 3 over seeds, with paired "
                         "confidence intervals, and accuracy against TTFT per token budget -> docs/results.md")
    rep.add_argument("--out", default="runs/reproduce", help="where data, checkpoints and evaluations go")
    rep.add_argument("--seeds", type=_int_list, default="0,1,2,3,4",
                     help="comma-separated seeds; paired intervals need at least 2 (default: 0,1,2,3,4)")
    rep.add_argument("--steps", type=int, default=250, help="phase-2 steps per run")
    rep.add_argument("--results", default="docs/results.md",
                     help="markdown file the tables are written to; the plot goes to figures/ next to it")
    budgets = rep.add_mutually_exclusive_group()
    budgets.add_argument("--budgets", type=_int_list, default="4,16,64",
                         help="vision tokens per image of the SFT and EM-KD students of the accuracy-against-TTFT "
                         "table (squares up to 64: the teacher's 8 x 8 grid pooled to p x p; default: 4,16,64; "
                         "empty: none)")
    budgets.add_argument("--no-budgets", dest="budgets", action="store_const", const=(),
                         help="skip the token-budget students")
    rep.add_argument("--no-tables", dest="tables", action="store_false",
                     help="run the token budgets only (no Table 2 / Table 3 variants)")
    rep.add_argument("--quick", action="store_true", help="a tiny budget, to check the pipeline")
    rep.add_argument("--jobs", type=int, default=1,
                     help="seeds trained at once, each in its own process with CPU cores / JOBS torch threads "
                     "(default: 1)")
    rep.add_argument("--phase1-seed", type=int, default=None, metavar="SEED",
                     help="start every seed's students from one phase 1 per token budget, trained once with SEED, so "
                     "that the seeds differ in phase 2 alone (default: each seed trains its own phase 1)")
    rep.set_defaults(func=_run_reproduce)

    train = sub.add_parser("train", help="train a student from a YAML recipe", epilog=TRAIN_EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/); omit to start from defaults")
    train.add_argument("--help-method", metavar="METHOD",
                       help="print METHOD's loss, flags and loss options (type, default, meaning) and exit")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe key, e.g. --set method=kd --set data.train=train.json")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--resume", action="store_true",
                       help="continue the run in output_dir from its newest intact checkpoint of the same recipe "
                       "(damaged ones are set aside with a warning)")
    where.add_argument("--overwrite", action="store_true",
                       help="delete the run already in output_dir (checkpoints, final, logs) and start over; "
                       "without --resume or --overwrite, output_dir must be empty or absent")
    train.set_defaults(func=_run_train)

    init = sub.add_parser("init-student", help="build an efficient student for a teacher (--from-teacher) or from "
                          "SigLIP/CLIP + causal-LM checkpoints")
    from emkd.models.compose import add_init_student_arguments, run_init_student

    add_init_student_arguments(init)
    init.set_defaults(func=run_init_student)

    ev = sub.add_parser("eval", help="accuracy per category, vision tokens per image and time to first token")
    from emkd.evaluation import add_eval_arguments, run_eval

    add_eval_arguments(ev)
    ev.set_defaults(func=run_eval)

    irs = sub.add_parser("irs", help="Align-TI: Instruction-Relevance Score of every teacher layer (JSON + plot)")
    from emkd.training.irs import add_irs_arguments, run_irs

    add_irs_arguments(irs)
    irs.set_defaults(func=run_irs)

    cache = sub.add_parser("cache-teacher", help="run a teacher once over training data and store what the losses "
                           "need (train with --set teacher_cache=DIR)")
    from emkd.cache.cli import add_cache_arguments, run_cache_teacher

    add_cache_arguments(cache)
    cache.set_defaults(func=run_cache_teacher)

    data = sub.add_parser("data", help="inspect LLaVA-format data")
    data_sub = data.add_subparsers(dest="data_command", metavar="subcommand")
    check = data_sub.add_parser("check", help="list every bad record of a data file with its line or index")
    from emkd.data.check import add_check_arguments, run_check

    add_check_arguments(check)
    check.set_defaults(func=run_check)
    data.set_defaults(func=lambda args: data.print_help() or 0)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from emkd.demo.pipeline import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, methods=tuple(args.methods.split(",")),
             retrain_teacher=args.retrain_teacher)
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; ``""`` -> ``()``."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None


def _run_reproduce(args: argparse.Namespace) -> int:
    from emkd.demo.reproduce import run_reproduce

    run_reproduce(args.out, seeds=args.seeds, steps=args.steps, results_md=args.results, quick=args.quick,
                  budgets=args.budgets, tables=args.tables, jobs=args.jobs, phase1_seed=args.phase1_seed)
    return 0


TRAIN_EXIT_CODES = """exit status:
  0        training finished; output_dir/final holds the model
  2        something given is wrong: a recipe value, a path, a data record, or output_dir (in use, holding
           another run, no intact checkpoint to resume); the message says which
  3        training stopped on a NaN/inf loss, loss component, gradient norm or weight (on_nonfinite=stop, or
           max_consecutive_nonfinite reached); nothing non-finite was saved: the newest complete checkpoint is the
           last good one
  128+N    interrupted by signal N (130: SIGINT / Ctrl-C, 143: SIGTERM): a checkpoint of the current step was saved
           (unless a second signal came first); continue with --resume
"""


def _run_train(args: argparse.Namespace) -> int:
    import signal

    from emkd.training.config import load_recipe
    from emkd.training.run import train

    if args.help_method:
        from emkd.errors import UserError
        from emkd.training.methods import describe_method

        try:
            print(describe_method(args.help_method))
        except ValueError as e:
            raise UserError(f"--help-method: {e}") from None
        return 0
    config = load_recipe(args.recipe, args.overrides)
    source = args.recipe or "the recipe (defaults and --set)"
    try:
        summary = train(config, resume=args.resume, source=source, overwrite=args.overwrite)
    except KeyboardInterrupt as e:  # Ctrl-C before training started, or a second signal while saving was pending
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"emkd train: stopped at once by {signal.Signals(signum).name}; nothing was saved from the current "
              f"step; --resume continues from the newest complete checkpoint", file=sys.stderr)
        return 128 + signum
    if summary["interrupted"]:
        signum = signal.Signals[summary["signal"]]
        print(f"emkd train: interrupted by {signum.name} at step {summary['global_step']}: saved "
              f"{summary['last_complete_checkpoint']}; continue with --resume", file=sys.stderr)
        return 128 + signum.value
    print(f"done: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from emkd.compat import installed_versions

        print(" ".join(f"{name} {version}" for name, version in installed_versions().items()))
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from emkd.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug or os.environ.get("EMKD_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        print(f"emkd {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())

"""`emkd reproduce`: the statistics on hand-computed values, the markdown on synthetic results, and one `--quick` run
(two seeds, token budgets 4 and 16) in which every Table 2 / Table 3 variant trains, is evaluated and is reported."""

import json
import math
import re
import statistics
import subprocess
import sys
import time

from pathlib import Path

import pytest
from scipy import stats

from emkd.cli import build_parser
from emkd.demo.reproduce import (
    BUDGET_ROWS,
    FINE_GRAINED,
    MAIN_TOKENS,
    NOT_SHOWN,
    TABLE2,
    TABLE3,
    Reproduction,
    SeedDifference,
    _variant_key,
    last_logged,
    paired_seed_difference,
    points,
    pool_size_for,
    resolution_lines,
    results_markdown,
    run_reproduce,
    seeds_for_half_width,
    t_quantile,
)
from emkd.errors import UserError
from emkd.evaluation import EvalResult, Prediction

CI_CELL = re.compile(r"^[+−]\d+\.\d \[[+−]\d+\.\d, [+−]\d+\.\d\]$")  # +1.2 [−0.3, +2.7]
MEAN_STD_CELL = re.compile(r"^\d+\.\d ± \d+\.\d$")


# ---- statistics -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q, dof, expected", [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 9, 2.262), (0.975, 30, 2.042),
    (0.95, 4, 2.132), (0.995, 10, 3.169),
])
def test_t_quantile_matches_the_printed_table(q, dof, expected):
    assert t_quantile(q, dof) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("q, dof", [(0.0, 4), (1.0, 4), (0.975, 0)])
def test_t_quantile_refuses_impossible_arguments(q, dof):
    with pytest.raises(ValueError, match="t_quantile"):
        t_quantile(q, dof)


def test_paired_seed_difference_by_hand():
    d = paired_seed_difference([10.0, 12.0, 14.0], [9.0, 10.0, 11.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.302653 / math.sqrt(3)
    assert (d.mean, d.sd, d.n) == (2.0, 1.0, 3)
    assert (d.low, d.high) == pytest.approx((2 - half, 2 + half))
    assert d.half_width == pytest.approx(half)
    assert str(d) == "+2.0 [−0.5, +4.5]"  # a minus sign, not a hyphen


def test_paired_seed_difference_matches_a_one_sample_t_interval():
    a, b = [31.5, 28.0, 35.25, 30.0, 29.5], [30.0, 29.0, 31.0, 27.5, 30.5]
    d = paired_seed_difference(a, b)
    reference = stats.ttest_1samp([x - y for x, y in zip(a, b)], 0.0).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((reference.low, reference.high))
    assert d.mean == pytest.approx(statistics.fmean(a) - statistics.fmean(b))


def test_paired_seed_difference_edge_cases():
    one = paired_seed_difference([3.0], [1.0])
    assert one.n == 1 and math.isinf(one.half_width) and str(one) == "+2.0 (1 seed: no CI)"
    same = paired_seed_difference([5.0, 6.0], [5.0, 6.0])
    assert same.half_width == 0 and str(same) == "+0.0 [+0.0, +0.0]"
    assert str(paired_seed_difference([0.0, 0.0], [0.03, 0.03])) == "+0.0 [+0.0, +0.0]"  # no "−0.0"
    with pytest.raises(ValueError, match="seed by seed"):
        paired_seed_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no values"):
        paired_seed_difference([], [])


def test_seeds_for_half_width():
    # t(n - 1) * 2 / sqrt(n) <= 2: n = 6 gives 2.571 > 2.449, n = 7 gives 2.447 <= 2.646
    assert seeds_for_half_width(2.0, 2.0) == 7
    assert seeds_for_half_width(0.0, 2.0) == 2
    assert seeds_for_half_width(1e6, 2.0, limit=50) is None


@pytest.mark.parametrize("tokens, pool", [(1, 1), (4, 2), (16, 4), (64, 8)])
def test_pool_size_for_budgets(tokens, pool):
    assert pool_size_for(tokens) == pool


@pytest.mark.parametrize("tokens", [0, -4, 10, 81])
def test_pool_size_for_refuses_other_budgets(tokens):
    with pytest.raises(UserError, match=f"got {tokens}"):
        pool_size_for(tokens)


def test_last_logged_reads_the_last_value_and_tolerates_absent_keys(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [
        {"step": 1, "loss": 3.0},
        {"step": 2, "loss": 2.0, "match_in_window": 0.25, "match_in_window_random": 0.0625},
        {"step": 3, "loss": 1.0, "match_in_window": 0.5},
        {"train_runtime": 12.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + "[1, 2]\n" + '{"step": 4, "match_in_win')
    keys = ("match_in_window", "match_in_window_random")
    assert last_logged(log, keys) == {"match_in_window": 0.5, "match_in_window_random": 0.0625}
    assert last_logged(log, ("absent",)) == {}
    assert last_logged(tmp_path / "missing.jsonl", keys) == {}


# ---- markdown on synthetic results ----------------------------------------------------------------------------------
def _result(accuracy: dict[str, float], ttft: float | None = 5.0, tokens: float | None = 16.0) -> EvalResult:
    counts = {f: 20 for f in accuracy}
    correct = {f: round(20 * a) for f, a in accuracy.items()}
    return EvalResult(
        model="m", data="test.json", num_samples=20 * len(accuracy), accuracy=accuracy, counts=counts,
        correct=correct, average=statistics.fmean(accuracy.values()),
        micro_accuracy=sum(correct.values()) / (20 * len(accuracy)), vision_tokens_per_image=tokens, ttft_ms=ttft,
        ttft_samples_ms=[] if ttft is None else [ttft] * 3, ttft_threads=1, ttft_warmup=2, ttft_sample_id="0",
        ttft_method="prefill", max_new_tokens=8, batch_size=1,
    )


def _synthetic() -> Reproduction:
    """Three seeds. SFT's fine-grained average is 20, 21, 22 (chart 20 / 22 / 24, grid 20); EM-KD's 21, 23, 25, so
    its paired difference is 1, 2, 3 (+2.0 [−0.5, +4.5]); every other variant is SFT plus a constant."""
    sft_chart = [0.20, 0.22, 0.24]
    scores = {}
    for k, (method, loss) in enumerate({**TABLE2, **TABLE3}.values()):
        key = _variant_key(method, loss)
        if key == "emkd":
            chart = [0.22, 0.26, 0.30]
        else:
            chart = [c + 0.02 * (k % 3) for c in sft_chart] if key != "sft" else sft_chart
        scores[key] = [_result({"chart": c, "general": 0.5, "grid": 0.2}) for c in chart]
    budgets = {
        4: {name: [_result({"chart": 0.1 + 0.01 * s, "general": 0.4, "grid": 0.2}, ttft=3.0 + 0.1 * s, tokens=4.0)
                   for s in range(3)] for name in BUDGET_ROWS},
        16: {name: scores[_variant_key(*TABLE2[name])] for name in BUDGET_ROWS},
    }
    matching = {_variant_key(m, l): [{}, {}, {}] for m, l in {**TABLE2, **TABLE3}.values()}
    matching["llava_kd"] = [{"match_in_window": 0.5, "match_in_window_random": 0.0625},
                            {"match_in_window": 0.7, "match_in_window_random": 0.0625}, {}]
    timings = [{"seed": 0, "run": "phase1-16tok", "kind": "phase1", "train_s": 30.0, "eval_s": 0.0},
               {"seed": 0, "run": "sft", "kind": "phase2", "train_s": 50.0, "eval_s": 10.0}]
    return Reproduction(
        command="emkd reproduce --seeds 0,1,2 --steps 250 --budgets 4,16", seeds=(0, 1, 2), steps=250,
        teacher=_result({"chart": 0.3, "general": 0.6, "grid": 0.4}, ttft=7.5, tokens=64.0), scores=scores,
        budgets=budgets, matching=matching, timings=timings, wall_seconds=3725.0, machine="a test machine",
    )


def _rows(text: str, name: str) -> list[list[str]]:
    """The cells of every table row of ``text`` that starts with ``| name |``."""
    return [[c.strip() for c in line.strip("|").split("|")][1:] for line in text.splitlines()
            if line.startswith(f"| {name} |")]


def _predictions(category: str, answers: list[str], predicted: list[str]) -> list[Prediction]:
    return [Prediction(id=str(i), category=category, question="q", answer=a, prediction=p, correct=a == p)
            for i, (a, p) in enumerate(zip(answers, predicted))]


def test_constant_answers_names_families_answered_with_one_answer():
    result = _result({"chart": 0.1, "general": 1.0, "grid": 0.5})
    digits = [str(i % 10) for i in range(20)]  # 20 records per family, as `_result` counts them
    result.predictions = (_predictions("chart", digits, ["1"] * 20)  # one answer to 10 different ones: a collapse
                          + _predictions("general", ["yes"] * 20, ["yes"] * 20)  # one reference answer: fine
                          + _predictions("grid", digits, digits))  # learned
    assert result.constant_answers() == {"chart": "1"}
    assert result.constant_answers(min_records=21) == {}  # too few records to tell
    assert EvalResult.from_dict(result.to_dict()).constant_answers() == {"chart": "1"}


def test_results_markdown_names_the_runs_that_answer_with_a_constant():
    rep = _synthetic()
    text = results_markdown(rep)
    runs = 3 * (len(rep.scores) + 2)  # every Table 2 / 3 variant, and the 4-token budget's SFT and EM-KD
    assert f"No student run gave one answer to every held-out record of a family ({runs} runs checked)." in text
    digits = [str(i % 10) for i in range(20)]
    rep.budgets[4]["SFT"][2].predictions = _predictions("chart", digits, ["1"] * 20) + _predictions(
        "grid", digits, digits)
    text = results_markdown(rep)
    assert f"1 of {runs} student runs gave one and the same answer" in text
    assert _rows(text, "SFT, 4 tokens") == [["2", 'chart ("1")']]


def test_points_fine_grained_average_leaves_out_general():
    p = points(_result({"chart": 0.2, "general": 0.9, "grid": 0.4}), ["chart", "general", "grid"])
    assert p[FINE_GRAINED] == pytest.approx(30.0) and p["avg"] == pytest.approx(50.0)


def test_results_markdown_layout_on_synthetic_results():
    text = results_markdown(_synthetic(), "figures/token_budget.png")
    for header in ("# Results", "## Table 2 analogue: distillation methods", "## Table 3 analogue: EM-KD ablations",
                   "## Resolution", "## Token budget: accuracy against time to first token", "## Matching quality",
                   "## Students that answer a family with a constant", "## What this does not show"):
        assert f"\n{header}\n" in f"\n{text}\n", header
    assert "Command: `emkd reproduce --seeds 0,1,2 --steps 250 --budgets 4,16`." in text
    assert "Wall time: 1 h 02 min in total; 60 s per phase-2 run" in text and "Machine: a test machine." in text
    assert "| variant | chart | general | grid | fine-grained | avg |" in text
    for name in list(TABLE2) + list(TABLE3):
        mean_std, difference = _rows(text, name)[:2]  # the accuracy table, then the paired-difference table
        assert len(mean_std) == 5 and all(MEAN_STD_CELL.match(c) for c in mean_std), mean_std
        if name == "SFT":
            assert difference == ["(reference)"] * 5
        else:
            assert all(CI_CELL.match(c) for c in difference), difference
    assert _rows(text, "EM-KD")[1][3] == "+2.0 [−0.5, +4.5]"  # the fine-grained column, as computed by hand
    assert _rows(text, "EM-KD")[0][3] == "23.0 ± 2.0"
    assert "Student t with n − 1 = 2 degrees of freedom" in text
    assert "only for 8 of 9 variants" in text  # EM-KD's half-width is 2.5 points, the others' 0
    budget_rows = _rows(text, "student, EM-KD")
    assert [r[0] for r in budget_rows] == ["4", "16"] and all(CI_CELL.match(c) for c in budget_rows[0][4:])
    assert _rows(text, "teacher")[0][:4] == ["64", "7.50", "35.0", "43.3"]
    assert "![accuracy against time to first token](figures/token_budget.png)" in text
    assert _rows(text, "LLaVA-KD*")[-1] == ["0.600 ± 0.141", "0.062 ± 0.000", "2 of 3"]
    assert _rows(text, "matching: avgpool")[-1] == ["—", "—", "0 of 3"]
    assert all(f"- {sentence}" in text for sentence in NOT_SHOWN)


def test_resolution_verdicts():
    def diff(half: float) -> SeedDifference:
        return SeedDifference(1.0, 1.0 - half, 1.0 + half, half, 5)

    assert "**resolves**" in resolution_lines({"a": diff(1.0), "b": diff(1.9)})[0]
    assert "**does not resolve**" in resolution_lines({"a": diff(2.5), "b": diff(3.0)})[0]
    some = resolution_lines({"a": diff(1.5), "b": diff(3.0)})[0]
    assert "only for 1 of 2 variants" in some and "(half-width ≤ 2 points: a)" in some
    assert "(3.0 points, b), 12 seeds would bring every half-width to 2 points or less" in some
    assert "no interval" in resolution_lines({"a": SeedDifference(1.0, -math.inf, math.inf, math.nan, 1)})[0]


def test_plot_accuracy_vs_ttft_writes_a_png(tmp_path):
    from emkd.demo.report import plot_accuracy_vs_ttft

    point = {"label": "4 tok", "ttft": (3.0, 0.2), "fine-grained": (20.0, 1.0), "avg": (30.0, 2.0)}
    unmeasured = {**point, "ttft": (None, None)}
    path = plot_accuracy_vs_ttft({"SFT": [point, unmeasured], "EM-KD": [unmeasured]},
                                 {"fine-grained": "fine-grained", "avg": "avg"}, tmp_path / "f" / "budget.png",
                                 reference={**point, "label": "teacher", "ttft": (7.0, 0.0)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reproduce_options():
    parser = build_parser()
    defaults = parser.parse_args(["reproduce"])
    assert defaults.seeds == (0, 1, 2, 3, 4) and defaults.budgets == (4, 16, 64)
    assert parser.parse_args(["reproduce", "--no-budgets"]).budgets == ()
    assert parser.parse_args(["reproduce", "--budgets", "", "--seeds", "3,4"]).budgets == ()
    assert parser.parse_args(["reproduce", "--budgets", "4,64"]).budgets == (4, 64)
    assert defaults.jobs == 1 and parser.parse_args(["reproduce", "--jobs", "2"]).jobs == 2
    assert defaults.phase1_seed is None and parser.parse_args(["reproduce", "--phase1-seed", "7"]).phase1_seed == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "--seeds", "0,x"])


# ---- one quick run --------------------------------------------------------------------------------------------------
def test_reproduce_quick_two_seeds_and_two_budgets(tmp_path):
    lines = []
    rep = run_reproduce(tmp_path / "rep", seeds=(0, 1), steps=2, results_md=tmp_path / "docs" / "results.md",
                        print_fn=lines.append, quick=True, budgets=(4, 16))
    text = (tmp_path / "docs" / "results.md").read_text()
    assert text == rep.markdown
    # a results file other than docs/results.md is part of the command that reproduces it
    results = (tmp_path / "docs" / "results.md").as_posix()
    assert f"Command: `emkd reproduce --quick --seeds 0,1 --steps 2 --budgets 4,16 --results {results}`." in text
    assert "`--quick` is a pipeline check" in text
    columns = len(rep.teacher.accuracy) + 2  # every family, fine-grained, avg
    for name in list(TABLE2) + list(TABLE3):
        mean_std, difference = _rows(text, name)[:2]
        assert len(mean_std) == columns and all(MEAN_STD_CELL.match(c) for c in mean_std), mean_std
        assert name == "SFT" or all(CI_CELL.match(c) for c in difference), difference
    assert all(len(results) == 2 for results in rep.scores.values())  # one result per seed
    # the token budgets: 16 reuses the Table 2 runs, 4 is its own student, pooled to 2 x 2
    assert set(rep.budgets) == {4, 16} and MAIN_TOKENS == 16
    assert rep.budgets[16]["EM-KD"] is rep.scores["emkd"]
    assert all(r.vision_tokens_per_image == 4 and r.ttft_ms is not None for r in rep.budgets[4]["EM-KD"])
    assert [r[0] for r in _rows(text, "student, SFT")] == ["4", "16"]
    assert (tmp_path / "docs" / "figures" / "token_budget.png").is_file()
    assert "](figures/token_budget.png)" in text
    assert "## Resolution" in text and "## Matching quality" in text and "## What this does not show" in text
    # every run timed; each seed's runs found in their output directories
    assert sum(t["kind"] == "phase1" for t in rep.timings) == 4  # (16 and 4 tokens) x 2 seeds
    assert sum(t["kind"] == "phase2" for t in rep.timings) == 2 * (len(rep.scores) + len(BUDGET_ROWS))
    assert (tmp_path / "rep" / "seed1" / "tokens4" / "emkd" / "eval.json").is_file()
    assert any("1 seed(s) to go, about" in line for line in lines)


def test_reproduce_jobs_runs_seeds_in_processes_and_keeps_seed_order(tmp_path):
    """``--jobs 2``: two seeds trained at once in spawned processes; every result lands under its seed, in order."""
    lines = []
    rep = run_reproduce(tmp_path / "rep", seeds=(1, 0), steps=2, results_md=None, print_fn=lines.append, quick=True,
                        budgets=(4,), tables=False, jobs=2)
    assert rep.command.endswith("--no-tables --jobs 2") and rep.jobs == 2
    for name in BUDGET_ROWS:
        models = [Path(r.model) for r in rep.budgets[4][name]]
        assert [m.parts[-4] for m in models] == ["seed1", "seed0"], models
        assert all(m.parts[-3] == "tokens4" for m in models)
    assert [t["seed"] for t in rep.timings if t["kind"] == "phase1"] == [1, 0]
    assert len(rep.timings) == 2 * (1 + len(BUDGET_ROWS))
    assert any(re.search(r"2 seeds at a time, \d+ torch thread\(s\) each", line) for line in lines)
    assert "seeds trained at once" in rep.markdown
    with pytest.raises(UserError, match="--jobs must be at least 1"):
        run_reproduce(tmp_path / "x", seeds=(0,), results_md=None, jobs=0)


def test_reproduce_phase1_seed_trains_one_phase1_that_every_seed_starts_from(tmp_path):
    """``--phase1-seed``: one phase 1 per token budget, trained once; the seeds differ in phase 2 alone."""
    rep = run_reproduce(tmp_path / "rep", seeds=(0, 1), steps=2, results_md=None, print_fn=lambda _: None,
                        quick=True, budgets=(4,), tables=False, jobs=2, phase1_seed=5)
    assert rep.command.endswith("--jobs 2 --phase1-seed 5") and rep.phase1_seed == 5
    assert [t["seed"] for t in rep.timings if t["kind"] == "phase1"] == [5]
    shared = tmp_path / "rep" / "phase1-seed5" / "tokens4" / "phase1" / "final"
    for name in BUDGET_ROWS:
        for seed, result in zip((0, 1), rep.budgets[4][name]):
            run = Path(result.model).parent  # .../seed{seed}/tokens4/<variant>
            assert run.parts[-3:-1] == (f"seed{seed}", "tokens4")
            config = json.loads((run / "recipe.json").read_text())
            assert Path(config["student"]) == shared, config["student"]
    assert not (tmp_path / "rep" / "seed0" / "tokens4" / "phase1").exists()
    assert "trained once with seed 5 (the seeds differ in phase 2's data order alone" in rep.markdown
    assert "each with its own phase 1 (one per budget, trained once with seed 5)" in rep.markdown


def test_results_markdown_of_a_budgets_only_run():
    """``--no-tables``: the token budgets alone, no Table 2 / 3, resolution or matching sections."""
    rep = _synthetic()
    rep.scores, rep.matching = {}, {}
    rep.command += " --no-tables"
    text = results_markdown(rep, "figures/token_budget.png")
    assert "\n## Token budget: accuracy against time to first token\n" in text
    assert "](figures/token_budget.png)" in text and "\n## What this does not show\n" in text
    for header in ("## Table 2 analogue", "## Table 3 analogue", "## Resolution", "## Matching quality"):
        assert header not in text, header


def test_no_tables_needs_budgets(tmp_path):
    with pytest.raises(UserError, match="--no-tables needs token budgets"):
        run_reproduce(tmp_path, seeds=(0,), budgets=(), tables=False, results_md=None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_ends_when_its_parent_is_killed():
    """``kill`` of ``emkd reproduce --jobs 2`` (SIGKILL here: the parent cleans nothing up) ends its workers too."""
    script = (
        "import concurrent.futures, multiprocessing, os, time\n"
        "from emkd.demo.reproduce import _end_with_parent\n"
        "pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                                              initializer=_end_with_parent, initargs=(os.getpid(),))\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(worker), f"worker {worker} outlived its killed parent"


def test_a_rerun_reuses_the_runs_an_interrupted_reproduce_finished(tmp_path):
    """An ``emkd reproduce`` stopped part-way keeps what it finished: the same command again reuses every run whose
    recipe, completion and held-out split match, and trains the rest; another step count trains phase 2 again."""
    def run(steps: int, lines: list[str]):
        return run_reproduce(tmp_path / "rep", seeds=(0,), steps=steps, results_md=None, print_fn=lines.append,
                             quick=True, budgets=(4,), tables=False)

    first = run(2, [])
    budget = tmp_path / "rep" / "seed0" / "tokens4"
    (budget / "emkd" / "summary.json").unlink()  # as if stopped while training EM-KD
    lines: list[str] = []
    again = run(2, lines)
    reused = [line for line in lines if "(reused: finished in" in line]
    assert len(reused) == 2 and any("phase 1 (4 vision tokens)" in line for line in reused), reused
    assert any(f"sft seed 0: avg {100 * first.budgets[4]['SFT'][0].average:.1f} (reused" in line for line in reused)
    assert again.budgets[4]["SFT"][0].accuracy == first.budgets[4]["SFT"][0].accuracy
    assert (budget / "emkd" / "summary.json").is_file()  # trained again, and finished this time
    assert [t.get("reused", False) for t in again.timings] == [True, True, False]
    assert "2 runs finished by an earlier, interrupted invocation of this command and reused" in again.markdown

    lines = []
    run(3, lines)  # other phase-2 recipes: phase 1 (the same) is reused, every phase-2 run trains again
    reused = [line for line in lines if "(reused: finished in" in line]
    assert len(reused) == 1 and "phase 1" in reused[0], reused

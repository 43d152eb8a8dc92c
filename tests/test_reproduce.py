"""`emkd reproduce --quick`: every Table 2 / Table 3 variant trains, is evaluated, and lands in the tables."""

from emkd.demo.reproduce import TABLE2, TABLE3, run_reproduce


def test_reproduce_quick_writes_both_tables(tmp_path):
    lines = []
    out = run_reproduce(tmp_path / "rep", seeds=(0, 1), steps=4, results_md=tmp_path / "results.md",
                        print_fn=lines.append, quick=True)
    text = (tmp_path / "results.md").read_text()
    assert "## Table 2 analogue" in text and "## Table 3 analogue" in text
    for name in list(TABLE2) + list(TABLE3):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert row.count("±") == len(out["teacher"].accuracy) + 1, row  # every family + avg, mean ± std
    assert all(len(results) == 2 for results in out["scores"].values())  # one result per seed
    assert "Command: `emkd reproduce --quick --seeds 0,1 --steps 4`" in text

import json
import subprocess
import sys

from emkd.cli import main


def test_module_prints_help():
    out = subprocess.run([sys.executable, "-m", "emkd"], capture_output=True, text=True, check=True)
    assert "usage: emkd" in out.stdout
    for command in ("demo", "train", "eval", "irs", "data", "init-student"):
        assert command in out.stdout


def test_main_without_command_returns_zero(capsys):
    assert main([]) == 0
    assert "usage: emkd" in capsys.readouterr().out


def test_demo_quick_runs_end_to_end(tmp_path):
    """`emkd demo --quick`: trains, evaluates teacher and both students, prints the table, writes the report."""
    from emkd.demo.pipeline import run_demo

    lines = []
    results = run_demo(tmp_path / "demo", quick=True, print_fn=lines.append)
    assert list(results) == ["teacher", "student-sft", "student-emkd"]
    families = {"general", "color", "counting", "ocr", "chart"}
    for name, result in results.items():
        assert set(result.accuracy) == families, name
        assert all(0.0 <= a <= 1.0 for a in result.accuracy.values())
        assert result.ttft_ms > 0
    assert results["teacher"].vision_tokens_per_image == 64
    assert results["student-sft"].vision_tokens_per_image == results["student-emkd"].vision_tokens_per_image == 16
    table = next(line for line in lines if "vis tok/img" in line)
    assert "student-emkd" in table and "teacher" in table
    assert "`--quick` is a pipeline check" in table and "say nothing about the methods" in table
    root = tmp_path / "demo"
    report = (root / "report.md").read_text()
    assert "`--quick` is a pipeline check" in report
    assert "## Does the matching match?" in report  # the emkd run logged its matches: its matching is drawn
    assert report.count("decode to the image's most common word") == 3  # teacher, SFT and EM-KD students
    for figure in ("loss_curves.png", "matching.png", "decoded_tokens.png"):
        assert (root / "figures" / figure).stat().st_size > 1000
        assert f"figures/{figure}" in report
    saved = json.loads((root / "results.json").read_text())
    assert set(saved) == set(results)
    emkd_log = [json.loads(line) for line in open(root / "student" / "emkd" / "log.jsonl") if "vsd" in line]
    assert emkd_log and all(k in emkd_log[0] for k in ("sup", "rld", "vsd", "vlad"))

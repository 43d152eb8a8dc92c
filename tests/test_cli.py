import subprocess
import sys

from emkd.cli import main
from emkd.demo.losses import run_loss_demo


def test_module_prints_help():
    out = subprocess.run([sys.executable, "-m", "emkd"], capture_output=True, text=True, check=True)
    assert "usage: emkd" in out.stdout
    assert "demo" in out.stdout


def test_main_without_command_returns_zero(capsys):
    assert main([]) == 0
    assert "usage: emkd" in capsys.readouterr().out


def test_loss_demo_every_term_falls():
    lines = []
    result = run_loss_demo(steps=40, seed=0, print_fn=lines.append)
    for term in ("loss", "sup", "vsd", "vlad"):
        assert result[f"last_{term}"] < 0.5 * result[f"first_{term}"], term
    assert result["last_rld"] < result["first_rld"]
    assert any(line.startswith("step   40") for line in lines)

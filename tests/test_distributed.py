"""`torchrun --nproc_per_node 2 -m emkd train` on CPU (gloo) gives the losses of one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _workspace import build_workspace, free_port


def _run(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _one_process_and_two(tmp_path: Path, ws: dict, train: Path, steps: int) -> None:
    """Train EM-KD for ``steps`` steps on one process (batch 4) and on two (batch 2 each): the logged losses, the
    gradient norms and the final weights agree."""
    args = ["--set", "method=emkd", "--set", f"student={ws['student']}", "--set", f"teacher={ws['teacher']}",
            "--set", f"data.train={train}", "--set", f"data.images={ws['images']}", "--set", f"max_steps={steps}",
            "--set", "learning_rate=0.003", "--set", "lr_scheduler=constant", "--set", "warmup_ratio=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    _run([sys.executable, "-m", "emkd", "train", *args, "--set", f"output_dir={tmp_path / 'one'}",
          "--set", "batch_size=4"], env)
    _run([torchrun, "--nproc_per_node", "2", "--master_port", free_port(), "-m", "emkd", "train", *args,
          "--set", f"output_dir={tmp_path / 'two'}", "--set", "batch_size=2"], env)

    def logs(name):
        return [json.loads(line) for line in open(tmp_path / name / "log.jsonl") if '"objective"' in line]

    one, two = logs("one"), logs("two")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        for key in ("loss", "sup", "rld", "vsd", "vlad", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is installed with torch")
def test_two_processes_match_one(tmp_path):
    # Every sample has the same number of response and vision tokens.
    ws = build_workspace(tmp_path / "ws", colours=["red"])
    _one_process_and_two(tmp_path, ws, ws["train"], steps=3)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is installed with torch")
def test_two_processes_match_one_with_unequal_samples(tmp_path):
    # Response lengths differ and one sample has no image, so each process's own means differ from the global ones:
    # only normalising by the counts of the whole step (summed over the processes) gives one process's losses. The
    # data set is one global batch, so every step sees the same samples however they are split.
    ws = build_workspace(tmp_path / "ws", num_samples=4)
    answers = ["red", "a small yellow square on a grey background", "one two three", "the square is green"]
    records = []
    for i, answer in enumerate(answers):
        question = "how many squares are there?" if i == 2 else "<image>\nwhat colour is the square?"
        record = {"id": str(i), "conversations": [{"from": "human", "value": question},
                                                  {"from": "gpt", "value": answer}]}
        if i != 2:
            record["image"] = f"{i}.png"
        records.append(record)
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    _one_process_and_two(tmp_path, ws, tmp_path / "mixed.json", steps=2)

"""The README's "Using your own models and data" as ``tools/own_models_walkthrough.sh`` runs it: every step exits 0
and leaves what the next one reads (a checked parquet file, an initialised student, a trained student with its
TensorBoard events, evaluation tables, and a student that loads through ``trust_remote_code``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_own_models_walkthrough_runs_as_written(tmp_path):
    work = tmp_path / "walkthrough"
    env = {**os.environ, "PY": sys.executable, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(["bash", str(ROOT / "tools" / "own_models_walkthrough.sh"), str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "train.parquet: 64 records, 0 bad" in out
    assert "'status': 'finished', 'global_step': 4" in out
    assert "EfficientMLLMForCausalLM EfficientMLLMProcessor" in out
    assert out.count("vis tok/img") == 2  # the student's and the teacher's tables
    assert list((work / "emkd" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (work / "emkd" / "final" / "student.py").is_file()
    assert "Do you wish to run the custom code" not in out + done.stderr
    assert "cache_position" not in out + done.stderr  # no deprecated argument for generate to build
    assert out.rstrip().endswith(f"walkthrough done: {work}")

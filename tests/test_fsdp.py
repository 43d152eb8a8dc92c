"""FSDP2 sharding of the student (CPU, gloo): the loss runs inside the student's forward, where the LM head is
whole, so a sharded step gives the losses and gradients of an unsharded one. The root unit reshards after forward,
so a loss that read the head after the forward would meet a shard (and fail).

Transformers' Trainer enables FSDP through accelerate only on accelerators; this test shards the model with
``torch.distributed.fsdp.fully_shard`` directly and runs the same method code the trainer calls."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _workspace import build_workspace, free_port

WORKER = Path(__file__).with_name("_fsdp_worker.py")
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists() and shutil.which("torchrun") is None, reason="torchrun comes with torch")
@pytest.mark.parametrize("method", ["emkd", "llava_kd", "sft"])
def test_fsdp_sharded_step_matches_unsharded(tmp_path, method):
    ws = build_workspace(tmp_path / "ws", colours=["red", "blue"])
    _run([sys.executable, str(WORKER), str(ws["root"]), method, str(tmp_path / "one.json")])
    port = free_port()
    _run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", port, str(WORKER), str(ws["root"]), method,
          str(tmp_path / "two.json"), "--fsdp"])

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["head_sharded_after_forward"], "the test must really shard the head"
    assert not one["head_sharded_after_forward"]
    for key, value in one["components"].items():
        assert two["components"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    g1, g2 = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert set(g1) == set(g2) and any("lm_head" in k or "embed_tokens" in k for k in g1)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_align_ti_is_refused_under_sharding():
    from types import SimpleNamespace

    from emkd.training.methods import build_method
    from emkd.training.trainer import check_sharding_supported

    fsdp = SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace()))
    zero3 = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))))
    zero2 = SimpleNamespace(is_fsdp_enabled=False, accelerator=SimpleNamespace(
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2))))
    align_ti = build_method("align_ti", iva_layer=-1)
    with pytest.raises(NotImplementedError, match="FSDP"):
        check_sharding_supported(fsdp, align_ti)
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        check_sharding_supported(zero3, align_ti)
    check_sharding_supported(zero2, align_ti)
    for trainer in (fsdp, zero3):
        check_sharding_supported(trainer, build_method("emkd"))

"""Worker of tests/test_fsdp.py: one distillation step of a tiny student, whole or sharded with FSDP2 (CPU, gloo).

    python tests/_fsdp_worker.py WORKSPACE METHOD OUT                     # one process, no sharding
    torchrun --nproc_per_node 2 tests/_fsdp_worker.py WORKSPACE METHOD OUT --fsdp

Every process runs the same full batch, so FSDP's gradient average equals the one-process gradient. Rank 0 writes
the loss components, the full gradient of every student parameter and whether the head was sharded after forward.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from emkd.data import PairCollator, PairDataset
from emkd.models import EfficientMLLMAdapter, load_student, load_teacher
from emkd.training.methods import build_method


def main() -> None:
    workspace, method_name, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    sharded = "--fsdp" in sys.argv
    if sharded:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model, side = load_student(workspace / "student")
    teacher = load_teacher(workspace / "teacher")
    teacher.return_logits = False
    student = EfficientMLLMAdapter(model, side, return_logits=False)
    data = PairDataset(workspace / "train.json", workspace / "images", side, teacher.side, template="chat")
    batch = PairCollator(side, teacher.side)([data[i] for i in range(len(data))])

    runner = model
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for layer in model.language_model.model.layers:  # the decoder layers, then the root (embeddings, head, ...)
            fully_shard(layer)
        runner = fully_shard(model, reshard_after_forward=True)  # the head is a shard again once forward returns

    method = build_method(method_name)
    step = method(student, teacher, batch, model=runner)
    step.loss.backward()
    head = model.get_output_embeddings().weight
    head_sharded = hasattr(head, "to_local") and head.to_local().shape[0] < head.shape[0]
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    if not sharded or dist.get_rank() == 0:
        torch.save(grads, out.with_suffix(".pt"))
        out.write_text(json.dumps({"components": step.components, "head_sharded_after_forward": bool(head_sharded)}))
    if sharded:
        dist.barrier()  # both ranks are done with every collective before gloo's pairs are torn down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The README's "Using your own models and data", run end to end on this machine with stand-ins for what a user
# downloads: a tiny random-weight LLaVA-OneVision teacher saved as the hub saves one, and a parquet file with
# embedded image bytes in the LLaVA-OneVision data layout. Every other step is the CLI a user runs.
#
#   bash tools/own_models_walkthrough.sh [WORKDIR]      # about a minute on 2 CPU cores
set -euo pipefail
PY=${PY:-.venv/bin/python}
W=${1:-runs/walkthrough}
rm -rf "$W" && mkdir -p "$W"

echo "== 0. stand-ins: a hub-style teacher checkpoint and parquet data with embedded images"
"$PY" - "$W" <<'EOF'
import io, json, sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from emkd.models import build_tokenizer
from emkd.models.tiny_teachers import save_tiny_teacher

w = Path(sys.argv[1])
colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
corpus = [f"What colour is the square? {c}" for c in colours]
tokenizer = build_tokenizer(corpus * 20, vocab_size=400)
save_tiny_teacher("llava_onevision", w / "teacher", tokenizer)

def png(rgb, k):
    image = Image.new("RGB", (32, 32), (120, 120, 120))
    image.paste(Image.new("RGB", (12, 12), rgb), (4 + k % 12, 4 + (k * 5) % 12))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

def rows(n, offset):
    names = list(colours)
    out = {"id": [], "conversations": [], "image": []}
    for k in range(offset, offset + n):
        name = names[k % len(names)]
        out["id"].append(f"sq{k}")
        out["conversations"].append([{"from": "human", "value": "<image>\nWhat colour is the square?"},
                                     {"from": "gpt", "value": name}])
        out["image"].append({"bytes": png(colours[name], k), "path": f"sq{k}.png"})
    return pa.table(out)

pq.write_table(rows(64, 0), w / "train.parquet", row_group_size=16)
pq.write_table(rows(16, 1000), w / "test.parquet")
EOF

echo "== 1. check the data"
"$PY" -m emkd data check "$W/train.parquet"

echo "== 2. a student for the teacher: its tower and tokenizer, 2 x 2 pooled tokens, its first decoder layer"
"$PY" -m emkd init-student --from-teacher "$W/teacher" --layers 1 --pool-size 2 --out "$W/student"

echo "== 3. EM-KD phase 2 with the paper-scale recipe, shortened for a CPU"
"$PY" -m emkd train recipes/emkd_0.5b_phase2.yaml --set student="$W/student" --set teacher="$W/teacher" \
    --set data.train="$W/train.parquet" --set data.images=null --set teacher_dtype=float32 --set max_steps=4 \
    --set batch_size=2 --set grad_accum=1 --set save_steps=0 --set output_dir="$W/emkd" \
    --set report_to=tensorboard

echo "== 4. evaluate the student and the teacher on the held-out parquet"
"$PY" -m emkd eval "$W/emkd/final" "$W/test.parquet" --ttft-runs 2
"$PY" -m emkd eval "$W/teacher" "$W/test.parquet" --ttft-runs 2

echo "== 5. load the student with transformers alone (trust_remote_code), as from a hub"
"$PY" - "$W/emkd/final" <<'EOF'
import sys

from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
print(type(model).__name__, type(processor).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters")
EOF
echo "walkthrough done: $W"

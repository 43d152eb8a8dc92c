"""Teachers from Hugging Face checkpoints: tiny random-weight models of every supported architecture, saved and
reloaded through :func:`emkd.models.teachers.load_teacher`, checked against the models' own outputs.

For every kind the batch has two right-padded samples: one 40x56 image (non-square, so AnyRes unpads and, for
OneVision, down-samples) and two images (64x30 and 32x32; OneVision's multi-image path, two wrapped image runs for
Qwen2-VL's 3D positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from emkd import DistillInputs, EMKDLoss
from emkd.models import build_tokenizer
from emkd.models.teachers import HFTeacherAdapter, TEACHER_REGISTRY, load_teacher, register_teacher
from emkd.models.tiny_teachers import TINY_TEACHERS, save_tiny_teacher

IGNORE_INDEX = -100
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
CORPUS = [
    "You are a helpful assistant. Describe the image in detail.",
    "What colour is the shape on the left? It is a red square on a blue background.",
    "How many objects are there? There are three circles and one triangle.",
] * 4
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
QUESTION = "\nWhat colour is the shape on the left?"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
ANSWER = "It is a red square.<|im_end|>"
IMAGE_SIZES = [[(40, 56)], [(64, 30), (32, 32)]]  # (height, width) of each sample's images


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sample]
        for sample in IMAGE_SIZES
    ]


@pytest.fixture(scope="module", params=sorted(TINY_TEACHERS))
def teacher(request, tmp_path_factory, tokenizer):
    """``(kind, checkpoint directory, adapter)`` for each tiny teacher, loaded with the default attention."""
    path = save_tiny_teacher(request.param, tmp_path_factory.mktemp(request.param), tokenizer, seed=0)
    return request.param, path, load_teacher(path)


def render(side, counts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Token ids and masks of a batch: ``counts[b][i]`` image tokens for image ``i`` of sample ``b``.

    Layout per sample: system + user start | per image: wrapper, image tokens, wrapper | question (instruction) |
    assistant start | answer (supervised) | right padding.
    """
    tok = side.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    rows = []
    for sample_counts in counts:
        pieces = [(ids(SYSTEM), "prompt")]
        for n in sample_counts:
            pieces += [(ids(side.image_wrapper[0]), "prompt"), ([side.image_token_id] * n, "image"),
                       (ids(side.image_wrapper[1]), "prompt")]
        pieces += [(ids(QUESTION), "instruction"), (ids(ASSISTANT), "prompt"), (ids(ANSWER), "answer")]
        rows.append(pieces)
    length = max(sum(len(p) for p, _ in pieces) for pieces in rows)
    batch = {
        "input_ids": torch.full((len(rows), length), tok.pad_token_id),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "labels": torch.full((len(rows), length), IGNORE_INDEX),
        "instruction_mask": torch.zeros(len(rows), length, dtype=torch.bool),
    }
    for b, pieces in enumerate(rows):
        start = 0
        for piece, role in pieces:
            span = slice(start, start + len(piece))
            batch["input_ids"][b, span] = torch.tensor(piece, dtype=torch.long)
            batch["attention_mask"][b, span] = 1
            if role == "answer":
                batch["labels"][b, span] = torch.tensor(piece, dtype=torch.long)
            if role == "instruction":
                batch["instruction_mask"][b, span] = True
            start += len(piece)
    return batch


def teacher_batch(adapter, images) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    side = adapter.side
    items = [side.image_inputs(sample) for sample in images]
    counts = [[side.num_image_tokens(item, i) for i in range(len(sample))] for item, sample in zip(items, images)]
    batch = render(side, counts)
    batch.update(side.collate_image_inputs(items))
    return batch, counts


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_tiny_checkpoint_is_small_and_has_its_architecture(teacher):
    kind, path, adapter = teacher
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    assert size < 3 * 2**20, f"{kind}: checkpoint is {size} bytes"
    assert json.loads((Path(path) / "config.json").read_text())["architectures"] == [ARCHITECTURES[kind]]
    assert type(adapter.model).__name__ == ARCHITECTURES[kind]
    assert isinstance(adapter, HFTeacherAdapter)
    assert adapter.num_layers == 2


def test_teacher_is_frozen_and_in_eval_mode(teacher):
    _, _, adapter = teacher
    assert not adapter.model.training
    assert not any(p.requires_grad for p in adapter.model.parameters())


# ---- what the adapter shows the loss -----------------------------------------------------------------------------


def test_adapter_outputs_match_the_model(teacher, images):
    kind, _, adapter = teacher
    batch, counts = teacher_batch(adapter, images)
    out = adapter(batch)
    inputs = out.inputs

    # hidden is what the LM head consumes: hidden @ W.T (+ b) reproduces the model's own logits
    assert out.logits is not None and out.attention is None
    assert inputs.head_weight is adapter.model.get_output_embeddings().weight
    torch.testing.assert_close(inputs.logits(inputs.hidden), out.logits.float(), atol=1e-4, rtol=0)

    # the vision mask marks exactly the image tokens, as many per sample as the side counted
    assert inputs.vision_mask.sum(1).tolist() == [sum(c) for c in counts]
    assert torch.equal(inputs.vision_mask, batch["input_ids"] == adapter.side.image_token_id)
    # ... and the side's count per image is what the vision tower + projector actually produce
    image_inputs = adapter.side.collate_image_inputs([adapter.side.image_inputs(s) for s in images])
    with torch.no_grad():
        features = adapter.model.get_image_features(**image_inputs).pooler_output
    assert [f.shape[0] for f in features] == [n for c in counts for n in c], kind

    assert torch.equal(inputs.labels, batch["labels"])
    assert torch.equal(inputs.attention_mask, batch["attention_mask"].bool())
    assert torch.equal(inputs.instruction_mask, batch["instruction_mask"])
    assert inputs.hidden.shape == (*batch["input_ids"].shape, adapter.model.config.text_config.hidden_size)
    assert inputs.vocab_size == len(adapter.side.tokenizer)


def test_text_only_samples_and_no_logits(teacher, images):
    """A sample without images next to one with; a batch without any; ``return_logits=False`` keeps ``hidden``."""
    _, _, adapter = teacher
    side = adapter.side
    items = [side.image_inputs(images[0]), side.image_inputs([])]
    assert items[1] == {}
    count = side.num_image_tokens(items[0], 0)
    batch = render(side, [[count], []])
    batch.update(side.collate_image_inputs(items))
    full = adapter(batch)
    assert full.inputs.vision_mask.sum(1).tolist() == [count, 0]
    torch.testing.assert_close(full.inputs.logits(full.inputs.hidden), full.logits.float(), atol=1e-4, rtol=0)

    adapter.return_logits = False
    try:
        lean = adapter(batch)
    finally:
        adapter.return_logits = True
    assert lean.logits is None
    torch.testing.assert_close(lean.inputs.hidden, full.inputs.hidden, atol=0, rtol=0)

    text_only = render(side, [[], []])
    assert side.collate_image_inputs([{}, {}]) == {}
    out = adapter(text_only)
    assert not out.inputs.vision_mask.any()
    assert torch.isfinite(out.inputs.hidden).all()


def test_expected_token_counts(teacher, images):
    """Pin the counts worked out by hand for the tiny configs (32 px tiles, 8 px patches, 2x2 AnyRes grid)."""
    kind, _, adapter = teacher
    _, counts = teacher_batch(adapter, images)
    expected = {
        "llava": [[16], [16, 16]],  # 4x4 patches, CLS dropped
        # base tile (16) + unpadded grid + one newline per grid row:
        # 40x56 -> 2x2 tiles, 8x8 unpadded to 6x8 -> 48 + 6 + 16; 64x30 -> 2x1 tiles, 8x4 (no padding row
        # to drop) -> 32 + 8 + 16; 32x32 -> 1 tile, 4x4 -> 16 + 4 + 16
        "llava_next": [[70], [56, 36]],
        # 40x56: 6x8 exceeds anyres_max_2 and is down-sampled to 4x6 (+4 newlines +16 base); multi-image: 16 + 1
        "llava_onevision": [[44], [17, 17]],
        "qwen2_vl": [[8], [8, 4]],  # 40x56 -> 32x64 px -> 4x8 patches -> 8 tokens after the 2x2 merge
        "qwen2_5_vl": [[8], [8, 4]],
    }
    assert counts == expected[kind]


def test_attention_of_one_layer(teacher, images):
    kind, _, adapter = teacher
    batch, _ = teacher_batch(adapter, images)
    implementation = adapter.model.get_decoder().config._attn_implementation
    plain = adapter(batch)
    out = adapter(batch, attention_layer=-1)
    B, L = batch["input_ids"].shape
    attention = out.attention
    assert attention.shape == (B, L, L)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(attention.sum(-1)[real], torch.ones(int(real.sum())), atol=1e-5, rtol=0)
    assert torch.all(attention.triu(diagonal=1) == 0), "causal: no attention to later tokens"
    keys_padding = ~real[:, None, :] & real[:, :, None]
    assert torch.all(attention[keys_padding] == 0), "real tokens never attend to padding"
    # the eager switch is temporary and changes the numbers only by float rounding
    assert adapter.model.get_decoder().config._attn_implementation == implementation
    torch.testing.assert_close(out.inputs.hidden, plain.inputs.hidden, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_layer=2 is out of range"):
        adapter(batch, attention_layer=2)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_counts_agree_with_the_saved_hf_processor(kind, tmp_path, tokenizer, images):
    """An independent count: the checkpoint's own Hugging Face processor expanding ``<image>`` in a prompt."""
    path = save_tiny_teacher(kind, tmp_path, tokenizer)
    adapter = load_teacher(path)
    processor = AutoProcessor.from_pretrained(path)
    for sample in images:
        for image in sample:
            expanded = processor(text="<image>\nWhat is it?", images=[image], return_tensors="pt")["input_ids"]
            side_count = adapter.side.num_image_tokens(adapter.side.image_inputs([image]), 0)
            assert int((expanded == processor.image_token_id).sum()) == side_count


def test_dtype_is_applied(tmp_path, tokenizer, images):
    path = save_tiny_teacher("qwen2_vl", tmp_path, tokenizer)
    adapter = load_teacher(path, dtype=torch.bfloat16)
    assert adapter.model.dtype == torch.bfloat16
    batch, _ = teacher_batch(adapter, images)  # float32 pixels are cast to the model's dtype
    inputs = adapter(batch).inputs
    assert inputs.hidden.dtype == torch.bfloat16
    assert torch.isfinite(inputs.hidden.float()).all()


def test_eager_attention_at_load(tmp_path, tokenizer, images):
    path = save_tiny_teacher("llava_onevision", tmp_path, tokenizer)
    adapter = load_teacher(path, attn_implementation="eager")
    assert adapter.model.get_decoder().config._attn_implementation == "eager"
    batch, _ = teacher_batch(adapter, images)
    assert adapter(batch, attention_layer=0).attention.shape[1:] == batch["input_ids"].shape[1:] * 2


# ---- the loss consumes it --------------------------------------------------------------------------------------


def test_emkd_loss_on_teacher_inputs(teacher, images):
    """A student with 4 image tokens per image, same text, same vocabulary: EMKDLoss runs and is finite."""
    _, _, adapter = teacher
    batch, counts = teacher_batch(adapter, images)
    t_inputs = adapter(batch).inputs
    s_batch = render(adapter.side, [[4] * len(c) for c in counts])
    generator = torch.Generator().manual_seed(0)
    B, Ls = s_batch["input_ids"].shape
    Ds = 24  # the student's hidden size need not be the teacher's
    hidden = torch.randn(B, Ls, Ds, generator=generator).requires_grad_()
    head = (0.1 * torch.randn(t_inputs.vocab_size, Ds, generator=generator)).requires_grad_()
    student = DistillInputs(
        hidden=hidden,
        head_weight=head,
        vision_mask=s_batch["input_ids"] == adapter.side.image_token_id,
        attention_mask=s_batch["attention_mask"],
        labels=s_batch["labels"],
        instruction_mask=s_batch["instruction_mask"],
    )
    out = EMKDLoss()(student, t_inputs)
    for name in ("loss", "sup", "rld", "vsd", "vlad"):
        assert torch.isfinite(getattr(out, name)), name
    assert [len(idx_s) for idx_s, _ in out.matches] == [4 * len(c) for c in counts]
    out.loss.backward()
    assert hidden.grad is not None and head.grad is not None


# ---- registry ----------------------------------------------------------------------------------------------------


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported teacher architecture 'MistralForCausalLM'") as error:
        load_teacher(tmp_path)
    for architecture in [*ARCHITECTURES.values(), "EfficientMLLMForCausalLM"]:
        assert architecture in str(error.value)


def test_registry_uses_exact_keys_and_refuses_duplicates(tmp_path):
    with pytest.raises(ValueError, match="already registered"):
        register_teacher("LlavaForConditionalGeneration", TEACHER_REGISTRY["LlavaForConditionalGeneration"])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGenerationV2"]}))
    with pytest.raises(ValueError, match="unsupported teacher architecture"):
        load_teacher(tmp_path)


def test_unknown_tiny_kind(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown tiny teacher kind 'llava2'"):
        save_tiny_teacher("llava2", tmp_path, tokenizer)

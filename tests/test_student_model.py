"""The efficient student: config, forward contract (SPEC §1), save/load, generation, AnyRes, side and adapter.

Every model here is a tiny real-class checkpoint (SigLIP tower + Qwen2 LM, random weights) built by
:mod:`emkd.models.tiny` over a tokenizer trained offline by :func:`emkd.models.build_tokenizer`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, Qwen2Config, SiglipVisionConfig

import emkd
from emkd.models.student import (
    EfficientMLLMConfig,
    EfficientMLLMForCausalLM,
    check_image_token_counts,
    pool_patch_grid,
)
from emkd.models.student_side import EfficientMLLMAdapter, EfficientMLLMSide, load_student
from emkd.models.tiny import build_tiny_student, save_tiny_student, tiny_image_processor, tiny_student_config
from emkd.models.tokenizer import build_tokenizer

IGNORE = -100
CORPUS = [
    "Describe the image in one sentence.",
    "What colour is the shape on the left?",
    "A red square and a blue circle on a white background.",
    "The shape on the left is a dark green triangle.",
    "How many shapes are there? There are three shapes.",
] * 4


# ---- fixtures and helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def student_dir(tok, tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("student"), tok, seed=0)


@pytest.fixture(scope="module")
def student(student_dir):
    return load_student(student_dir)  # (model, side)


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def render(tok, side, prompt: str, response: str, images: list) -> dict[str, torch.Tensor]:
    """One sample laid out like the data pipeline: ChatML, each ``<image>`` expanded to the side's token count,
    labels only on the response, instruction_mask on the user's text."""
    inputs = side.image_inputs(images)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    prefix = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    prefix_ids: list[int] = []
    instruction: list[bool] = []
    k = 0
    for t in tok(prefix, add_special_tokens=False)["input_ids"]:
        if t == side.image_token_id:
            n = side.num_image_tokens(inputs, k)
            prefix_ids += [t] * n
            instruction += [False] * n
            k += 1
        else:
            prefix_ids.append(t)
            instruction.append(t not in tok.all_special_ids)
    resp_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = prefix_ids + resp_ids
    return {
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor([IGNORE] * len(prefix_ids) + resp_ids),
        "instruction_mask": torch.tensor(instruction + [False] * len(resp_ids)),
        "images": inputs,
    }


def collate(tok, side, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad a list of rendered samples into one side of a batch."""
    L = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    batch = {
        "input_ids": torch.full((B, L), tok.pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(B, L, dtype=torch.long),
        "labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "instruction_mask": torch.zeros(B, L, dtype=torch.bool),
    }
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][b, :n] = s["input_ids"]
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = s["labels"]
        batch["instruction_mask"][b, :n] = s["instruction_mask"]
    batch.update(side.collate_image_inputs([s["images"] for s in samples]))
    return batch


def two_sample_batch(tok, side) -> dict[str, torch.Tensor]:
    return collate(
        tok,
        side,
        [
            render(tok, side, "What colour is the shape on the left?", "It is a dark green triangle.", [image(40, 50)]),
            render(tok, side, "Describe the image.", "A red square.", [image(32, 32, 1), image(20, 60, 2)]),
        ],
    )


# ---- config -----------------------------------------------------------------------------------------------------
def test_config_defaults_and_validation(tok):
    cfg = EfficientMLLMConfig()  # SigLIP 224/16 (14 x 14 grid) + Qwen2
    assert cfg.pool_size == 12 and cfg.tokens_per_tile == 144 and cfg.vision_feature_layer == -2
    with pytest.raises(ValueError, match=r"pool_size=5 must be in \[1, 4\]"):
        tiny_student_config(tok, pool_size=5)
    with pytest.raises(ValueError, match="compressor must be one of"):
        tiny_student_config(tok, compressor="perceiver")
    with pytest.raises(ValueError, match="multiples of the tower's image_size=32"):
        tiny_student_config(tok, anyres=True, image_grid_pinpoints=[[32, 48]])
    with pytest.raises(ValueError, match="vision_feature_layer=5 is out of range"):
        EfficientMLLMConfig(vision_config=tiny_student_config(tok).vision_config, pool_size=2, vision_feature_layer=5)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_attention_heads=4, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="tie_word_embeddings=False but text_config.tie_word_embeddings=True"):
        EfficientMLLMConfig(text_config=text, tie_word_embeddings=False)
    assert EfficientMLLMConfig(text_config=text).tie_word_embeddings is True


def test_config_round_trips_through_autoconfig(tok, tmp_path):
    cfg = tiny_student_config(tok, anyres=True)
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, EfficientMLLMConfig)
    assert isinstance(back.vision_config, SiglipVisionConfig) and isinstance(back.text_config, Qwen2Config)
    assert {**back.to_dict(), "_name_or_path": ""} == cfg.to_dict()
    assert back.image_grid_pinpoints == [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


# ---- forward contract -------------------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_outputs(tok, student_dir, student):
    built = build_tiny_student(tok, seed=0)
    auto = AutoModelForCausalLM.from_pretrained(student_dir)
    model, side = student
    assert type(auto) is EfficientMLLMForCausalLM
    assert (student_dir / "model.safetensors").is_file()
    assert (student_dir / "model.safetensors").stat().st_size < 2 * 1024 * 1024
    batch = two_sample_batch(tok, side)
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        outs = [m(**kw) for m in (built, auto, model)]
    for o in outs[1:]:
        assert torch.equal(o.logits, outs[0].logits) and torch.equal(o.hidden, outs[0].hidden)
    head = model.get_output_embeddings().weight
    assert head.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # Qwen2-0.5B-style tied head


def test_seeded_builder_is_deterministic(tok):
    a, b, c = build_tiny_student(tok, seed=3), build_tiny_student(tok, seed=3), build_tiny_student(tok, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["projector.linear_1.weight"], sc["projector.linear_1.weight"])


@pytest.mark.parametrize(("compressor", "per_image"), [("pool", 4), ("none", 16)])
def test_vision_token_count(tok, compressor, per_image):
    model = build_tiny_student(tok, compressor=compressor)  # 32 px / 8 px patches = 4 x 4 grid; pool_size 2
    assert model.num_image_tokens() == per_image
    feats = model.get_image_features(torch.randn(3, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(per_image, 32)] * 3


def test_pooling_averages_each_quadrant():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # (T=1, 4x4 patches row-major, C=1)
    pooled = pool_patch_grid(grid, 4, 2).flatten()  # raster order of the 2 x 2 pooled grid
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]


def test_clip_tower_drops_cls_token(tok):
    base = tiny_student_config(tok)
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = EfficientMLLMForCausalLM(
        EfficientMLLMConfig(vision_config=clip, text_config=base.text_config, pool_size=2,
                            image_token_id=base.image_token_id, compressor="none")
    )
    assert [tuple(f.shape) for f in model.get_image_features(torch.randn(2, 3, 32, 32))] == [(16, 32)] * 2


def test_hidden_is_what_the_head_consumes(tok, student):
    model, side = student
    batch = two_sample_batch(tok, side)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        # Qwen2's own hidden_states[-1] is already normed: the same tensor as ours
        embeds = model.get_input_embeddings()(batch["input_ids"])
        embeds[out.vision_mask] = torch.cat(model.get_image_features(batch["pixel_values"]))
        ref = model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                   output_hidden_states=True)
    W = model.get_output_embeddings().weight  # (V, D)
    torch.testing.assert_close(out.hidden @ W.T, out.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref.hidden_states[-1], out.hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(ref.logits, out.logits, rtol=0, atol=1e-5)
    assert model.get_output_embeddings().bias is None


def test_vision_mask_marks_exactly_the_features(tok, student):
    model, side = student
    batch = two_sample_batch(tok, side)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        feats = model.get_image_features(batch["pixel_values"])
    assert out.vision_mask.dtype == torch.bool and out.vision_mask.shape == batch["input_ids"].shape
    assert int(out.vision_mask.sum()) == sum(f.shape[0] for f in feats) == 3 * 4
    assert out.vision_mask.sum(1).tolist() == [4, 8]
    assert torch.equal(out.vision_mask, batch["input_ids"] == side.image_token_id)


def test_loss_is_shifted_cross_entropy(tok, student):
    model, side = student
    batch = two_sample_batch(tok, side)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], labels=batch["labels"])
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]  # position i predicts label i + 1
    keep = labels != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=1e-6)


def test_image_token_mismatch_raises(tok, student):
    model, side = student
    ids = torch.tensor([[10, 11] + [side.image_token_id] * 3 + [12]])
    with pytest.raises(ValueError, match="sample 0 has 3 image tokens but images give 4 features"):
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="sample 0 has 3 image tokens but images give 0 features"):
        model(input_ids=ids)  # image tokens in a prompt but no images
    with pytest.raises(ValueError, match="1 image\\(s\\) left over"):
        check_image_token_counts([4], [4, 4])
    with pytest.raises(ValueError, match="sample 1 has 4 image tokens but images give 8 features"):
        check_image_token_counts([4, 4], [4, 8])


# ---- generation -------------------------------------------------------------------------------------------------
def test_generate_uses_images_at_prefill_only(tok, student):
    model, side = student
    sample = render(tok, side, "What colour is the shape on the left?", "", [image(40, 50)])
    ids = sample["input_ids"][: int((sample["labels"] == IGNORE).sum())].unsqueeze(0)  # the prompt only
    pixels = sample["images"]["pixel_values"]
    seen: list[bool] = []
    handle = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("pixel_values") is not None), with_kwargs=True
    )
    try:
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                             max_new_tokens=5, min_new_tokens=5, do_sample=False)
    finally:
        handle.remove()
    assert out.shape == (1, ids.shape[1] + 5) and torch.equal(out[:, : ids.shape[1]], ids)
    assert seen == [True, False, False, False, False]
    # the cached decode equals greedy decoding that re-reads the whole prompt (images included) every step
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=seq, pixel_values=pixels).logits[:, -1]
            logits[:, tok.eos_token_id] = -float("inf")  # min_new_tokens
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq, out)


# ---- AnyRes -----------------------------------------------------------------------------------------------------
def test_anyres_counts_and_forward(tok, tmp_path):
    save_tiny_student(tmp_path, tok, seed=1, anyres=True)
    model, side = load_student(tmp_path)
    wide, square = image(40, 90), image(30, 30, 1)  # (h, w)
    assert model.config.anyres_grid((40, 90)) == (1, 3)  # best fit 32 x 96: 3 tiles
    assert model.num_image_tokens((40, 90)) == (1 + 3) * 4
    assert model.config.anyres_grid((30, 30)) == (1, 2)  # LLaVA-NeXT's default pinpoints have no 1 x 1
    inputs = side.image_inputs([wide, square])
    assert tuple(inputs["pixel_values"].shape) == (2, 4, 3, 32, 32)
    assert inputs["image_sizes"].tolist() == [[40, 90], [30, 30]]
    assert [side.num_image_tokens(inputs, i) for i in range(2)] == [16, 12]
    batch = collate(tok, side, [render(tok, side, "Describe the image.", "Red.", [square]),
                                render(tok, side, "Describe the image.", "Blue.", [wide, square])])
    assert tuple(batch["pixel_values"].shape) == (3, 4, 3, 32, 32)  # views padded to the batch's largest
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"])
    assert out.vision_mask.sum(1).tolist() == [12, 28]
    # each view is encoded independently: the base view's tokens equal encoding that view alone
    with torch.no_grad():
        alone = model.encode_views(inputs["pixel_values"][0, :1])[0]
        feats = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    torch.testing.assert_close(feats[0][:4], alone)


# ---- side and adapter -------------------------------------------------------------------------------------------
def test_side_checks_and_collate(tok, student):
    model, side = student
    assert side.collate_image_inputs([{}, {}]) == {}
    one = side.image_inputs([image(10, 20)])
    assert tuple(side.collate_image_inputs([{}, one, one])["pixel_values"].shape) == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"outputs \(48, 48\) images, the vision tower reads \(32, 32\)"):
        EfficientMLLMSide(tok, tiny_image_processor(48), model.config)


def test_adapter_feeds_emkd_loss_against_a_vanilla_teacher(tok, student, tmp_path):
    model, side = student
    save_tiny_student(tmp_path, tok, seed=5, compressor="none", text_hidden=48)
    teacher, t_side = load_student(tmp_path)
    assert teacher.num_image_tokens() == 16 and teacher.config.text_config.hidden_size == 48
    prompts = [("What colour is the shape on the left?", "It is a dark green triangle.", [image(40, 50)]),
               ("Describe the image.", "A red square.", [image(32, 32, 1), image(20, 60, 2)])]
    s_batch = collate(tok, side, [render(tok, side, *p) for p in prompts])
    t_batch = collate(tok, t_side, [render(tok, t_side, *p) for p in prompts])

    model.train()
    model.zero_grad()
    s_out = EfficientMLLMAdapter(model, side, return_logits=False)(s_batch)
    with torch.no_grad():
        t_out = EfficientMLLMAdapter(teacher, t_side)(t_batch, attention_layer=1)
    assert s_out.logits is None and s_out.inputs.hidden_size == 32 and t_out.inputs.hidden_size == 48
    assert s_out.inputs.vision_mask.sum(1).tolist() == [4, 8]
    assert t_out.inputs.vision_mask.sum(1).tolist() == [16, 32]
    assert torch.equal(s_out.inputs.instruction_mask, s_batch["instruction_mask"])
    # the teacher's attention: [B, L, L], causal, rows of real tokens sum to 1; the LM is back on its own kernel
    att = t_out.attention
    assert att.shape == (2, t_batch["input_ids"].shape[1], t_batch["input_ids"].shape[1])
    assert torch.all(att.triu(1) == 0)
    real = t_batch["attention_mask"].bool()
    torch.testing.assert_close(att.sum(-1)[real], torch.ones(int(real.sum())))
    assert teacher.language_model.config._attn_implementation == "sdpa"

    result = emkd.EMKDLoss()(s_out.inputs, t_out.inputs)
    assert all(torch.isfinite(getattr(result, k)) for k in ("loss", "sup", "rld", "vsd", "vlad"))
    assert [len(i) for i, _ in result.matches] == [4, 8]
    result.loss.backward()
    for name in ("projector.linear_1.weight", "vision_tower.embeddings.patch_embedding.weight",
                 "language_model.model.layers.0.self_attn.q_proj.weight", "language_model.model.embed_tokens.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is None for p in teacher.parameters())
    model.eval()
    model.zero_grad()


def test_siglip_so400m_geometry_pools_729_patches_to_144():
    """384 px images with 14 px patches: the tower rounds the grid down to 27 x 27 = 729 patches (EM-KD's setting)."""
    from transformers import Qwen2Config, SiglipVisionConfig

    from emkd.models import EfficientMLLMConfig, EfficientMLLMForCausalLM

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=384, patch_size=14, vision_use_head=False)
    tc = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
    pooled = EfficientMLLMConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), pool_size=12, image_token_id=5)
    vanilla = EfficientMLLMConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), compressor="none",
                                  image_token_id=5)
    assert (pooled.patch_grid, pooled.num_image_tokens(), vanilla.num_image_tokens()) == (27, 144, 729)
    features = EfficientMLLMForCausalLM(pooled).get_image_features(torch.randn(1, 3, 384, 384))
    assert [tuple(f.shape) for f in features] == [(144, 32)]

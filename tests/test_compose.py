"""Building the student from Hugging Face component checkpoints (:mod:`emkd.models.compose`).

The components are tiny real-class checkpoints with random weights, saved and reloaded like a user's downloads: a
full ``SiglipModel`` (text + vision), a vision-only ``SiglipVisionModel`` (with its pooling head, which the student
drops), a full ``CLIPModel`` (a CLS token), each with an image processor, and ``Qwen2ForCausalLM`` language models
over offline tokenizers with and without ``"<image>"``. Every SigLIP/CLIP tower reads 32 px images in 8 px patches,
a 4 x 4 patch grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from emkd.cli import main
from emkd.models.compose import copy_weights, init_projector, init_student
from emkd.models.student_side import load_student
from emkd.models.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

CORPUS = ["What is in the image?", "A red square on a grey background.", "Describe the picture in one sentence."] * 4
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
TEXT_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                  max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=1)


# ---- component checkpoints --------------------------------------------------------------------------------------
def tokenizer_without_image_token() -> PreTrainedTokenizerFast:
    """Like :func:`build_tokenizer` (ChatML template, Qwen2 special tokens), but without ``"<image>"``."""
    specials = [t for t in SPECIAL_TOKENS if t != "<image>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_lm(directory, tokenizer, seed: int, tie: bool, extra_rows: int = 0) -> Qwen2ForCausalLM:
    """A 2-layer Qwen2 over ``tokenizer`` (``extra_rows`` padding rows beyond it, as Qwen2 has), saved with it."""
    config = Qwen2Config(
        vocab_size=len(tokenizer) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(config).eval()
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return lm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Paths of the component checkpoints (``<name>``) and their in-memory sources (``<name>_model``)."""
    root = tmp_path_factory.mktemp("components")
    out: dict = {"root": root}
    siglip_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})

    torch.manual_seed(0)
    out["siglip_full_model"] = SiglipModel(SiglipConfig(text_config=TEXT_TOWER, vision_config=TOWER)).eval()
    out["siglip_full_model"].save_pretrained(root / "siglip_full")
    siglip_processor.save_pretrained(root / "siglip_full")

    torch.manual_seed(1)
    out["siglip_vision_model"] = SiglipVisionModel(SiglipVisionConfig(**TOWER)).eval()  # with its pooling head
    out["siglip_vision_model"].save_pretrained(root / "siglip_vision")
    siglip_processor.save_pretrained(root / "siglip_vision")

    torch.manual_seed(2)
    out["clip_full_model"] = CLIPModel(CLIPConfig(text_config=TEXT_TOWER, vision_config=TOWER)).eval()
    out["clip_full_model"].save_pretrained(root / "clip_full")
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip_full"
    )

    with_image, without_image = build_tokenizer(CORPUS, vocab_size=300), tokenizer_without_image_token()
    out["tok_with"], out["tok_without"] = with_image, without_image
    out["lm_tied_model"] = save_lm(root / "lm_tied", with_image, seed=3, tie=True)
    out["lm_untied_model"] = save_lm(root / "lm_untied", without_image, seed=4, tie=False)
    out["lm_padded_model"] = save_lm(root / "lm_padded", without_image, seed=5, tie=True, extra_rows=8)
    for name in ("siglip_full", "siglip_vision", "clip_full", "lm_tied", "lm_untied", "lm_padded"):
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def built(ckpt, tmp_path_factory):
    """Students built once per case: ``name -> (out_dir, summary lines)``."""
    cases = {
        "full_siglip": dict(vision=ckpt["siglip_full"], llm=ckpt["lm_tied"], pool_size=3),
        "added_token": dict(vision=ckpt["siglip_vision"], llm=ckpt["lm_untied"], pool_size=2),
        "padded_vocab": dict(vision=ckpt["siglip_vision"], llm=ckpt["lm_padded"], pool_size=2),
        "clip_anyres": dict(vision=ckpt["clip_full"], llm=ckpt["lm_tied"], pool_size=2, anyres=True),
        "seed1": dict(vision=ckpt["siglip_full"], llm=ckpt["lm_tied"], pool_size=3, seed=1),
        "bf16": dict(vision=ckpt["siglip_full"], llm=ckpt["lm_tied"], pool_size=3, dtype=torch.bfloat16),
    }
    result = {}
    for name, kw in cases.items():
        lines: list[str] = []
        out = init_student(kw.pop("vision"), kw.pop("llm"), tmp_path_factory.mktemp(name) / "student",
                           print_fn=lines.append, **kw)
        result[name] = (out, lines)
    return result


# ---- helpers ----------------------------------------------------------------------------------------------------
def image(h: int = 40, w: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def prompt(side, n_image_tokens: int) -> torch.Tensor:
    """``[1, L]`` ChatML prompt with one image expanded to ``n_image_tokens`` image tokens."""
    text = side.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is in the image?"}], tokenize=False, add_generation_prompt=True
    )
    ids: list[int] = []
    for t in side.tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids += [t] * n_image_tokens if t == side.image_token_id else [t]
    return torch.tensor([ids])


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], skip: tuple[str, ...] = ()):
    """Every key of ``want`` except those starting with ``skip`` is in ``got`` with an equal tensor, and no more."""
    want = {k: v for k, v in want.items() if not k.startswith(skip)}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for k, v in want.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def check_forward_and_generate(model, side, n_image_tokens: int, img: Image.Image) -> None:
    inputs = side.image_inputs([img])
    ids = prompt(side, n_image_tokens)  # (1, L)
    with torch.no_grad():
        out = model(input_ids=ids, **inputs)
    V = model.get_input_embeddings().weight.shape[0]
    assert out.logits.shape == (1, ids.shape[1], V)
    assert torch.isfinite(out.logits).all()
    assert int(out.vision_mask.sum()) == n_image_tokens
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         **inputs)
    assert ids.shape[1] < gen.shape[1] <= ids.shape[1] + 3
    assert torch.equal(gen[:, : ids.shape[1]], ids)
    assert gen[0, ids.shape[1]] == out.logits[0, -1].argmax()  # greedy step 1 = the forward's prediction


# ---- composition ------------------------------------------------------------------------------------------------
def test_full_siglip_and_tokenizer_with_image_token(ckpt, built):
    out, lines = built["full_siglip"]
    model, side = load_student(out)
    # the tower is the full checkpoint's vision half, minus SigLIP's pooling head; the LM is unchanged
    assert_same_state(model.vision_tower.state_dict(), ckpt["siglip_full_model"].vision_model.state_dict(),
                      skip=("head.",))
    assert_same_state(model.language_model.state_dict(), ckpt["lm_tied_model"].state_dict())
    assert model.config.tie_word_embeddings
    assert model.language_model.lm_head.weight is model.get_input_embeddings().weight
    assert len(side.tokenizer) == len(ckpt["tok_with"])
    assert side.image_token_id == ckpt["tok_with"].convert_tokens_to_ids("<image>")
    # one image -> pool_size**2 = 9 tokens of the LM's width
    inputs = side.image_inputs([image()])
    assert side.num_image_tokens(inputs, 0) == 9 == model.num_image_tokens()
    (features,) = model.get_image_features(inputs["pixel_values"])
    assert features.shape == (9, 32)
    check_forward_and_generate(model, side, 9, image())
    assert any("pooled to 9 per image" in line for line in lines), lines
    assert any("already in the tokenizer" in line for line in lines), lines


def test_missing_image_token_is_added_and_embeddings_grow_by_mean_rows(ckpt, built):
    out, lines = built["added_token"]
    model, side = load_student(out)
    source, old = ckpt["lm_untied_model"].state_dict(), len(ckpt["tok_without"])
    # the tokenizer gains "<image>" as a special token at the end, keeping its chat template
    assert len(side.tokenizer) == old + 1
    assert side.image_token_id == old and "<image>" in side.tokenizer.all_special_tokens
    assert side.tokenizer.chat_template == CHATML_TEMPLATE
    assert side.tokenizer("a <image> b", add_special_tokens=False)["input_ids"].count(old) == 1
    # embeddings and the untied head grow by one row, the mean of the old rows; every original row is unchanged
    assert model.config.text_config.vocab_size == old + 1
    lm = model.language_model.state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert lm[key].shape == (old + 1, 32)
        assert torch.equal(lm[key][:old], source[key]), key
        torch.testing.assert_close(lm[key][old], source[key].mean(0))
    rest = {k: v for k, v in source.items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    assert_same_state({k: v for k, v in lm.items() if k in rest}, rest)
    assert_same_state(model.vision_tower.state_dict(), ckpt["siglip_vision_model"].state_dict(), skip=("head.",))
    check_forward_and_generate(model, side, 4, image())
    assert any("new rows = mean" in line for line in lines), lines


def test_padded_vocabulary_takes_a_padding_row_without_resizing(ckpt, built):
    out, lines = built["padded_vocab"]
    model, side = load_student(out)
    old = len(ckpt["tok_without"])
    assert side.image_token_id == old  # one of the 8 padding rows
    assert model.config.text_config.vocab_size == old + 8
    assert_same_state(model.language_model.state_dict(), ckpt["lm_padded_model"].state_dict())
    check_forward_and_generate(model, side, 4, image())
    assert any("not resized" in line for line in lines), lines


def test_full_clip_with_anyres(ckpt, built):
    out, _ = built["clip_anyres"]
    model, side = load_student(out)
    assert_same_state(model.vision_tower.state_dict(), ckpt["clip_full_model"].vision_model.state_dict())
    img = image(32, 64)  # (h, w): exactly the 32 x 64 pinpoint, one row of two tiles
    inputs = side.image_inputs([img])
    n = side.num_image_tokens(inputs, 0)
    assert model.config.anyres_grid((32, 64)) == (1, 2)
    assert n == model.num_image_tokens((32, 64)) == (1 + 2) * 2 * 2  # base view + 2 tiles, 2 x 2 each
    assert model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])[0].shape == (n, 32)
    check_forward_and_generate(model, side, n, img)


def test_projector_comes_from_the_seed(built):
    p0 = load_student(built["full_siglip"][0])[0].projector.state_dict()
    p1 = load_student(built["seed1"][0])[0].projector.state_dict()
    assert not torch.equal(p0["linear_1.weight"], p1["linear_1.weight"])
    fresh = load_student(built["full_siglip"][0])[0].projector  # a copy to re-initialise
    init_projector(fresh, std=0.02, seed=0)
    assert_same_state(fresh.state_dict(), p0)
    assert torch.count_nonzero(p0["linear_1.bias"]) == 0
    assert 0.015 < p0["linear_2.weight"].std() < 0.025  # N(0, 0.02), 32 x 32 draws


def test_dtype_casts_every_part(ckpt, built):
    out, lines = built["bf16"]
    model, side = load_student(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_same_state(model.language_model.state_dict(), ckpt["lm_tied_model"].state_dict())  # cast to bf16
    check_forward_and_generate(model, side, 9, image())
    assert "bfloat16" in lines[0]


# ---- errors -----------------------------------------------------------------------------------------------------
def test_refuses_bad_inputs(ckpt, tmp_path):
    with pytest.raises(ValueError, match="model_type 'qwen2'.*supported"):
        init_student(ckpt["lm_tied"], ckpt["lm_tied"], tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        init_student(tmp_path / "nowhere", ckpt["lm_tied"], tmp_path / "a")
    with pytest.raises(ValueError, match="pool_size=5 must be in"):
        init_student(ckpt["siglip_full"], ckpt["lm_tied"], tmp_path / "a", pool_size=5)
    with pytest.raises(ValueError, match="image_token='<img>' is not supported"):
        init_student(ckpt["siglip_full"], ckpt["lm_tied"], tmp_path / "a", image_token="<img>")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        init_student(ckpt["siglip_full"], ckpt["lm_tied"], tmp_path / "full")
    assert not (tmp_path / "a").exists()


def test_refuses_processor_of_another_size(ckpt, tmp_path):
    ckpt["siglip_vision_model"].save_pretrained(tmp_path / "vision")
    SiglipImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match=r"outputs \(64, 64\) images but the vision tower reads \(32, 32\)"):
        init_student(tmp_path / "vision", ckpt["lm_tied"], tmp_path / "out")


def test_refuses_checkpoint_that_does_not_cover_its_model(ckpt, tmp_path):
    ckpt["siglip_vision_model"].save_pretrained(tmp_path / "vision")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vision")
    config = json.loads((tmp_path / "vision" / "config.json").read_text())
    config["num_hidden_layers"] = 3  # layer 2 has no weights
    (tmp_path / "vision" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing keys.*encoder.layers.2"):
        init_student(tmp_path / "vision", ckpt["lm_tied"], tmp_path / "out")


def test_copy_weights_checks_keys_and_shapes():
    target = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"missing from the checkpoint \['bias'\]"):
        copy_weights(target, {"weight": torch.zeros(2, 3)}, "layer")
    with pytest.raises(ValueError, match=r"unknown to the student \['scale'\]"):
        copy_weights(target, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2), "scale": torch.ones(1)}, "layer")
    with pytest.raises(ValueError, match=r"layer.weight has shape \(3, 2\) in the checkpoint and \(2, 3\)"):
        copy_weights(target, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}, "layer")
    copy_weights(target, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "layer")
    assert torch.equal(target.weight, torch.ones(2, 3))


# ---- command line -----------------------------------------------------------------------------------------------
def test_cli(ckpt, tmp_path, capsys):
    argv = ["init-student", "--vision", str(ckpt["siglip_vision"]), "--llm", str(ckpt["lm_tied"]),
            "--out", str(tmp_path / "s"), "--pool-size", "2"]
    assert main(argv) == 0
    assert "init-student: wrote" in capsys.readouterr().out
    assert load_student(tmp_path / "s")[0].num_image_tokens() == 4
    assert main(argv) == 2  # --out is no longer empty
    assert "not empty" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--compressor", "none"]) == 0
    assert load_student(tmp_path / "s")[0].num_image_tokens() == 16  # every patch of the 4 x 4 grid

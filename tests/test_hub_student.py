"""A saved student loads and generates without emkd: ``save_pretrained`` ships ``student.py`` and ``auto_map``.

The no-emkd side runs in a subprocess started with ``python -I -S``: no ``site`` processing, so the editable
install's ``.pth`` (which puts emkd's ``src`` on the path) is never read, and ``sys.path`` gets only the venv's
site-packages. The subprocess checks that ``import emkd`` fails, loads each checkpoint (single-tile and AnyRes) with
``AutoModelForCausalLM`` / ``AutoProcessor.from_pretrained(directory, trust_remote_code=True)``, renders an image and
a prompt with the processor and generates greedily; the inputs and the generated ids must equal what emkd's side
renders and the emkd-loaded model generates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from emkd.models.student import EfficientMLLMConfig, EfficientMLLMForCausalLM, EfficientMLLMProcessor
from emkd.models.student_side import load_student
from emkd.models.tiny import save_tiny_student
from emkd.models.tokenizer import build_tokenizer

CORPUS = [
    "Describe the image in one sentence.",
    "A red square and a blue circle on a white background.",
    "The shape on the left is a dark green triangle.",
] * 4
PROMPT = "Describe the image in one sentence."
NEW_TOKENS = 8

# Runs without emkd: argv = [site-packages dirs as JSON, checkpoint dirs as JSON, image .npy, output .json].
CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = json.loads(sys.argv[1])
    try:
        import emkd
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"emkd is importable from {emkd.__file__}")
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    image = Image.fromarray(np.load(sys.argv[3]))
    results = []
    for directory in json.loads(sys.argv[2]):
        model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=text, images=[image], add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        results.append({
            "model_class": type(model).__module__ + "." + type(model).__name__,
            "processor_class": type(processor).__module__ + "." + type(processor).__name__,
            "inputs": {k: v.flatten().tolist() for k, v in inputs.items()},
            "generated": out[0].tolist(),
        })
    json.dump({"emkd_loaded": "emkd" in sys.modules, "results": results}, open(sys.argv[4], "w"))
    """
).replace("PROMPT", repr(PROMPT)).replace("NEW_TOKENS", str(NEW_TOKENS))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def student_dir(tok, tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("hub-student"), tok, seed=3)


@pytest.fixture(scope="module")
def anyres_dir(tok, tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("hub-anyres"), tok, seed=4, anyres=True)


def rgb(h: int = 40, w: int = 70, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def emkd_inputs(side, images: list) -> dict[str, torch.Tensor]:
    """One prompt rendered by emkd's side, as the data pipeline does: each ``<image>`` expanded to its token count."""
    tok = side.tokenizer
    image_inputs = side.image_inputs(images)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": PROMPT}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    ids, k = [], 0
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        if t == side.image_token_id:
            ids += [t] * side.num_image_tokens(image_inputs, k)
            k += 1
        else:
            ids.append(t)
    input_ids = torch.tensor([ids])
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **image_inputs}


def test_save_pretrained_ships_code_and_auto_map(student_dir):
    config = json.loads((student_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "student.EfficientMLLMConfig",
        "AutoModelForCausalLM": "student.EfficientMLLMForCausalLM",
        "AutoProcessor": "student.EfficientMLLMProcessor",
    }
    code = (student_dir / "student.py").read_text()
    top_level = {line.split()[1].split(".")[0] for line in code.splitlines() if line.startswith(("import ", "from "))}
    assert "emkd" not in top_level and not any(m.startswith(".") for m in top_level)


def test_emkd_loading_is_unchanged(student_dir, tmp_path):
    """With emkd imported, the registered classes load the directory without trust_remote_code, and a directory
    saved before the code was shipped (no auto_map, no student.py) still loads."""
    assert type(AutoModelForCausalLM.from_pretrained(student_dir)) is EfficientMLLMForCausalLM
    assert type(EfficientMLLMConfig.from_pretrained(student_dir)) is EfficientMLLMConfig
    assert type(AutoProcessor.from_pretrained(student_dir)) is EfficientMLLMProcessor
    old = tmp_path / "old"
    shutil.copytree(student_dir, old)
    (old / "student.py").unlink()
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"]
    (old / "config.json").write_text(json.dumps(config))
    model, _side = load_student(old)
    assert type(model) is EfficientMLLMForCausalLM
    assert type(AutoProcessor.from_pretrained(old)) is EfficientMLLMProcessor


@pytest.mark.parametrize("anyres", [False, True])
def test_processor_renders_like_the_side(anyres, student_dir, anyres_dir, tmp_path):
    """The checkpoint's processor gives the inputs emkd's side renders, single-tile and AnyRes, and survives a
    save/load round trip."""
    directory = anyres_dir if anyres else student_dir
    _model, side = load_student(directory)
    processor = AutoProcessor.from_pretrained(directory, backend="pil")
    images = [Image.fromarray(rgb()), Image.fromarray(rgb(50, 20, 1))]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": PROMPT}]
    text = side.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    got = processor(text=text, images=images, add_special_tokens=False)
    image_inputs = side.image_inputs(images)
    assert set(got) == {"input_ids", "attention_mask", *image_inputs}
    for key, value in image_inputs.items():
        torch.testing.assert_close(got[key], value)
    n = [side.num_image_tokens(image_inputs, i) for i in range(2)]
    assert (got["input_ids"] == side.image_token_id).sum() == sum(n)
    if anyres:
        assert n[0] != n[1]  # differently shaped images get different tile counts
    processor.save_pretrained(tmp_path / "processor")
    again = AutoProcessor.from_pretrained(tmp_path / "processor", backend="pil")
    assert type(again) is EfficientMLLMProcessor
    for key, value in again(text=text, images=images, add_special_tokens=False).items():
        torch.testing.assert_close(value, got[key])
    with pytest.raises(ValueError, match="2 '<image>' placeholders but 1 images"):
        processor(text=text, images=images[:1])


def test_loads_and_generates_without_emkd(student_dir, anyres_dir, tmp_path):
    """In a Python that cannot import emkd: AutoModelForCausalLM / AutoProcessor with trust_remote_code=True load
    both checkpoints, and greedy generation equals the emkd-loaded model's on the inputs emkd's side renders."""
    directories = [student_dir, anyres_dir]
    np.save(tmp_path / "image.npy", rgb())
    (tmp_path / "child.py").write_text(CHILD)
    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "child.py"), json.dumps(site_packages),
         json.dumps([str(d) for d in directories]), str(tmp_path / "image.npy"), str(tmp_path / "out.json")],
        env=env, cwd=tmp_path, check=True, timeout=300, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    assert "Do you wish to run the custom code" not in done.stdout + done.stderr  # trust_remote_code reaches all parts
    child = json.loads((tmp_path / "out.json").read_text())
    assert not child["emkd_loaded"]
    for directory, result in zip(directories, child["results"], strict=True):
        assert result["model_class"].startswith("transformers_modules.")
        assert result["model_class"].endswith(".student.EfficientMLLMForCausalLM")
        assert result["processor_class"].endswith(".student.EfficientMLLMProcessor")
        model, side = load_student(directory)
        inputs = emkd_inputs(side, [Image.fromarray(rgb())])
        assert set(result["inputs"]) == set(inputs)
        for key, value in inputs.items():
            torch.testing.assert_close(torch.tensor(result["inputs"][key], dtype=value.dtype), value.flatten())
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert result["generated"] == out[0].tolist()
        assert len(result["generated"]) == inputs["input_ids"].shape[1] + NEW_TOKENS

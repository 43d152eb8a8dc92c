"""Small Hugging Face tokenizers built offline, for tests and the demo.

A real run loads the teacher's and student's tokenizers from their checkpoints. Tests and the demo cannot reach a
model hub, so they build a byte-level BPE tokenizer with the ``tokenizers`` library, give it the special tokens of
the Qwen2 / LLaVA families and a ChatML chat template, and save it like any Hugging Face tokenizer
(``tokenizer.json`` + ``tokenizer_config.json``), so that loading it takes the same path as a user's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# ChatML, as Qwen2 uses it. A message's content is either a string or a list of {"type": "text"|"image"} parts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512, min_frequency: int = 1) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus`` with the special tokens above and a ChatML chat template.

    The result is deterministic for a given corpus; ``<|endoftext|>`` is the pad and end-of-sequence token and
    ``<|im_end|>`` ends every turn.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast

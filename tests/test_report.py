"""The demo report's measures: vision tokens decoded to their top word, and how many of an image's tokens share one."""

from __future__ import annotations

import pytest
import torch

from emkd.demo.report import decode_vision_tokens, vision_vocabulary


class Words:
    """A tokenizer with a word per id; id 0 is special (a template token), so it never decodes."""

    all_special_ids = [0]

    def decode(self, ids):
        return ["<s>", "red", "four", "how", " "][ids[0]]


def one_hot(words: list[int], v: int = 5) -> torch.Tensor:
    z = torch.zeros(len(words), v)
    z[torch.arange(len(words)), torch.tensor(words)] = 3.0
    z[:, 0] = 10.0  # the special token would win every row
    return z


def test_decode_vision_tokens_leaves_special_tokens_out_and_marks_blank_words():
    assert decode_vision_tokens(one_hot([1, 2, 4]), Words()) == ["red", "four", "·"]


def test_vision_vocabulary_measures_one_word_per_image():
    images = [one_hot([1, 1, 1, 2]), one_hot([2, 2, 2, 2]), one_hot([1, 3, 3, 2])]
    v = vision_vocabulary(images, Words())
    assert (v.images, v.tokens) == (3, 12)
    assert v.image_word_share == pytest.approx((3 / 4 + 1 + 2 / 4) / 3)
    assert v.distinct_image_words == 3 and v.common_words[0][1] == 1
    same = vision_vocabulary([one_hot([3] * 4)] * 5, Words())
    assert same.image_word_share == 1.0 and same.distinct_image_words == 1 and same.common_words == [("how", 5)]
    assert same.sentence("teacher") == ('teacher: 100 % of an image\'s 4 vision tokens decode to the image\'s most '
                                        'common word; over 5 images that word is one of 1 (most often "how" (5)).')
    with pytest.raises(ValueError, match="at least one image"):
        vision_vocabulary([], Words())

"""Answer normalisation and matching for short-answer and multiple-choice evaluation.

:func:`normalize_answer` follows the SQuAD / VQA habit of comparing answers after light normalisation (lower case,
no punctuation, no articles, single spaces) and adds VQA's mapping of number words to digits (``"two"`` -> ``"2"``,
zero to twenty). :func:`is_correct` is exact match of the normalised strings.

Multiple choice (a record with ``choices``; choice ``k`` has letter ``"ABCD..."[k]``): :func:`extract_choice` reads
the letter a free-form answer names, in this order:

1. a leading letter: ``"B"``, ``"(B)"``, ``"[B]"``, ``"B)"``, ``"B."``, ``"B:"``, ``"B. red"``, optionally after
   ``"answer"`` / ``"option"`` / ``"the answer is"`` (``"Answer: B"``). A bare letter followed by a space and more
   text (``"A red square"``) is *not* read as a letter, since it is usually an article;
2. the text of a choice, after normalisation (``"red"`` -> the letter of choice ``"Red."``);
3. (as MMBench's ``can_infer_text``) the text of exactly one choice contained, as whole words, in the answer
   (``"the square is red"``); a choice contained in another matching choice (``"red"`` in ``"dark red"``) does not
   count, and two or more matches give no letter.

A letter outside the choices (``"E"`` of four) is no answer. :func:`is_correct` with choices compares the letters of
the prediction and of the reference; the reference must name a choice.
"""

from __future__ import annotations

import re
import string
import unicodedata

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
LETTERS = string.ascii_uppercase

_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")  # "1,000" -> "1000"
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")  # "3.5" keeps its point
_POINT_HOLDER = "\ue000"  # a private-use character that is never punctuation in real text
_PREFIX = r"(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*)?"
_LEADING_LETTER = re.compile(
    r"^\s*" + _PREFIX + r"(?:"
    r"[(\[]\s*(?P<bracketed>[a-z])\s*[)\]]"  # (B) [B]
    r"|(?P<closed>[a-z])(?:\)|[.:,;](?=\s|$))"  # B) B. B: B, -- followed by a space or the end
    r"|(?P<alone>[a-z])\s*$"  # B
    r")",
    re.IGNORECASE,
)


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(s: str) -> str:
    """Normalise an answer for exact match.

    Lower case; apostrophes removed (``"don't"`` -> ``"dont"``); thousands commas inside numbers removed
    (``"1,000"`` -> ``"1000"``); a decimal point between digits kept (``"3.5"``); every other punctuation character
    (ASCII ``string.punctuation`` and Unicode ``P*``) becomes a space; the articles ``a``, ``an``, ``the`` are
    dropped as whole words; number words ``zero`` .. ``twenty`` become digits; whitespace is collapsed and stripped.
    """
    s = s.lower()
    s = s.replace("'", "").replace("\u2019", "")
    s = _DIGIT_COMMA.sub("", s)
    s = _DECIMAL_POINT.sub(_POINT_HOLDER, s)
    s = "".join(" " if _is_punctuation(c) else c for c in s)
    s = s.replace(_POINT_HOLDER, ".")
    words = [NUMBER_WORDS.get(w, w) for w in s.split() if w not in ARTICLES]
    return " ".join(words)


def _contains_phrase(text: str, phrase: str) -> bool:
    """Whether normalised ``phrase`` occurs in normalised ``text`` as whole words."""
    return bool(phrase) and f" {phrase} " in f" {text} "


def extract_choice(pred: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The letter (``"A"``, ``"B"``, ...) of the choice ``pred`` names, or ``None`` (see the module docstring).

    Args:
        pred: a free-form answer (a model's prediction or a reference).
        choices: the choices' texts, in letter order (at most 26).
    """
    if not 1 <= len(choices) <= len(LETTERS):
        raise ValueError(f"extract_choice: need 1 to {len(LETTERS)} choices, got {len(choices)}")
    letters = LETTERS[: len(choices)]
    match = _LEADING_LETTER.match(pred)
    if match is not None:
        letter = next(g for g in match.group("bracketed", "closed", "alone") if g is not None).upper()
        return letter if letter in letters else None
    norm = normalize_answer(pred)
    texts = [normalize_answer(c) for c in choices]
    exact = [letter for letter, text in zip(letters, texts) if text and text == norm]
    if len(exact) == 1:
        return exact[0]
    if exact:  # two choices with the same normalised text: the answer cannot tell them apart
        return None
    found = [k for k, text in enumerate(texts) if _contains_phrase(norm, text)]
    # a choice inside another found choice ("red" in "dark red") was only found as part of it
    found = [k for k in found if not any(j != k and _contains_phrase(texts[j], texts[k]) for j in found)]
    return letters[found[0]] if len(found) == 1 else None


def is_correct(pred: str, answer: str, choices: list[str] | tuple[str, ...] | None = None) -> bool:
    """Exact match after :func:`normalize_answer`; with ``choices``, the letters :func:`extract_choice` reads.

    Raises:
        ValueError: with ``choices``, when the reference ``answer`` names no choice.
    """
    if choices is None:
        return normalize_answer(pred) == normalize_answer(answer)
    expected = extract_choice(answer, choices)
    if expected is None:
        raise ValueError(
            f"the reference answer {answer!r} names none of the choices {list(choices)} (give a letter such as 'A' "
            "or the text of one choice)"
        )
    return extract_choice(pred, choices) == expected


__all__ = ["ARTICLES", "LETTERS", "NUMBER_WORDS", "extract_choice", "is_correct", "normalize_answer"]

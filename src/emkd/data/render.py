"""Rendering a record to token ids, labels and masks: for one model side, and for a student/teacher pair.

Templates (:data:`TEMPLATES`):

* ``chat``: the tokenizer's own chat template (``tokenizer.apply_chat_template``), every turn kept.
* ``plain``: LLaVA's pretraining template for caption alignment (``conv_llava_plain`` / ``preprocess_plain``): the
  sample is the image(s), then the assistant caption, then the tokenizer's ``eos_token``. The human text other than
  its ``<image>`` markers (e.g. "Give a brief description of the image.") is dropped, as LLaVA's plain template drops
  it, so ``instruction_mask`` is all False. (LLaVA ends the caption with the separator ``"\\n"``; we end it with the
  EOS token so that the student learns to stop.) Only ``[user, assistant]`` records are accepted.

How a sample becomes tokens (the same procedure on both sides of a pair):

1. The template is rendered to a string in which every image is an ``<image>`` marker. With ``chat``, the template
   is rendered once with a unique placeholder as each message's content, the placeholders are located and replaced
   by the real contents; this gives the exact character span of every turn's content. The result is compared with
   the template's rendering of the real messages, and a template that alters contents (e.g. strips them) is refused
   (``template`` problem) rather than mis-labelled.
2. The string is cut at every content boundary and at every marker; each text piece is tokenized on its own with
   ``add_special_tokens=False``. For ChatML-style templates (Qwen2, our test tokenizer) and byte-level BPE, every
   boundary is a special token or a header newline, so this equals tokenizing the whole string (a test pins it); an
   assistant turn's content is tokenized from its first character, as the model generates it at inference.
3. Each marker ``i`` becomes ``tokens(image_wrapper[0]) + [side.image_token_id] * side.num_image_tokens(inputs, i)
   + tokens(image_wrapper[1])``. :func:`render_pair` uses the TEACHER's ``image_wrapper`` on both sides, so the text
   tokens of the two renderings are identical; only the image tokens differ (checked on every sample).

Supervision (``labels``, Hugging Face convention, ``labels[i] = input_ids[i]`` where supervised, else ``-100``): the
tokens of every assistant turn's content plus the end-of-turn token right after it (the longest special token that
the template places immediately after the content, e.g. ``<|im_end|>``; ``eos_token`` with ``plain``). Role
headers, system and user turns, image and wrapper tokens, and the newline after ``<|im_end|>`` are ``-100``.
``instruction_mask`` is True on the text tokens of user turns' contents only (not headers, not image or wrapper
tokens).

Length policy (``max_length``): a sample must fit, on each side, every image block and the prompt plus the first
response token, i.e. ``max(end of the last image block, first supervised position + 1) <= max_length``; otherwise it
is a ``too_long`` problem (never truncated inside image tokens or the prompt). A sample that fits but is longer is
truncated from the end by the same number of tokens on both sides (all of them text tokens after the last image,
identical on both sides), so the teacher sequence is exactly ``max_length`` long, the student's shorter by its
smaller image-token count, and the rest of a long response is simply not supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from emkd.data.records import IMAGE_MARKER, Problem, Record
from emkd.errors import UserError
from emkd.inputs import IGNORE_INDEX

TEMPLATES = ("plain", "chat")


class SampleError(UserError):
    """A record that cannot be rendered for a reason of its own (reported as a :class:`Problem` of ``kind``).

    A :class:`~emkd.errors.UserError`: the data is what needs fixing. The message is the reason alone; whoever
    raises it past a record's scan (:class:`~emkd.data.PairDataset`) adds the record's file, line and id."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind

    @property
    def problem(self) -> Problem:
        return Problem(self.kind, str(self))


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the rendered string that hold a turn's content (assistant: + end-of-turn)."""

    start: int
    end: int
    role: str


@dataclass(frozen=True)
class RenderedText:
    """A rendered conversation with ``<image>`` markers and the sorted, disjoint content spans of its turns."""

    text: str
    spans: tuple[Span, ...]

    def supervised_text(self) -> list[str]:
        """The text of every supervised span (assistant content + end-of-turn), in order."""
        return [self.text[s.start : s.end] for s in self.spans if s.role == "assistant"]


# ---- step 1: the template -------------------------------------------------------------------------------------------
def _special_tokens(tokenizer: Any) -> list[str]:
    """Special token strings of ``tokenizer`` (longest first), without the image marker."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content) if hasattr(tok, "content") else str(tok))
    found.discard(IMAGE_MARKER)
    found.discard("")
    return sorted(found, key=len, reverse=True)


def _apply_template(tokenizer: Any, messages: list[dict]) -> str:
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a Jinja template may raise anything (e.g. raise_exception on roles)
        raise SampleError("template", f"the chat template refused the conversation ({type(e).__name__}: {e})") from e
    if not isinstance(out, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(out).__name__}, expected str")
    return out


def _render_chat(record: Record, tokenizer: Any) -> RenderedText:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template or use template='plain'")
    contents = [t.text for t in record.messages]
    holders = [f"\ue000{k}\ue001" for k in range(len(contents))]  # private-use characters: never in real text
    skeleton = _apply_template(tokenizer, [{"role": t.role, "content": h} for t, h in zip(record.messages, holders)])
    pieces: list[str] = []
    starts: list[int] = []
    length, pos = 0, 0
    for holder, content in zip(holders, contents):
        at = skeleton.find(holder, pos)
        if at < 0 or skeleton.count(holder) != 1:
            raise SampleError("template", "the chat template does not render every message content exactly once")
        pieces.append(skeleton[pos:at])
        length += at - pos
        starts.append(length)
        pieces.append(content)
        length += len(content)
        pos = at + len(holder)
    pieces.append(skeleton[pos:])
    text = "".join(pieces)
    real = _apply_template(tokenizer, [{"role": t.role, "content": c} for t, c in zip(record.messages, contents)])
    if real != text:
        raise SampleError(
            "template",
            "the chat template changes message contents (e.g. strips them); labels could not be placed exactly",
        )
    specials = _special_tokens(tokenizer)
    spans = []
    for turn, start, content in zip(record.messages, starts, contents):
        end = start + len(content)
        if turn.role == "assistant":
            after = text[end:]
            eot = next((s for s in specials if after.startswith(s)), None)
            if eot is None:
                raise SampleError(
                    "template",
                    f"no end-of-turn token after an assistant turn: the chat template continues with {after[:24]!r}, "
                    "which does not start with a special token",
                )
            end += len(eot)
        spans.append(Span(start, end, turn.role))
    return RenderedText(text, tuple(spans))


def _render_plain(record: Record, tokenizer: Any) -> RenderedText:
    roles = [t.role for t in record.messages]
    if roles != ["user", "assistant"]:
        raise SampleError("template", f"the plain template needs roles ['user', 'assistant'], found {roles}")
    if not tokenizer.eos_token:
        raise ValueError("the plain template ends the caption with eos_token, but the tokenizer has none")
    prefix = IMAGE_MARKER * record.messages[0].num_images  # the human text is dropped (LLaVA preprocess_plain)
    text = prefix + record.messages[1].text + tokenizer.eos_token
    return RenderedText(text, (Span(len(prefix), len(text), "assistant"),))


def render_text(record: Record, tokenizer: Any, template: str = "chat") -> RenderedText:
    """Render ``record`` with ``template`` to a string with ``<image>`` markers and exact content spans."""
    if template == "chat":
        rendered = _render_chat(record, tokenizer)
    elif template == "plain":
        rendered = _render_plain(record, tokenizer)
    else:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    n = rendered.text.count(IMAGE_MARKER)
    if n != record.num_image_markers:
        raise SampleError(
            "template", f"the rendered text has {n} <image> markers, the record {record.num_image_markers}"
        )
    return rendered


# ---- steps 2-3: tokens ----------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One side's rendering as Python lists (before tensors): ids, labels and masks of equal length."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    instruction: list[bool] = field(default_factory=list)
    vision: list[bool] = field(default_factory=list)
    image_end: int = 0  # position right after the last image block (wrapper included); 0 without images

    def first_label(self) -> int | None:
        return next((i for i, y in enumerate(self.labels) if y != IGNORE_INDEX), None)

    def text_ids(self) -> list[int]:
        return [i for i, v in zip(self.ids, self.vision) if not v]

    def required_length(self) -> int:
        """Tokens that may not be cut: every image block, and the prompt plus the first response token."""
        first = self.first_label()
        return max(self.image_end, 0 if first is None else first + 1)

    def drop_last(self, n: int) -> None:
        if n > 0:
            for name in ("ids", "labels", "instruction", "vision"):
                setattr(self, name, getattr(self, name)[:-n])


def _pieces(rendered: RenderedText) -> list[tuple[str, str | None]]:
    """``(role, text)`` pieces in order, ``role`` ``""`` outside contents; ``text`` ``None`` for an image marker."""
    cut: list[tuple[str, str]] = []
    pos = 0
    for span in rendered.spans:
        if span.start > pos:
            cut.append(("", rendered.text[pos : span.start]))
        cut.append((span.role, rendered.text[span.start : span.end]))
        pos = span.end
    if pos < len(rendered.text):
        cut.append(("", rendered.text[pos:]))
    out: list[tuple[str, str | None]] = []
    for role, text in cut:
        for k, chunk in enumerate(text.split(IMAGE_MARKER)):
            if k:
                out.append((role, None))
            if chunk:
                out.append((role, chunk))
    return out


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode(
    rendered: RenderedText,
    side: Any,
    image_inputs: dict[str, torch.Tensor],
    image_wrapper: tuple[str, str] | None = None,
) -> Encoded:
    """Tokenize ``rendered`` with ``side.tokenizer`` and expand its markers with ``side``'s image tokens.

    Args:
        rendered: the output of :func:`render_text`.
        side: a :class:`emkd.models.VisionSide`.
        image_inputs: ``side.image_inputs(images)`` of this sample (``{}`` without images).
        image_wrapper: text around each image's tokens; ``side.image_wrapper`` when ``None``.

    Raises:
        SampleError: ``image_token_in_text`` when the text itself tokenizes to ``side.image_token_id``.
    """
    tok = side.tokenizer
    wrapper = side.image_wrapper if image_wrapper is None else image_wrapper
    pieces = _pieces(rendered)
    wrap_open, wrap_close = (_token_ids(tok, [w])[0] if w else [] for w in wrapper)
    text_ids = iter(_token_ids(tok, [t for _, t in pieces if t is not None]))
    enc = Encoded()
    image_index = 0
    for role, text in pieces:
        if text is None:
            n = int(side.num_image_tokens(image_inputs, image_index))
            image_index += 1
            block = wrap_open + [side.image_token_id] * n + wrap_close
            enc.ids += block
            enc.labels += [IGNORE_INDEX] * len(block)
            enc.instruction += [False] * len(block)
            enc.vision += [False] * len(wrap_open) + [True] * n + [False] * len(wrap_close)
            enc.image_end = len(enc.ids)
            continue
        ids = next(text_ids)
        if side.image_token_id in ids:
            raise SampleError(
                "image_token_in_text",
                f"the text {text[:40]!r} tokenizes to the image token id {side.image_token_id} "
                f"({tok.convert_ids_to_tokens(side.image_token_id)!r}) outside an image",
            )
        enc.ids += ids
        enc.labels += ids if role == "assistant" else [IGNORE_INDEX] * len(ids)
        enc.instruction += [role == "user"] * len(ids)
        enc.vision += [False] * len(ids)
    return enc


def _check_fits(enc: Encoded, drop: int, max_length: int, name: str) -> None:
    first = enc.first_label()
    if first is None:
        raise SampleError("no_assistant", "the rendering has no supervised token")
    need = enc.required_length()
    if len(enc.ids) - drop < need:
        raise SampleError(
            "too_long",
            f"{name}: the prompt and image tokens need {need} tokens ({sum(enc.vision)} image tokens, images end at "
            f"{enc.image_end}, first response token at {first}), but max_length is {max_length}",
        )


def _as_tensors(enc: Encoded, image_inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "input_ids": torch.tensor(enc.ids, dtype=torch.long),  # (L,)
        "labels": torch.tensor(enc.labels, dtype=torch.long),  # (L,)
        "attention_mask": torch.ones(len(enc.ids), dtype=torch.long),  # (L,)
        "instruction_mask": torch.tensor(enc.instruction, dtype=torch.bool),  # (L,)
        "image_inputs": image_inputs,
    }


def _image_inputs(side: Any, images: list, record: Record) -> dict[str, torch.Tensor]:
    if len(images) != record.num_image_markers:
        raise SampleError("image_count", f"{record.num_image_markers} <image> markers but {len(images)} images")
    return side.image_inputs(images) if images else {}


def render_side(
    record: Record,
    images: list,
    side: Any,
    template: str = "chat",
    max_length: int | None = None,
    image_wrapper: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Render ``record`` for one model side.

    Returns:
        ``{"input_ids", "labels", "attention_mask", "instruction_mask"}`` as ``[L]`` tensors (long, long, long, bool)
        and ``"image_inputs"``, ``side.image_inputs(images)`` (``{}`` without images).

    Raises:
        SampleError: ``too_long``, ``template``, ``image_count`` or ``image_token_in_text``.
    """
    image_inputs = _image_inputs(side, images, record)
    enc = encode(render_text(record, side.tokenizer, template), side, image_inputs, image_wrapper)
    if max_length is not None:
        drop = max(len(enc.ids) - max_length, 0)
        _check_fits(enc, drop, max_length, "sample")
        enc.drop_last(drop)
    return _as_tensors(enc, image_inputs)


def check_same_text(student: Encoded, teacher: Encoded, where: str = "sample") -> None:
    """Raise ``ValueError`` unless the non-image token ids of the two renderings are identical, in order, and their
    labels and instruction masks agree on them."""
    s, t = student.text_ids(), teacher.text_ids()
    if s == t:
        for name in ("labels", "instruction"):
            a = [x for x, v in zip(getattr(student, name), student.vision) if not v]
            b = [x for x, v in zip(getattr(teacher, name), teacher.vision) if not v]
            if a != b:
                raise ValueError(f"{where}: student and teacher {name} differ on the text tokens")
    else:
        pos = next((i for i, (a, b) in enumerate(zip(s, t)) if a != b), min(len(s), len(t)))
        raise ValueError(
            f"{where}: student and teacher text tokens differ from text position {pos} (student {len(s)} text tokens, "
            f"{s[pos:pos + 5]}...; teacher {len(t)}, {t[pos:pos + 5]}...); both sides must tokenize the same "
            "conversation identically"
        )


def render_pair(
    record: Record,
    images: list,
    student_side: Any,
    teacher_side: Any,
    template: str = "chat",
    max_length: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Render ``record`` once per side, with the teacher's ``image_wrapper`` on both.

    Returns:
        ``(student, teacher)``, each as :func:`render_side` returns it. Their non-image ids are identical; labels
        and ``instruction_mask`` agree on them; only the image tokens differ. Truncation (see the module docstring)
        drops the same number of trailing text tokens from both sides.

    Raises:
        SampleError: a problem of the sample (``too_long``, ``template``, ``image_count``, ``image_token_in_text``).
        ValueError: the two sides' text tokens differ (tokenizers or templates that disagree: a configuration bug).
    """
    wrapper = teacher_side.image_wrapper
    encoded = []
    for side in (student_side, teacher_side):
        image_inputs = _image_inputs(side, images, record)
        enc = encode(render_text(record, side.tokenizer, template), side, image_inputs, wrapper)
        encoded.append((enc, image_inputs))
    (s, s_img), (t, t_img) = encoded
    where = f"record {record.source} (id {record.id!r})"
    check_same_text(s, t, where)
    if max_length is not None:
        drop = max(len(s.ids) - max_length, len(t.ids) - max_length, 0)
        _check_fits(t, drop, max_length, "teacher")  # usually the binding side: report it first
        _check_fits(s, drop, max_length, "student")
        s.drop_last(drop)
        t.drop_last(drop)
    return _as_tensors(s, s_img), _as_tensors(t, t_img)

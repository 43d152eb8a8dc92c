"""``emkd eval``: accuracy, vision tokens per image and time-to-first-token of one model on a benchmark file.

Protocol (identical for the student, a vanilla student-class teacher and every Hugging Face teacher):

* Loading (:func:`load_for_eval`): a local checkpoint directory, through the one registry keyed on ``config.json``'s
  ``architectures`` (:func:`emkd.models.teachers.load_teacher`), where this project's student architecture is
  registered beside LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL.
* Data (:func:`read_eval_samples`): LLaVA ``conversations`` or HF ``messages`` records, JSON list or JSONL, which
  must end with an assistant turn. The prompt is every turn up to the last user turn, the reference answer is the
  last assistant turn. A record may carry ``"category"`` (a string; records without one count under ``"all"``) and
  ``"choices"`` (a list of strings, multiple choice: choice ``k`` is letter ``"ABC..."[k]``). The prompt is shown to
  the model as it is written; ``choices`` only tells the scorer how to read answers (:mod:`.normalize`).
* Rendering (:func:`render_prompt`): exactly as the training pipeline renders a conversation for one side
  (:func:`emkd.data.render.render_text` and :func:`emkd.data.render.encode`: each ``<image>`` becomes the side's
  wrapper and image tokens), with the chat template's generation prompt (``add_generation_prompt=True``) appended, so
  the prompt ids are the training ids up to the first token of the answer.
* Generation: greedy (``do_sample=False``), ``max_new_tokens`` new tokens, stopping at the template's end-of-turn
  token or the tokenizer's / generation config's EOS; the prediction is the text before the first of those, decoded
  without special tokens and stripped. ``batch_size > 1`` left-pads the prompts (the tests check that batched and
  unbatched predictions agree on the tiny models); the default is 1.
* Scoring: :func:`emkd.evaluation.normalize.is_correct` (exact match after normalisation; letters for multiple
  choice). Accuracy per category, their mean (``average``, macro) and the accuracy over all samples (``micro``).
* Vision tokens per image: ``(input_ids == side.image_token_id).sum() / number of images`` of each rendered prompt
  with images, averaged over those prompts.
* Time to first token (:func:`measure_ttft`): batch 1, one fixed sample (the first evaluated record with an image;
  the first record when none has one), inputs prepared beforehand (tokenization and image preprocessing are not
  timed). One timed run is a single prefill forward, ``model(**inputs, use_cache=True, logits_to_keep=1)`` plus the
  arg-max of the last position's logits -- what ``generate`` computes before it can emit the first token, without
  its Python set-up -- under ``torch.inference_mode`` with ``torch.set_num_threads(ttft_threads)`` (restored
  afterwards; on CUDA the device is synchronised around each run). ``ttft_warmup`` untimed runs, then the median of
  ``ttft_runs`` timed runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from emkd.data.records import (
    BadRecord,
    Problem,
    Record,
    Source,
    load_images,
    read_objects,
    read_records,
    validate_record,
)
from emkd.data.render import RenderedText, SampleError, encode, render_text
from emkd.evaluation.normalize import LETTERS, extract_choice, is_correct
from emkd.models.base import DistillAdapter, VisionSide

DEFAULT_CATEGORY = "all"
TTFT_METHOD = "prefill forward: model(**inputs, use_cache=True, logits_to_keep=1) + argmax, batch 1"


# ---- data -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSample:
    """One benchmark question: the record, its category, optional choices, and the question and reference texts."""

    record: Record
    category: str
    choices: tuple[str, ...] | None
    question: str  # the last user turn's text (``<image>`` markers included)
    answer: str  # the last assistant turn's text

    @property
    def prompt_record(self) -> Record:
        """The record without its last (assistant) turn: every turn up to the last user turn."""
        return dataclasses.replace(self.record, messages=self.record.messages[:-1])


def _raw_object(path: str, source: Source, cache: dict[str, Any]) -> Any:
    """The decoded JSON value a :class:`Record` was parsed from, decoded as :func:`read_records` decodes it."""
    if "objects" not in cache:
        cache["objects"] = {item.source: item.obj for item in read_objects(path) if not isinstance(item, BadRecord)}
    return cache["objects"][source]


def _meta_problems(obj: Any, record: Record) -> tuple[str, tuple[str, ...] | None, list[Problem]]:
    problems = []
    category = obj.get("category", None)
    if category is None:
        category = DEFAULT_CATEGORY
    elif not isinstance(category, str) or not category:
        problems.append(Problem("malformed_record", f"'category' must be a non-empty string, got {category!r}"))
        category = DEFAULT_CATEGORY
    choices = obj.get("choices", None)
    if choices is not None:
        if (
            not isinstance(choices, list)
            or not 1 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) for c in choices)
        ):
            problems.append(
                Problem("malformed_record", f"'choices' must be a list of 1 to {len(LETTERS)} strings, got {choices!r}")
            )
            choices = None
        else:
            choices = tuple(choices)
            answer = record.messages[-1].text
            if extract_choice(answer, choices) is None:
                problems.append(
                    Problem(
                        "malformed_record",
                        f"the reference answer {answer!r} names none of the choices {list(choices)} (give a letter "
                        "such as 'A' or the text of one choice)",
                    )
                )
    return category, choices, problems


def read_eval_samples(
    path: str | os.PathLike, images_dir: str | os.PathLike | None = None, limit: int | None = None
) -> list[EvalSample]:
    """The first ``limit`` records of ``path`` (all when ``None``) as :class:`EvalSample`, in file order.

    Raises:
        ValueError: any of those records is bad (malformed, roles that do not end with an assistant turn, missing
            image, bad ``category`` / ``choices``); the message lists each bad record with its file and line.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of records, got {limit}")
    path = os.fspath(path)
    samples: list[EvalSample] = []
    bad: list[BadRecord] = []
    cache: dict[str, Any] = {}
    for count, item in enumerate(read_records(path)):
        if limit is not None and count >= limit:
            break
        if isinstance(item, BadRecord):
            bad.append(item)
            continue
        problems = validate_record(item, images_dir, template="chat")
        category, choices, meta = _meta_problems(_raw_object(path, item.source, cache), item)
        problems += meta
        if problems:
            bad.append(BadRecord(item.source, item.id, tuple(problems)))
            continue
        question = item.messages[-2].text  # roles alternate and end with an assistant turn (validated above)
        samples.append(EvalSample(item, category, choices, question, item.messages[-1].text))
    if bad:
        listed = "\n".join(f"  {b}" for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{path}: {len(bad)} bad evaluation record(s):\n{listed}{more}")
    if not samples:
        raise ValueError(f"{path}: no records to evaluate")
    return samples


# ---- models ---------------------------------------------------------------------------------------------------------
def load_for_eval(path: str | os.PathLike, dtype: torch.dtype | None = None) -> DistillAdapter:
    """The :class:`~emkd.models.base.DistillAdapter` of a local checkpoint directory, its model frozen and in
    ``eval()`` mode; the adapter builds the model's inputs (:meth:`~emkd.models.base.DistillAdapter.model_inputs`)
    exactly as in training.

    Every architecture, this project's student (``"EfficientMLLMForCausalLM"``) included, loads through
    :func:`~emkd.models.teachers.load_teacher`'s registry, which names the supported ones when it refuses a checkpoint.
    """
    from emkd.models.teachers import load_teacher

    adapter = load_teacher(path, dtype=dtype)
    adapter.model.eval()
    return adapter


# ---- prompts --------------------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """A rendered prompt: ``input_ids`` ``[L]`` (long), the side's ``image_inputs`` of its images, their number, and
    the number of image tokens (``input_ids == side.image_token_id``)."""

    input_ids: torch.Tensor
    image_inputs: dict[str, torch.Tensor]
    num_images: int
    vision_tokens: int


def render_prompt(record: Record, images: list, side: VisionSide) -> Prompt:
    """Render every turn of ``record`` (which must end with a user turn) followed by the chat template's generation
    prompt, for ``side``, as :func:`emkd.data.render.render_side` renders a training sample.

    Raises:
        SampleError: ``template`` (the template's generation prompt is not an extension of its rendering, or the
            template refuses the conversation), ``image_count`` or ``image_token_in_text``.
    """
    if not record.messages or record.messages[-1].role != "user":
        raise ValueError(f"record {record.source}: a prompt must end with a user turn")
    if len(images) != record.num_image_markers:
        raise SampleError("image_count", f"{record.num_image_markers} <image> markers but {len(images)} images")
    tokenizer = side.tokenizer
    rendered = render_text(record, tokenizer, "chat")  # every turn, exact content spans
    messages = [{"role": t.role, "content": t.text} for t in record.messages]
    try:
        with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a Jinja template may raise anything
        raise SampleError("template", f"the chat template refused the conversation ({type(e).__name__}: {e})") from e
    if not with_prompt.startswith(rendered.text):
        raise SampleError(
            "template",
            "add_generation_prompt=True changes the rendering of the turns before it; cannot append a generation "
            "prompt to the training rendering",
        )
    # the generation prompt (e.g. "<|im_start|>assistant\n") is text outside every content span
    rendered = RenderedText(with_prompt, rendered.spans)
    image_inputs = side.image_inputs(images) if images else {}
    enc = encode(rendered, side, image_inputs)
    ids = torch.tensor(enc.ids, dtype=torch.long)  # (L,)
    return Prompt(ids, image_inputs, len(images), int((ids == side.image_token_id).sum()))


def end_of_turn_token(record: Record, tokenizer: Any) -> str:
    """The special token the chat template puts right after an assistant turn's content (e.g. ``<|im_end|>``), as the
    training renderer finds it for the supervised span of ``record``'s last (assistant) turn."""
    rendered = render_text(record, tokenizer, "chat")
    span = rendered.spans[-1]
    if span.role != "assistant":
        raise ValueError(f"record {record.source}: the last turn must be an assistant turn")
    return rendered.text[span.start + len(record.messages[-1].text) : span.end]


def stop_token_ids(model: torch.nn.Module, tokenizer: Any, end_of_turn: str) -> list[int]:
    """Ids generation stops at: the end-of-turn token, the tokenizer's EOS and the generation config's EOS ids."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def batch_inputs(adapter: DistillAdapter, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    """The model's inputs for a batch of prompts: left-padded ``input_ids`` / ``attention_mask`` ``[B, L]`` and the
    collated image inputs, through the adapter's :meth:`~emkd.models.base.DistillAdapter.model_inputs` (the model's
    device and dtype, and what else the model needs)."""
    side = adapter.side
    tokenizer = side.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    L = max(p.input_ids.numel() for p in prompts)
    input_ids = torch.full((len(prompts), L), int(pad), dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros(len(prompts), L, dtype=torch.long)  # (B, L)
    for b, p in enumerate(prompts):
        n = p.input_ids.numel()
        input_ids[b, L - n :] = p.input_ids
        attention_mask[b, L - n :] = 1
    images = side.collate_image_inputs([p.image_inputs for p in prompts])
    return adapter.model_inputs({"input_ids": input_ids, "attention_mask": attention_mask, **images})


@torch.inference_mode()
def generate_answers(
    adapter: DistillAdapter,
    prompts: list[Prompt],
    stop_ids: list[int],
    max_new_tokens: int = 8,
) -> list[str]:
    """Greedy answers to a batch of prompts: the text before the first stop id, special tokens skipped, stripped."""
    tokenizer = adapter.side.tokenizer
    inputs = batch_inputs(adapter, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    out = adapter.model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad
    )  # (B, L + new)
    new = out[:, inputs["input_ids"].shape[1] :].tolist()  # B x new
    stops = set(stop_ids)
    answers = []
    for ids in new:
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        answers.append(tokenizer.decode(ids[:end], skip_special_tokens=True).strip())
    return answers


def measure_ttft(
    adapter: DistillAdapter,
    prompt: Prompt,
    runs: int = 10,
    warmup: int = 2,
    num_threads: int | None = None,
) -> list[float]:
    """Wall times (ms) of ``runs`` prefill forwards of one prompt at batch 1, after ``warmup`` untimed ones (see the
    module docstring); ``num_threads`` defaults to ``torch.get_num_threads()``."""
    model = adapter.model
    inputs = batch_inputs(adapter, [prompt])
    cuda = model.device.type == "cuda"
    previous = torch.get_num_threads()
    torch.set_num_threads(previous if num_threads is None else num_threads)
    times = []
    try:
        with torch.inference_mode():
            for k in range(warmup + runs):
                if cuda:
                    torch.cuda.synchronize(model.device)
                start = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                out.logits[:, -1].argmax(-1)  # the first token
                if cuda:
                    torch.cuda.synchronize(model.device)
                if k >= warmup:
                    times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous)
    return times


# ---- results --------------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One scored answer."""

    id: str | None
    category: str
    question: str
    answer: str
    prediction: str
    correct: bool


@dataclass
class EvalResult:
    """What ``emkd eval`` reports for one model on one data file (accuracies are fractions in ``[0, 1]``)."""

    model: str = field(metadata={"help": "Checkpoint directory."})
    data: str = field(metadata={"help": "Data file."})
    num_samples: int = field(metadata={"help": "Records evaluated."})
    accuracy: dict[str, float] = field(metadata={"help": "Accuracy per category, in data order."})
    counts: dict[str, int] = field(metadata={"help": "Records per category."})
    correct: dict[str, int] = field(metadata={"help": "Correct answers per category."})
    average: float = field(metadata={"help": "Macro accuracy: mean over categories."})
    micro_accuracy: float = field(metadata={"help": "Accuracy over all records."})
    vision_tokens_per_image: float | None = field(
        metadata={"help": "Image tokens per image, mean over prompts with images (None: no images)."}
    )
    ttft_ms: float | None = field(metadata={"help": "Median time to first token (ms); None with ttft_runs=0."})
    ttft_samples_ms: list[float] = field(metadata={"help": "Every timed run (ms), in order."})
    ttft_threads: int = field(metadata={"help": "torch.set_num_threads during the timed runs."})
    ttft_warmup: int = field(metadata={"help": "Untimed runs before the timed ones."})
    ttft_sample_id: str | None = field(metadata={"help": "Id of the record timed (the first with an image)."})
    ttft_method: str = field(metadata={"help": "What one timed run is."})
    max_new_tokens: int = field(metadata={"help": "Generation budget per answer."})
    batch_size: int = field(metadata={"help": "Prompts per generate call (left padding when > 1)."})
    predictions: list[Prediction] = field(default_factory=list, metadata={"help": "Every scored answer."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        data = dict(data)
        data["predictions"] = [Prediction(**p) for p in data.get("predictions", [])]
        return cls(**data)

    def constant_answers(self, min_records: int = 20) -> dict[str, str]:
        """The categories this model answered with one and the same answer on every record: ``{category: answer}``.

        A model that does so has learned the category's prior, not the task (a stalled or collapsed run), whatever
        its accuracy says. Only categories with at least ``min_records`` predictions and more than one distinct
        reference answer count (a category whose every answer is "yes" is answered well by a constant).
        """
        answers: dict[str, set[str]] = {}
        given: dict[str, set[str]] = {}
        for p in self.predictions:
            answers.setdefault(p.category, set()).add(p.answer)
            given.setdefault(p.category, set()).add(p.prediction)
        return {c: next(iter(given[c])) for c in given
                if self.counts.get(c, 0) >= min_records and len(given[c]) == 1 and len(answers[c]) > 1}

    def write_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def _accuracies(predictions: list[Prediction]) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    counts: dict[str, int] = {}
    correct: dict[str, int] = {}
    for p in predictions:
        counts[p.category] = counts.get(p.category, 0) + 1
        correct[p.category] = correct.get(p.category, 0) + int(p.correct)
    return {c: correct[c] / counts[c] for c in counts}, counts, correct


def evaluate(
    path: str | os.PathLike,
    data: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    max_new_tokens: int = 8,
    ttft_runs: int = 10,
    ttft_warmup: int = 2,
    progress: bool = True,
    batch_size: int = 1,
    ttft_threads: int | None = None,
    adapter: DistillAdapter | None = None,
) -> EvalResult:
    """Evaluate the checkpoint at ``path`` on ``data`` (see the module docstring for the protocol).

    Args:
        path: a local checkpoint directory (:func:`load_for_eval`).
        data: a JSON list or JSONL file of records ending with an assistant turn.
        images_dir: where image paths resolve (``None``: the data file's directory).
        limit: evaluate the first ``limit`` records only.
        max_new_tokens: greedy generation budget per answer.
        ttft_runs, ttft_warmup: timed and untimed prefill runs (``ttft_runs=0`` skips the measurement).
        progress: show a tqdm progress bar on stderr.
        batch_size: prompts per ``generate`` call, left-padded.
        ttft_threads: ``torch.set_num_threads`` for the timing (default: the current number).
        adapter: the already loaded :func:`load_for_eval` of ``path`` (skips loading).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if ttft_runs < 0 or ttft_warmup < 0:
        raise ValueError(f"ttft_runs and ttft_warmup must be >= 0, got {ttft_runs} and {ttft_warmup}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if ttft_threads is not None and ttft_threads < 1:
        raise ValueError(f"ttft_threads must be at least 1, got {ttft_threads}")
    samples = read_eval_samples(data, images_dir, limit)
    adapter = adapter if adapter is not None else load_for_eval(path)
    side = adapter.side
    stop_ids = stop_token_ids(adapter.model, side.tokenizer, end_of_turn_token(samples[0].record, side.tokenizer))

    def prompt_of(sample: EvalSample) -> Prompt:
        try:
            return render_prompt(sample.prompt_record, load_images(sample.record, images_dir), side)
        except SampleError as e:
            raise ValueError(f"record {sample.record.source} (id {sample.record.id!r}): [{e.kind}] {e}") from e

    predictions: list[Prediction] = []
    per_image: list[float] = []  # image tokens / images of each prompt with images
    bar = tqdm(total=len(samples), desc=f"eval {model_name(path)}", unit="sample", file=sys.stderr,
               disable=not progress)
    with bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            prompts = [prompt_of(s) for s in batch]  # rendered per batch: pixel tensors are not all kept in memory
            per_image += [p.vision_tokens / p.num_images for p in prompts if p.num_images]
            answers = generate_answers(adapter, prompts, stop_ids, max_new_tokens)
            for s, text in zip(batch, answers):
                ok = is_correct(text, s.answer, s.choices)
                predictions.append(Prediction(s.record.id, s.category, s.question, s.answer, text, ok))
            bar.update(len(batch))

    accuracy, counts, correct = _accuracies(predictions)
    timed = next((k for k, s in enumerate(samples) if s.record.image_paths), 0)
    threads = torch.get_num_threads() if ttft_threads is None else ttft_threads
    times = measure_ttft(adapter, prompt_of(samples[timed]), ttft_runs, ttft_warmup, threads) if ttft_runs else []
    return EvalResult(
        model=os.fspath(path),
        data=os.fspath(data),
        num_samples=len(predictions),
        accuracy=accuracy,
        counts=counts,
        correct=correct,
        average=sum(accuracy.values()) / len(accuracy),
        micro_accuracy=sum(correct.values()) / len(predictions),
        vision_tokens_per_image=sum(per_image) / len(per_image) if per_image else None,
        ttft_ms=statistics.median(times) if times else None,
        ttft_samples_ms=times,
        ttft_threads=threads,
        ttft_warmup=ttft_warmup,
        ttft_sample_id=samples[timed].record.id,
        ttft_method=TTFT_METHOD,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        predictions=predictions,
    )


# ---- report ---------------------------------------------------------------------------------------------------------
_RUN_OUTPUTS = re.compile(r"final|checkpoint-\d+")  # what ``emkd train`` writes inside a run's output_dir


def model_name(path: str | os.PathLike) -> str:
    """The name a model goes by in a table: its run's name for what ``emkd train`` wrote (``runs/RUN/final`` ->
    ``RUN``, ``runs/RUN/checkpoint-200`` -> ``RUN/checkpoint-200``), else the directory's name."""
    p = Path(path)
    if not _RUN_OUTPUTS.fullmatch(p.name):
        return p.name
    run = p.absolute().parent.name
    return run if p.name == "final" else f"{run}/{p.name}"


def format_table(results: list[EvalResult], names: list[str] | None = None) -> str:
    """A console table: one row per model, columns = categories (first-seen order) in %, ``avg`` (macro) and
    ``micro`` in %, median ``TTFT ms`` and ``vis tok/img``; ``-`` where a model has no value. ``names`` default to
    :func:`model_name` of each result's model path."""
    names = [model_name(r.model) for r in results] if names is None else list(names)
    if len(names) != len(results):
        raise ValueError(f"format_table: {len(results)} results but {len(names)} names")
    categories = list(dict.fromkeys(c for r in results for c in r.accuracy))
    header = ["model", *categories, "avg", "micro", "TTFT ms", "vis tok/img"]

    def number(value: float | None, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.1f}"

    rows = [
        [
            name,
            *(number(r.accuracy.get(c), 100) for c in categories),
            number(r.average, 100),
            number(r.micro_accuracy, 100),
            number(r.ttft_ms),
            number(r.vision_tokens_per_image),
        ]
        for name, r in zip(names, results)
    ]
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


# ---- command line ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of model ``a`` minus model ``b`` on the same records, in points, with a 95 % confidence interval."""

    mean: float
    low: float
    high: float
    num_samples: int

    def __str__(self) -> str:
        return f"{self.mean:+.1f} points (95 % CI {self.low:+.1f} to {self.high:+.1f}, n = {self.num_samples})"


def paired_difference(a: EvalResult, b: EvalResult) -> PairedDifference:
    """Micro-accuracy difference ``a - b`` over the records both scored, paired record by record.

    The interval is the normal approximation ``mean +- 1.96 * sd / sqrt(n)`` of the per-record differences
    (each -1, 0 or +1). It covers the sampling of *records* only: two runs that differ only in their seed can differ
    by more (``emkd reproduce`` pairs runs over seeds for that). Records are matched by position, and the two
    results must come from the same data in the same order.
    """
    if len(a.predictions) != len(b.predictions) or any(
        (p.id, p.question) != (q.id, q.question) for p, q in zip(a.predictions, b.predictions)
    ):
        raise ValueError(f"paired_difference: {a.model} and {b.model} were not scored on the same records")
    n = len(a.predictions)
    if n == 0:
        raise ValueError("paired_difference: no scored records")
    diff = torch.tensor([float(p.correct) - float(q.correct) for p, q in zip(a.predictions, b.predictions)],
                        dtype=torch.float64)  # (n,) in {-1, 0, 1}
    mean = diff.mean().item()
    half = 1.96 * diff.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("inf")
    return PairedDifference(100 * mean, 100 * (mean - half), 100 * (mean + half), n)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``emkd eval``; pair with ``parser.set_defaults(func=run_eval)``."""
    parser.add_argument("model", help="checkpoint directory (the student, or a LLaVA / NeXT / OneVision / Qwen2-VL "
                        "teacher)")
    parser.add_argument("data", help="benchmark records (LLaVA JSON/JSONL or HF messages), optional 'category' and "
                        "'choices' per record")
    parser.add_argument("--images", metavar="DIR", default=None, help="image root (default: the data file's folder)")
    parser.add_argument("--out", metavar="FILE", default=None, help="write the result (with every prediction) as JSON")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N records only")
    parser.add_argument("--max-new-tokens", type=int, default=8, metavar="N", help="greedy tokens per answer")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="prompts per generate call (left "
                        "padding when > 1; default 1)")
    parser.add_argument("--ttft-runs", type=int, default=10, metavar="N", help="timed prefill runs (median reported; "
                        "0 skips timing)")
    parser.add_argument("--ttft-warmup", type=int, default=2, metavar="N", help="untimed prefill runs before timing")
    parser.add_argument("--ttft-threads", type=int, default=None, metavar="N",
                        help="torch threads while timing (default: torch's current number)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("--name", default=None, help="the model's name in the table (default: the run's name for "
                        "RUN/final or RUN/checkpoint-N, else the directory's name)")


def run_eval(args: argparse.Namespace) -> int:
    """``emkd eval``: evaluate one model, print the table, write ``--out``; 0 on success, 2 on bad input."""
    try:
        result = evaluate(
            args.model,
            args.data,
            images_dir=args.images,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            ttft_runs=args.ttft_runs,
            ttft_warmup=args.ttft_warmup,
            progress=getattr(args, "progress", True),
            batch_size=getattr(args, "batch_size", 1),
            ttft_threads=getattr(args, "ttft_threads", None),
        )
    except (OSError, ValueError) as e:
        print(f"emkd eval: {e}", file=sys.stderr)
        return 2
    name = getattr(args, "name", None)
    print(format_table([result], None if name is None else [name]))
    for category, answer in result.constant_answers().items():
        print(f"emkd eval: warning: every {category} record was answered {answer!r}: the model answers this category "
              "with a constant (its prior), not from the input", file=sys.stderr)
    if args.out is not None:
        print(f"wrote {result.write_json(args.out)}")
    return 0


__all__ = [
    "DEFAULT_CATEGORY",
    "EvalResult",
    "EvalSample",
    "Prediction",
    "Prompt",
    "add_eval_arguments",
    "batch_inputs",
    "end_of_turn_token",
    "evaluate",
    "format_table",
    "generate_answers",
    "load_for_eval",
    "measure_ttft",
    "model_name",
    "read_eval_samples",
    "render_prompt",
    "run_eval",
    "stop_token_ids",
]

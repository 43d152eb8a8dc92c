"""Reading and validating conversation records (LLaVA and Hugging Face ``messages`` formats).

Two record formats are read, from a JSON list, JSONL (one record per line, streamed), parquet files and ``datasets``
folders (images may be embedded as bytes), or a mixture of such files (:mod:`emkd.data.sources`):

* LLaVA: ``{"id": ..., "image": "rel/path.png" | [paths], "conversations": [{"from": "human"|"gpt"|"system",
  "value": "...<image>..."}]}``; ``"images": [paths]`` is accepted in place of ``"image"``, and ``"user"`` /
  ``"assistant"`` in place of ``"human"`` / ``"gpt"``.
* Hugging Face: ``{"messages": [{"role": "user"|"assistant"|"system", "content": str | [{"type": "image"} |
  {"type": "text", "text": ...}]}], "images": [paths]}``. A literal ``<image>`` inside text is an image marker too
  (as in LLaMA-Factory's ``messages`` datasets).

Both become one :class:`Record`: ``messages`` is a tuple of :class:`Turn` ``(role, parts)``, each part a
:class:`Part` ``("text", text)`` or ``("image", "")``, and ``image_paths`` the paths as written in the file. The
``i``-th image marker of the conversation (in reading order) stands for ``image_paths[i]``. Image paths resolve
relative to ``images_dir`` (the data file's directory when ``images_dir`` is ``None``) and must stay inside it: an
absolute path, or one that climbs out with ``..``, is an ``image_outside`` problem unless the caller opts out
(``allow_outside_images=True``; the recipe's ``data.allow_outside_images: true``; ``--allow-outside-images`` on the
command line). The check is on the path as written (``os.path.normpath``): a symbolic link inside the folder that
points elsewhere is the user's own choice and is followed.

Files are UTF-8 (a leading byte-order mark is ignored). Bytes are decoded per record: a byte that is not UTF-8 makes
its own record bad (``encoding``, naming the byte, its line and column), never the whole file. A JSONL file is cut
into lines at ``\\n`` only (a JSON string may hold U+2028 and friends).

Nothing in a record is changed: unlike LLaVA's ``preprocess_multimodal``, an ``<image>`` marker is not moved to the
front of its turn and whitespace is not stripped. A record that breaks a rule is reported (:class:`BadRecord`, with
file, line or list index, id and reasons), never repaired. The rules (:func:`validate_record`):

* ``encoding``: the record's bytes are not UTF-8;
* ``malformed_json``: a JSONL line (or the whole JSON list file) does not parse;
* ``malformed_record``: not an object, no ``conversations`` / ``messages``, wrong field types, unknown role or part
  type, a ``video`` field (video samples are not supported);
* ``roles``: after an optional first ``system`` turn the turns must alternate ``user``, ``assistant``, ``user``, ...,
  starting with ``user`` and ending with ``assistant``; ``system`` anywhere else is a ``roles`` problem too;
* ``no_assistant``: no assistant turn at all;
* ``empty_response``: an assistant turn that is empty or only whitespace (nothing to supervise);
* ``image_in_response``: an ``<image>`` marker inside an assistant turn (image tokens are never supervised);
* ``image_count``: the number of ``<image>`` markers differs from the number of images;
* ``image_outside``: an image path that is absolute or climbs out of the images folder (see above);
* ``missing_image`` / ``unreadable_image``: an image file does not exist, or Pillow cannot open and verify it;
* ``template``: the ``plain`` template needs exactly one user turn followed by one assistant turn.

Rendering adds ``too_long``, ``image_token_in_text`` and ``template`` problems (:mod:`emkd.data.render`).
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from emkd.errors import UserError

IMAGE_MARKER = "<image>"
ROLES = ("system", "user", "assistant")
_LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# problem kinds, in the order a report lists them
PROBLEM_KINDS = (
    "encoding",
    "malformed_json",
    "malformed_record",
    "roles",
    "no_assistant",
    "empty_response",
    "image_in_response",
    "image_count",
    "image_outside",
    "missing_image",
    "unreadable_image",
    "template",
    "image_token_in_text",
    "too_long",
)


@dataclass(frozen=True)
class Source:
    """Where a record comes from: ``file`` and either a 1-based ``line`` (JSONL), a 0-based ``index`` (JSON list) or
    a 0-based ``row`` (parquet)."""

    file: str
    line: int | None = None
    index: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.row is not None:
            return f"{self.file}:row {self.row}"
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.index is not None:
            return f"{self.file}[{self.index}]"
        return self.file


class Part(NamedTuple):
    """One piece of a turn's content: ``Part("text", "...")`` or ``Part("image")``."""

    type: str
    text: str = ""


class Turn(NamedTuple):
    """One message: ``role`` in :data:`ROLES` and its content as a tuple of :class:`Part`."""

    role: str
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The content as one string, an ``<image>`` marker standing for each image part."""
        return "".join(IMAGE_MARKER if p.type == "image" else p.text for p in self.parts)

    @property
    def num_images(self) -> int:
        return sum(p.type == "image" for p in self.parts)


@dataclass(frozen=True)
class Record:
    """One conversation, normalised from either format; ``image_paths`` are as written in the file.

    ``embedded``: the images are bytes inside the data file (parquet), ``image_paths`` only name them.
    ``images_dir``: this record's own images folder (a mixture source's ``image_folder``), used in place of the
    caller's when not ``None``.
    """

    id: str | None
    source: Source
    messages: tuple[Turn, ...]
    image_paths: tuple[str, ...]
    embedded: bool = False
    images_dir: str | None = None

    @property
    def num_image_markers(self) -> int:
        return sum(t.num_images for t in self.messages)


@dataclass(frozen=True)
class Problem:
    """One reason a record is bad: ``kind`` (one of :data:`PROBLEM_KINDS`) and a sentence for a human."""

    kind: str
    reason: str


@dataclass(frozen=True)
class BadRecord:
    """A record that breaks at least one rule, with every problem found."""

    source: Source
    record_id: str | None
    problems: tuple[Problem, ...]

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]

    def __str__(self) -> str:
        rid = "?" if self.record_id is None else repr(self.record_id)
        return f"{self.source} (id {rid}): " + "; ".join(f"[{p.kind}] {p.reason}" for p in self.problems)


class RecordError(UserError):
    """A record that breaks a rule, as an exception: :attr:`problem` is the :class:`Problem` (``kind``, ``reason``).

    Raised while normalising (``malformed_json`` / ``malformed_record``, where the reader adds the place) and by
    :func:`load_images` (``image_outside``, ``missing_image``, ``unreadable_image``), whose message then starts with
    the record's file, line or index, and id.
    """

    def __init__(self, kind: str, reason: str, source: Source | None = None, record_id: str | None = None):
        where = "" if source is None else f"{source} (id {'?' if record_id is None else repr(record_id)}): [{kind}] "
        super().__init__(where + reason)
        self.problem = Problem(kind, reason)


# ---- parsing --------------------------------------------------------------------------------------------------------
def split_markers(text: str) -> tuple[Part, ...]:
    """``"a<image>b"`` -> ``(Part("text", "a"), Part("image"), Part("text", "b"))``; empty text parts are omitted."""
    parts: list[Part] = []
    for k, chunk in enumerate(text.split(IMAGE_MARKER)):
        if k:
            parts.append(Part("image"))
        if chunk:
            parts.append(Part("text", chunk))
    return tuple(parts)


def _image_list(obj: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    present = [k for k in keys if k in obj and obj[k] is not None]
    if len(present) > 1:
        raise RecordError("malformed_record", f"both {present[0]!r} and {present[1]!r} are given; use one")
    if not present:
        return ()
    key = present[0]
    value = obj[key]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise RecordError("malformed_record", f"{key!r} must be a path string or a list of path strings")
    return tuple(paths)


def _parse_llava(obj: dict) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    convs = obj["conversations"]
    if not isinstance(convs, list):
        raise RecordError("malformed_record", "'conversations' must be a list")
    turns = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise RecordError(
                "malformed_record", f"conversations[{k}] must be an object with 'from' and a string 'value'"
            )
        role = _LLAVA_ROLES.get(turn["from"])
        if role is None:
            raise RecordError(
                "malformed_record",
                f"conversations[{k}] has unknown 'from' {turn['from']!r} (expected human, gpt or system)",
            )
        turns.append(Turn(role, split_markers(turn["value"])))
    return tuple(turns), _image_list(obj, ("image", "images"))


def _parse_messages(obj: dict) -> tuple[tuple[Turn, ...], tuple[str, ...]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        raise RecordError("malformed_record", "'messages' must be a list")
    turns = []
    for k, msg in enumerate(msgs):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise RecordError("malformed_record", f"messages[{k}] must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise RecordError("malformed_record", f"messages[{k}] has unknown role {msg['role']!r} (expected {ROLES})")
        content = msg["content"]
        if isinstance(content, str):
            parts = split_markers(content)
        elif isinstance(content, list):
            built: list[Part] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    built.append(Part("image"))
                elif kind == "text" and isinstance(part.get("text"), str):
                    built.extend(split_markers(part["text"]))
                else:
                    raise RecordError(
                        "malformed_record",
                        f"messages[{k}].content[{j}] must be {{'type': 'image'}} or {{'type': 'text', 'text': str}}",
                    )
            parts = tuple(built)
        else:
            raise RecordError("malformed_record", f"messages[{k}].content must be a string or a list of parts")
        turns.append(Turn(msg["role"], parts))
    return tuple(turns), _image_list(obj, ("images",))


def parse_record(obj: Any, source: Source) -> Record:
    """Normalise one decoded JSON value to a :class:`Record`; raises :class:`RecordError` when it is malformed."""
    if not isinstance(obj, dict):
        raise RecordError("malformed_record", f"a record must be a JSON object, got {type(obj).__name__}")
    if "video" in obj or "videos" in obj:
        raise RecordError("malformed_record", "video samples are not supported")
    has_llava, has_hf = "conversations" in obj, "messages" in obj
    if has_llava == has_hf:
        raise RecordError("malformed_record", "a record needs exactly one of 'conversations' (LLaVA) or 'messages'")
    messages, images = _parse_llava(obj) if has_llava else _parse_messages(obj)
    rid = obj.get("id")
    return Record(id=None if rid is None else str(rid), source=source, messages=messages, image_paths=images)


class RawRecord(NamedTuple):
    """One decoded JSON value of a data file and where it is (before :func:`parse_record`); ``images_dir`` and
    ``embedded`` as in :class:`Record`."""

    source: Source
    obj: Any
    images_dir: str | None = None
    embedded: bool = False


_WHITESPACE = " \t\n\r"  # JSON's insignificant whitespace
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what ``surrogateescape`` decodes a non-UTF-8 byte to


def _first_bad_byte(text: str, start: int = 0, end: int | None = None) -> int | None:
    """Position in ``text[start:end]`` of the first byte that was not UTF-8, or ``None``."""
    found = _ESCAPED_BYTE.search(text, start, len(text) if end is None else end)
    return None if found is None else found.start()


def _line_col(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of character ``pos``."""
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _bad_byte_at(text: str, pos: int, first_line: int = 1) -> str:
    line, col = _line_col(text, pos)
    return f"byte 0x{ord(text[pos]) - 0xDC00:02x} at line {line + first_line - 1}, column {col} is not UTF-8"


def _encoding_problem(text: str, pos: int, first_line: int = 1) -> Problem:
    """The ``encoding`` problem of the bad byte at ``pos`` of ``text``, whose first line is line ``first_line`` of
    its file."""
    return Problem(
        "encoding",
        f"{_bad_byte_at(text, pos, first_line)}; the file must be UTF-8 encoded (fix this record, or re-encode the "
        "file, e.g. `iconv -f latin1 -t utf-8`)",
    )


def _record_id(obj: Any) -> str | None:
    """The ``id`` of a decoded record as a string, its non-UTF-8 bytes (if any) written as ``\\xNN``."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    if rid is None:
        return None
    return _ESCAPED_BYTE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", str(rid))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _json_list(path: str, text: str, start: int) -> Iterator[RawRecord | BadRecord]:
    """The elements of the JSON list that opens at ``text[start]``, each with its index.

    Parsed one element at a time so that each element's characters are known: an element with a non-UTF-8 byte is
    a bad record of its own. A syntax error anywhere makes the whole file one ``malformed_json`` record at the line
    the parser stopped (past a syntax error no element boundary can be trusted); nothing is yielded before it.
    """
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int, Any]] = []
    pos = _skip_ws(text, start + 1)
    try:
        if pos < len(text) and text[pos] == "]":
            pos += 1
        else:
            while True:
                begin = pos
                obj, pos = decoder.raw_decode(text, pos)
                spans.append((begin, pos, obj))
                pos = _skip_ws(text, pos)
                if pos < len(text) and text[pos] == ",":
                    pos = _skip_ws(text, pos + 1)
                    continue
                if pos < len(text) and text[pos] == "]":
                    pos += 1
                    break
                raise json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos)
        pos = _skip_ws(text, pos)
        if pos < len(text):
            raise json.JSONDecodeError("Extra data after the list", text, pos)
    except json.JSONDecodeError as e:
        reason = f"invalid JSON: {e}"
        bad = _first_bad_byte(text)
        if bad is not None:
            reason += f" (and {_bad_byte_at(text, bad)})"
        yield BadRecord(Source(path, line=e.lineno), None, (Problem("malformed_json", reason),))
        return
    for index, (begin, end, obj) in enumerate(spans):
        source = Source(path, index=index)
        bad = _first_bad_byte(text, begin, end)
        if bad is not None:
            yield BadRecord(source, _record_id(obj), (_encoding_problem(text, bad),))
        else:
            yield RawRecord(source, obj)


def read_objects(path: str | os.PathLike) -> Iterator[RawRecord | BadRecord]:
    """Every record of a data file, decoded but not normalised, in file order: a :class:`RawRecord` or, when its
    bytes are not UTF-8 (``encoding``) or it does not parse (``malformed_json``), a :class:`BadRecord`.

    A ``.parquet`` file is read one row group at a time and a ``.yaml`` / ``.yml`` file is a mixture of sources
    (:mod:`emkd.data.sources`). Otherwise a file whose name ends in ``.jsonl`` or whose first non-blank character is
    not ``[`` is read as JSONL, streamed: one record per ``\\n``-separated line, blank lines skipped, each line decoded
    on its own, never the whole file in memory. A JSON list is read whole, element by element (see
    :func:`_json_list`).
    """
    from emkd.data import sources

    path = os.fspath(path)
    if sources.is_parquet(path):
        yield from sources.read_parquet(path)
        return
    if sources.is_mixture(path):
        yield from sources.read_mixture_objects(path)
        return
    if sources.is_arrow_dir(path):
        yield from sources.read_arrow_dir(path)
        return
    with open(path, "rb") as fh:
        head = fh.read(4096)
        if head.startswith(codecs.BOM_UTF8):
            head = head[len(codecs.BOM_UTF8):]
        while head and not head.lstrip(b" \t\n\r"):
            more = fh.read(4096)
            if not more:
                break
            head += more
        if not path.endswith(".jsonl") and head.lstrip(b" \t\n\r").startswith(b"["):
            fh.seek(0)
            data = fh.read()
            if data.startswith(codecs.BOM_UTF8):
                data = data[len(codecs.BOM_UTF8):]
            text = data.decode("utf-8", errors="surrogateescape")  # each bad byte becomes one U+DC80..U+DCFF char
            del data
            yield from _json_list(path, text, _skip_ws(text, 0))
            return
        fh.seek(0)
        for lineno, raw in enumerate(fh, start=1):  # a binary file splits at b"\n" only
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            line = raw.decode("utf-8", errors="surrogateescape")
            if line.endswith("\n"):
                line = line[:-1]
            if not line.strip():
                continue
            source = Source(path, line=lineno)
            bad = _first_bad_byte(line)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = _encoding_problem(line, bad, lineno) if bad is not None else Problem(
                    "malformed_json", f"invalid JSON: {e}")
                yield BadRecord(source, None, (problem,))
                continue
            if bad is not None:
                yield BadRecord(source, _record_id(obj), (_encoding_problem(line, bad, lineno),))
                continue
            yield RawRecord(source, obj)


def read_records(path: str | os.PathLike) -> Iterator[Record | BadRecord]:
    """Yield every record of a JSON list or JSONL file, in file order, as a :class:`Record` or, when it cannot be
    read, a :class:`BadRecord` (``encoding``, ``malformed_json`` or ``malformed_record``).

    Decoding is per record (:func:`read_objects`): a non-UTF-8 byte or a JSONL line that does not parse costs that
    record only. A JSON list with a syntax error yields one ``malformed_json`` :class:`BadRecord` for the whole
    file, at the line the parser stopped.
    """
    for item in read_objects(path):
        yield item if isinstance(item, BadRecord) else _parsed(item.obj, item.source, item.images_dir, item.embedded)


def _parsed(obj: Any, source: Source, images_dir: str | None = None, embedded: bool = False) -> Record | BadRecord:
    try:
        record = parse_record(obj, source)
    except RecordError as e:
        return BadRecord(source, _record_id(obj), (e.problem,))
    if images_dir is not None or embedded:
        record = dataclasses.replace(record, images_dir=images_dir, embedded=embedded and bool(record.image_paths))
    return record


# ---- images ---------------------------------------------------------------------------------------------------------
def image_root(images_dir: str | os.PathLike | None, data_file: str | None = None) -> str:
    """The folder image paths resolve against: ``images_dir``, or the data file's directory when it is ``None``."""
    return os.fspath(images_dir) if images_dir is not None else (os.path.dirname(data_file) if data_file else "")


def resolve_image(path: str, images_dir: str | os.PathLike | None, data_file: str | None = None) -> str:
    """Where an image path of a record points: under ``images_dir``, or the data file's directory when it is
    ``None``; an absolute path is returned unchanged. Confinement is :func:`outside_problem`'s job."""
    return os.path.join(image_root(images_dir, data_file), path)


def outside_problem(path: str, images_dir: str | os.PathLike | None, data_file: str | None = None) -> Problem | None:
    """``image_outside`` when ``path`` is absolute or climbs out of the image folder with ``..``, else ``None``."""
    normal = os.path.normpath(path)
    if not (os.path.isabs(path) or normal == os.pardir or normal.startswith(os.pardir + os.sep)):
        return None
    root = image_root(images_dir, data_file) or os.curdir
    return Problem(
        "image_outside",
        f"image {path!r} is outside the images folder {root} (an absolute path, or one that climbs out with '..'); "
        "move the image under the folder, or opt out with data.allow_outside_images: true in the recipe "
        "(--allow-outside-images on the command line)",
    )


def image_problem(path: str, resolved: str) -> Problem | None:
    """``missing_image`` / ``unreadable_image`` for one image file, or ``None`` when Pillow opens and verifies it."""
    from PIL import Image

    if not os.path.isfile(resolved):
        return Problem("missing_image", f"image {path!r} not found (looked for {resolved})")
    try:
        with Image.open(resolved) as im:
            im.verify()
    except Exception as e:  # Pillow raises many types for broken files
        return Problem("unreadable_image", f"image {path!r} cannot be read ({type(e).__name__}: {e})")
    return None


def load_images(
    record: Record, images_dir: str | os.PathLike | None, allow_outside_images: bool = False
) -> list:
    """The record's images as RGB PIL images, in marker order (converted to RGB as LLaVA does).

    Raises:
        RecordError: ``image_outside`` (unless ``allow_outside_images``), ``missing_image`` or
            ``unreadable_image``; the message names the record's file, line or index, and id.
    """
    from PIL import Image

    if record.embedded:
        return _embedded_images(record)
    if record.images_dir is not None:
        images_dir = record.images_dir
    out = []
    for p in record.image_paths:
        problem = None if allow_outside_images else outside_problem(p, images_dir, record.source.file)
        resolved = resolve_image(p, images_dir, record.source.file)
        if problem is None and not os.path.isfile(resolved):
            problem = Problem("missing_image", f"image {p!r} not found (looked for {resolved})")
        if problem is None:
            try:
                with Image.open(resolved) as im:
                    out.append(im.convert("RGB"))
            except Exception as e:  # Pillow raises many types for broken or truncated files
                problem = Problem("unreadable_image", f"image {p!r} cannot be decoded ({type(e).__name__}: {e})")
        if problem is not None:
            raise RecordError(problem.kind, problem.reason, record.source, record.id)
    return out


def _embedded_images(record: Record, convert: bool = True) -> list:
    """The embedded images of a parquet record (decoded, RGB); raises :class:`RecordError` (``unreadable_image``)."""
    from emkd.data.sources import decode_embedded, embedded_image_bytes

    try:
        blobs = embedded_image_bytes(record.source.file, record.source.row)
    except Exception as e:  # the file changed or is damaged since it was read
        raise RecordError("unreadable_image", f"the images of this row cannot be read back ({type(e).__name__}: {e})",
                          record.source, record.id) from e
    out = []
    for name, data in zip(record.image_paths, blobs):
        try:
            out.append(decode_embedded(name, data, convert))
        except Exception as e:  # Pillow raises many types for broken bytes
            why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "its bytes", str(e))
            raise RecordError("unreadable_image", f"embedded image {name!r} cannot be decoded ({type(e).__name__}: "
                              f"{why})", record.source, record.id) from e
    return out


# ---- validation -----------------------------------------------------------------------------------------------------
def role_problems(messages: tuple[Turn, ...]) -> list[Problem]:
    """``roles`` and ``no_assistant`` problems of a conversation (see the module docstring)."""
    roles = [t.role for t in messages]
    body_start = 1 if roles and roles[0] == "system" else 0
    body = roles[body_start:]
    if "assistant" not in body:
        return [Problem("no_assistant", f"no assistant turn (roles: {roles})")]
    for k, role in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            where = body_start + k
            extra = " (only the first turn may be system)" if role == "system" else ""
            return [
                Problem(
                    "roles",
                    f"turn {where} is {role!r}, expected {expected!r}{extra}: roles must alternate user/assistant "
                    f"after an optional system turn (roles: {roles})",
                )
            ]
    if body[-1] != "assistant":
        return [Problem("roles", f"the last turn ({len(roles) - 1}) is a user turn with no answer (roles: {roles})")]
    return []


def validate_record(
    record: Record,
    images_dir: str | os.PathLike | None,
    template: str = "chat",
    check_images: bool = True,
    allow_outside_images: bool = False,
) -> list[Problem]:
    """Every structural problem of ``record`` (empty when it is good). Rendering checks come later.

    Args:
        record: the record to check.
        images_dir: where image paths resolve (``None``: the data file's directory).
        template: ``"chat"`` or ``"plain"`` (the latter needs exactly ``[user, assistant]``).
        check_images: open and verify every image with Pillow (``False``: existence only).
        allow_outside_images: accept absolute image paths and paths that climb out of the image folder.
    """
    problems = role_problems(record.messages)
    if not problems and template == "plain" and [t.role for t in record.messages] != ["user", "assistant"]:
        problems.append(
            Problem(
                "template",
                "the plain template needs exactly one user turn followed by one assistant turn, found roles "
                f"{[t.role for t in record.messages]}",
            )
        )
    for k, turn in enumerate(record.messages):
        if turn.role == "assistant" and not turn.text.strip():
            problems.append(Problem("empty_response", f"turn {k} (assistant) is empty: nothing to supervise"))
    for k, turn in enumerate(record.messages):
        if turn.role == "assistant" and turn.num_images:
            problems.append(Problem("image_in_response", f"turn {k} (assistant) contains an <image> marker"))
    n_markers, n_images = record.num_image_markers, len(record.image_paths)
    if n_markers != n_images:
        problems.append(Problem("image_count", f"{n_markers} <image> markers but {n_images} images"))
    if record.embedded:
        if check_images:
            try:
                _embedded_images(record, convert=False)
            except RecordError as e:
                problems.append(e.problem)
        return problems
    if record.images_dir is not None:
        images_dir = record.images_dir
    for p in record.image_paths:
        outside = None if allow_outside_images else outside_problem(p, images_dir, record.source.file)
        if outside is not None:
            problems.append(outside)
            continue
        resolved = resolve_image(p, images_dir, record.source.file)
        if check_images:
            problem = image_problem(p, resolved)
        else:
            problem = None if os.path.isfile(resolved) else Problem(
                "missing_image", f"image {p!r} not found (looked for {resolved})"
            )
        if problem is not None:
            problems.append(problem)
    return problems

"""What a model shows the loss (SPEC §1), and the bookkeeping every loss shares.

A distillation loss never sees a model. It sees, for each side, the final hidden states as the LM head consumes
them, the head itself, and masks that say which positions are image tokens, which are text and which are
supervised. From these it derives, per sample:

* vision tokens ``hidden[b][vision_mask[b]]``                     -> ``[N_b, D]``
* text tokens ``hidden[b][attention_mask[b] & ~vision_mask[b]]``  -> ``[K_b, D]`` (same ``K_b`` on both sides)
* response positions ``i`` with ``labels[b, i + 1] != -100``      -> same count on both sides

Teacher and student see the same conversation through different vision pipelines, so only the number of image
tokens may differ between them; every other count mismatch is a ``ValueError`` that names the sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from emkd.chunking import check_implementation

IGNORE_INDEX = -100


@dataclass
class DistillInputs:
    """One side (student or teacher) of a distillation batch of ``B`` right-padded samples.

    Args:
        hidden: ``[B, L, D]`` final hidden states after the final norm, as the LM head consumes them.
        head_weight: ``[V, D]`` LM head weight.
        vision_mask: ``[B, L]`` bool, positions that hold image tokens (projector outputs).
        attention_mask: ``[B, L]`` 1 for real tokens, 0 for padding.
        labels: ``[B, L]`` long; logits at position ``i`` predict ``labels[:, i + 1]``; ``-100`` is ignored.
        head_bias: ``[V]`` optional LM head bias.
        instruction_mask: ``[B, L]`` bool, optional; text tokens of the user turns (Align-TI's IVA only).
    """

    hidden: torch.Tensor
    head_weight: torch.Tensor
    vision_mask: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    head_bias: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = field(default=None)

    def __post_init__(self) -> None:
        if self.hidden.dim() != 3:
            raise ValueError(f"DistillInputs.hidden must be [B, L, D], got shape {tuple(self.hidden.shape)}")
        B, L, D = self.hidden.shape
        if self.head_weight.dim() != 2 or self.head_weight.shape[1] != D:
            raise ValueError(
                f"DistillInputs.head_weight must be [V, D={D}], got shape {tuple(self.head_weight.shape)}"
            )
        if self.head_bias is not None and tuple(self.head_bias.shape) != (self.head_weight.shape[0],):
            raise ValueError(
                f"DistillInputs.head_bias must be [V={self.head_weight.shape[0]}], got {tuple(self.head_bias.shape)}"
            )
        for name in ("vision_mask", "attention_mask", "labels", "instruction_mask"):
            value = getattr(self, name)
            if value is None:
                continue
            if tuple(value.shape) != (B, L):
                raise ValueError(f"DistillInputs.{name} must be [B={B}, L={L}], got shape {tuple(value.shape)}")
        self.vision_mask = self.vision_mask.bool()
        self.attention_mask = self.attention_mask.bool()
        if self.instruction_mask is not None:
            self.instruction_mask = self.instruction_mask.bool()
        if self.labels.dtype != torch.long:
            raise ValueError(f"DistillInputs.labels must be torch.long, got {self.labels.dtype}")
        self._token_splits: dict[str, tuple[torch.Tensor, list[int], list[torch.Tensor]]] = {}

    # ---- shapes ---------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.head_weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[2]

    # ---- derived sets ---------------------------------------------------------------------------------------
    @property
    def text_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: real tokens that are not image tokens."""
        return self.attention_mask & ~self.vision_mask

    @property
    def response_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: positions ``i`` whose logits predict a supervised label ``labels[:, i + 1]``."""
        mask = torch.zeros_like(self.vision_mask)
        mask[:, :-1] = self.labels[:, 1:] != IGNORE_INDEX
        return mask

    @property
    def response_targets(self) -> torch.Tensor:
        """``[R]`` the labels predicted at the response positions, sample-major (row-major) order."""
        return self.labels[:, 1:][self.labels[:, 1:] != IGNORE_INDEX]

    def vision_tokens(self, b: int) -> torch.Tensor:
        """``[N_b, D]`` hidden states of sample ``b``'s image tokens, in sequence order."""
        return self._split("vision")[2][b]

    def text_tokens(self, b: int) -> torch.Tensor:
        """``[K_b, D]`` hidden states of sample ``b``'s text tokens, in sequence order."""
        return self._split("text")[2][b]

    def token_rows(self, kind: str) -> tuple[torch.Tensor, list[int]]:
        """Every sample's ``vision`` or ``text`` rows in one ``[sum_b N_b, D]`` tensor, sample-major, and where each
        sample's rows start in it (``B`` offsets): what :meth:`vision_tokens` / :meth:`text_tokens` are views of."""
        rows, offsets, _ = self._split(kind)
        return rows, offsets

    def _split(self, kind: str) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
        """Every sample's rows of one kind, gathered by one indexing of the batch (one node in the backward pass,
        not one full-size scatter per sample) and cached: the rows, each sample's offset, each sample's view."""
        if kind not in self._token_splits:
            mask = self.vision_mask if kind == "vision" else self.text_mask  # (B, L)
            rows = masked_rows(self.hidden, mask)  # (sum_b N_b, D), sample-major
            counts = mask.sum(1).tolist()
            offsets = [sum(counts[:b]) for b in range(len(counts))]
            self._token_splits[kind] = (rows, offsets, list(rows.split(counts)))
        return self._token_splits[kind]

    def response_hidden(self) -> torch.Tensor:
        """``[R, D]`` hidden states at every response position of the batch, sample-major order."""
        return masked_rows(self.hidden, self.response_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head in float32: ``[..., D] -> [..., V]``."""
        weight = self.head_weight.float()
        out = hidden.float() @ weight.T
        if self.head_bias is not None:
            out = out + self.head_bias.float()
        return out

    def cropped(self, vocab_size: int) -> "DistillInputs":
        """The same inputs with the LM head cut to its first ``vocab_size`` rows (``vocab="crop"``)."""
        if vocab_size == self.vocab_size:
            return self
        return DistillInputs(
            hidden=self.hidden,
            head_weight=self.head_weight[:vocab_size],
            vision_mask=self.vision_mask,
            attention_mask=self.attention_mask,
            labels=self.labels,
            head_bias=None if self.head_bias is None else self.head_bias[:vocab_size],
            instruction_mask=self.instruction_mask,
        )

    def detached(self) -> "DistillInputs":
        """The same inputs with every tensor cut from the autograd graph (the teacher side of every loss)."""
        return DistillInputs(
            hidden=self.hidden.detach(),
            head_weight=self.head_weight.detach(),
            vision_mask=self.vision_mask,
            attention_mask=self.attention_mask,
            labels=self.labels,
            head_bias=None if self.head_bias is None else self.head_bias.detach(),
            instruction_mask=self.instruction_mask,
        )


VOCAB_POLICIES = ("strict", "crop")


def masked_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask]`` for ``x`` ``[B, L, D]`` and ``mask`` ``[B, L]`` -> ``[n, D]``, by ``index_select``: its backward
    is one ``index_add`` (about half the time of the boolean index's accumulating ``index_put`` on the CPU)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, mask.reshape(-1).nonzero().squeeze(1))


def joined_rows(blocks: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(blocks)`` of ``[M_i, ...]`` blocks; when the blocks lie back to back, in order, in one contiguous
    tensor (the pieces ``split`` or ``unbind`` return, as :meth:`DistillInputs.token_rows` and
    :func:`emkd.matching.pair_batch` hand them out), a view of that tensor instead: no copy, and in the backward pass
    no split and re-concatenation of the gradient."""
    if len(blocks) == 1:
        return blocks[0]
    base, tail = blocks[0]._base, blocks[0].shape[1:]
    if base is None or not base.is_contiguous() or any(
        b._base is not base or not b.is_contiguous() or b.shape[1:] != tail for b in blocks
    ):
        return torch.cat(blocks)
    at = blocks[0].storage_offset()
    for block in blocks:
        if block.storage_offset() != at:
            return torch.cat(blocks)
        at += block.numel()
    first = blocks[0].storage_offset() - base.storage_offset()
    if first == 0 and at - blocks[0].storage_offset() == base.numel() and base.shape[1:] == tail:
        return base
    return base.view(-1).narrow(0, first, at - blocks[0].storage_offset()).view(-1, *tail)


def padded_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``n`` blocks ``[M_i, D]`` zero-padded to ``[n, max M_i, D]`` (what ``pad_sequence(batch_first=True)`` gives),
    by one concatenation and one ``index_select``: two nodes in the backward pass, not one slice copy per block.
    Blocks of one size are stacked as they are (a view when :func:`joined_rows` finds them back to back)."""
    sizes = [int(r.shape[0]) for r in rows]
    width = max(sizes)
    if min(sizes) == width:
        return joined_rows(rows).view(len(rows), width, rows[0].shape[1])
    flat = torch.cat([joined_rows(rows), rows[0].new_zeros(1, rows[0].shape[1])])  # (sum M_i + 1, D), last: padding
    device = flat.device
    sizes_t = torch.tensor(sizes, device=device)
    starts = torch.cumsum(sizes_t, 0) - sizes_t  # (n,)
    column = torch.arange(width, device=device)  # (width,)
    index = torch.where(column[None, :] < sizes_t[:, None], starts[:, None] + column[None, :], flat.shape[0] - 1)
    return flat.index_select(0, index.reshape(-1)).view(len(rows), width, flat.shape[1])


def check_choice(name: str, value: object, choices: tuple) -> None:
    """Raise ``ValueError("<name> must be one of <choices>, got <value>")`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_common_options(
    *,
    vocab: str | None = None,
    implementation: str | None = None,
    temperature: float | None = None,
    chunk_size: int | None = None,
) -> None:
    """Check the options the losses share, each one that is given (``None``: the loss has no such option).

    ``vocab`` one of :data:`VOCAB_POLICIES`; ``implementation`` one of :data:`emkd.chunking.IMPLEMENTATIONS`;
    ``temperature > 0``; ``chunk_size >= 1`` (vocabulary rows per chunk). Raises ``ValueError`` naming the option,
    what it must be and the value found.
    """
    if implementation is not None:
        check_implementation(implementation)
    if vocab is not None:
        check_choice("vocab", vocab, VOCAB_POLICIES)
    if temperature is not None and temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_pair(student: DistillInputs, teacher: DistillInputs, vocab: str = "strict") -> tuple[DistillInputs, DistillInputs]:
    """Validate a student/teacher pair and return them ready for a loss (teacher detached, vocabularies equal).

    Raises ``ValueError`` for: different batch sizes; different vocabulary sizes under ``vocab="strict"``; labels
    that do not fit the cropped vocabulary; a sample whose text-token or response-position counts differ between the
    two sides, or whose response targets differ; non-finite hidden states at real tokens.
    """
    check_choice("vocab", vocab, VOCAB_POLICIES)
    if student.batch_size != teacher.batch_size:
        raise ValueError(f"batch sizes differ: student B={student.batch_size}, teacher B={teacher.batch_size}")
    teacher = teacher.detached()
    if student.vocab_size != teacher.vocab_size:
        if vocab == "strict":
            raise ValueError(
                f"vocabulary sizes differ: student head V={student.vocab_size}, teacher head V={teacher.vocab_size}; "
                "pass vocab='crop' to cut both heads to the smaller size"
            )
        v = min(student.vocab_size, teacher.vocab_size)
        top = int(max(student.labels.max(), teacher.labels.max()))
        if top >= v:
            raise ValueError(
                f"vocab='crop' cuts both heads to V={v}, but a label id {top} does not fit; the tokenizer vocabulary "
                "must fit in the smaller head"
            )
        student, teacher = student.cropped(v), teacher.cropped(v)

    counts = {
        "text tokens": (student.text_mask.sum(1), teacher.text_mask.sum(1)),
        "response positions": (student.response_mask.sum(1), teacher.response_mask.sum(1)),
    }
    differ = torch.stack([s != t for s, t in counts.values()]).any(0)  # (B,): one check for the batch
    if bool(differ.any()):
        b = int(differ.nonzero()[0])
        for what, (s, t) in counts.items():
            if s[b] != t[b]:
                hint = ("; teacher and student must see the same conversation (only image tokens may differ)"
                        if what == "text tokens" else "")
                raise ValueError(f"sample {b}: student has {int(s[b])} {what}, teacher has {int(t[b])}{hint}")
    if not torch.equal(student.response_targets, teacher.response_targets):
        s_t = student.labels[:, 1:]
        t_t = teacher.labels[:, 1:]
        for b in range(student.batch_size):
            if not torch.equal(s_t[b][s_t[b] != IGNORE_INDEX], t_t[b][t_t[b] != IGNORE_INDEX]):
                raise ValueError(f"sample {b}: student and teacher response labels differ")
    for name, side in (("student", student), ("teacher", teacher)):
        # padding may hold anything: only real tokens are checked, and only when the tensor's sum is not finite (a
        # finite sum means every entry is finite; an overflowing one falls through to the exact check)
        if bool(torch.isfinite(side.hidden.detach().sum(dtype=torch.float32))):
            continue
        bad = (~torch.isfinite(side.hidden)).any(-1) & side.attention_mask
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"{name} hidden states are not finite: sample {b}, position {i} (hidden shape "
                f"{tuple(side.hidden.shape)})"
            )
    return student, teacher


def zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """A scalar zero that stays connected to ``t``'s graph (so backward and DDP see every parameter)."""
    return t.reshape(-1)[:0].float().sum()  # an empty sum: exactly 0, never NaN, still has a grad_fn

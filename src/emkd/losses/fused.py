"""Losses computed from hidden states and LM-head weights over vocabulary chunks (issue: paper-scale memory).

At the paper's scale (SPEC §7) one sample's teacher vision logits are ``729 x 151,936`` floats (443 MB). Every loss
in this project only needs, per row, a few reductions over the vocabulary (a log-sum-exp, an expectation under one
side's softmax, a target logit) or, for matching, a sum of ``|z_s - z_t|`` over it. These functions compute them
chunk by chunk over the vocabulary, from the hidden rows and the head, so that at most ``rows x chunk_size`` logits
exist at once:

* :func:`fused_head_divergences`: per-row cross-entropy, forward KL, reverse KL and generalised JSD between a
  student head applied to ``hs`` and a teacher head applied to ``ht``, with an online log-sum-exp (running maximum
  and rescaled sums, one pass over the vocabulary; JSD needs a second pass because ``log m`` is not linear in the
  logits). The backward pass recomputes each chunk's logits and writes the gradients of the student rows, weight and
  bias chunk by chunk (a custom :class:`torch.autograd.Function`); the teacher gets no gradient. When the whole
  vocabulary is one chunk (``V <= chunk_size``, e.g. the demo's 452 words), the forward pass keeps that chunk's
  logits for the backward pass instead of recomputing them: the same ``N x V <= N x chunk_size`` floats per head,
  held from the forward pass to the backward pass, and the same values bit for bit. In that case a caller that
  already holds the logits of some rows (EM-KD's matching computed those of the matched vision rows) can pass them
  as ``given``, and only the other rows' logits are computed.
* :func:`fused_head_gram`: ``Z Z^T`` of the logits ``Z = h W^T + b`` (LLaVA-KD's RDist), with the same recomputing
  backward (and the same one-chunk reuse).
* :func:`emkd.matching.cost.head_l1_cost` (beside the other matching costs): the Manhattan distance between every
  student and every teacher row of logits (EM-KD's matching cost, Eq. 2), accumulated chunk by chunk.

Math, per row, with ``x = z / T``, ``lse(x) = log sum_v exp x_v`` and ``p = softmax(x)``::

    CE      = lse(z_s) - z_s[y]                                   (T = 1, as for the supervised loss)
    KL(p_t || p_s) = E_{p_t}[x_t - x_s] - lse(x_t) + lse(x_s)     d/dz_s = (p_s - p_t) / T
    KL(p_s || p_t) = E_{p_s}[x_s - x_t] - lse(x_s) + lse(x_t)     d/dz_s = p_s (log p_s - log p_t - KL) / T
    JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m)         d/dz_s = p_s (g - E_{p_s} g) / T,
                                                                    g = (1 - beta)(log p_s - log m)

``E_p[.]`` is accumulated online: the running sum of ``exp(x - running_max) * (.)`` is rescaled with the sum of
exponentials whenever the running maximum grows. All arithmetic is float32, whatever the inputs' dtype; the
gradients come back in the inputs' dtypes. The reference path (``implementation="naive"`` of every loss) builds the
full logits and is what the tests compare these with.

Host synchronisation: none, forward or backward. The loops over chunks make no data-dependent branch or
compaction (``.item()``, ``bool(tensor)``, ``nonzero()``, boolean-mask indexing): the cross-entropy's target logit
is gathered from every chunk at ``targets - start`` (clamped into the chunk) and kept by ``torch.where`` where the
target lies in that chunk, and its gradient is added the same way with ``scatter_add_``. So on a GPU the host
queues every chunk without waiting for the device (``tests/test_host_sync.py`` runs these functions, forward and
backward, under a mode that raises on any synchronising operator).

``chunk_size=None`` (the default) is :func:`emkd.chunking.default_chunk_size` of the student rows' device: 1024 on
the CPU, 8192 on CUDA.
"""

from __future__ import annotations

import math

import torch

from emkd.chunking import chunk_logits as _chunk_logits
from emkd.chunking import resolve_chunk_size, vocab_chunks
from emkd.inputs import IGNORE_INDEX

DIVERGENCE_KINDS = ("ce", "forward", "reverse", "jsd")


class _OnlineLSE:
    """Running ``max`` and ``sum exp(x - max)`` per row; ``update`` returns the factor old sums must be scaled by."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.max = torch.full((n,), -math.inf, device=device)
        self.sum = torch.zeros(n, device=device)

    def update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in chunk ``x [N, C]``; return ``(rescale [N], exp(x - max) [N, C])``."""
        new_max = torch.maximum(self.max, x.max(dim=1).values)
        rescale = torch.exp(self.max - new_max)  # (N,); 0 on the first chunk
        e = (x - new_max[:, None]).exp_()  # (N, C)
        self.sum = self.sum * rescale + e.sum(dim=1)
        self.max = new_max
        return rescale, e

    def value(self) -> torch.Tensor:
        return self.max + torch.log(self.sum)


def _target_columns(
    targets: torch.Tensor, valid: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's target sits in vocabulary chunk ``start:stop``, without leaving the device.

    Returns ``inside`` ``[N]`` bool (the row's target is not ignored and lies in the chunk) and ``col`` ``[N, 1]``
    long, the column to read or write for every row: ``targets - start``, clamped into the chunk, so that rows whose
    target lies elsewhere point at a real column and are masked out by ``inside``.
    """
    inside = valid & (targets >= start) & (targets < stop)  # (N,)
    col = (targets - start).clamp_(0, stop - start - 1)[:, None]  # (N, 1)
    return inside, col


class _FusedHeadDivergences(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, targets, kinds, temperature, jsd_beta, chunk_size, given_s, given_t):
        n, v = hs.shape[0], ws.shape[0]
        device = hs.device
        hs32 = hs.float()
        ht32 = ht.float() if ht is not None else None
        inv_t = 1.0 / temperature
        want = set(kinds)
        need_raw = "ce" in want
        need_kl = bool(want & {"forward", "reverse", "jsd"})

        # at temperature 1, CE's softmax is the divergences' p_s: one running log-sum-exp serves both
        shared = need_raw and need_kl and temperature == 1.0
        raw = _OnlineLSE(n, device) if need_raw else None
        xs_lse = raw if shared else _OnlineLSE(n, device) if need_kl else None
        xt_lse = _OnlineLSE(n, device) if need_kl else None
        exp_t = torch.zeros(n, device=device)  # sum exp(x_t - max_t) (x_t - x_s), rescaled online
        exp_s = torch.zeros(n, device=device)  # sum exp(x_s - max_s) (x_s - x_t), rescaled online
        target_logit = torch.zeros(n, device=device)
        valid = targets != IGNORE_INDEX if targets is not None else None
        one_chunk = v <= chunk_size  # then the backward pass reuses this pass's raw logits (module docstring)
        kept_zs = kept_zt = None

        for start, stop in vocab_chunks(v, chunk_size):
            zs = _given_or_computed(hs32, ws, bs, start, stop, given_s)  # (N, C)
            if one_chunk:
                kept_zs = _kept(zs, need_kl and temperature != 1.0)  # scaled in place below when T != 1
            if need_raw:
                raw_update = raw.update(zs)
                inside, col = _target_columns(targets, valid, start, stop)
                target_logit = torch.where(inside, zs.gather(1, col).squeeze(1), target_logit)  # (N,)
            if need_kl:
                xs = zs.mul_(inv_t) if temperature != 1.0 else zs  # (N, C), in place: raw logits are done with
                xt = _given_or_computed(ht32, wt, bt, start, stop, given_t)  # (N, C)
                if one_chunk:
                    kept_zt = _kept(xt, temperature != 1.0)
                if temperature != 1.0:
                    xt.mul_(inv_t)
                diff = xs - xt  # (N, C)
                rescale_s, e = raw_update if shared else xs_lse.update(xs)
                exp_s = exp_s * rescale_s + e.mul_(diff).sum(dim=1)
                del e
                rescale_t, e = xt_lse.update(xt)
                exp_t = exp_t * rescale_t - e.mul_(diff).sum(dim=1)
                del e, diff, xt
            del zs

        out = torch.zeros(n, len(kinds), device=device)
        lse_raw = raw.value() if need_raw else None
        lse_s = xs_lse.value() if need_kl else None
        lse_t = xt_lse.value() if need_kl else None
        jsd_rows = jsd_mean_g = None
        if "jsd" in want:
            jsd_rows, jsd_mean_g = _jsd_pass(hs32, ws, bs, ht32, wt, bt, lse_s, lse_t, inv_t, jsd_beta, chunk_size)
        for k, kind in enumerate(kinds):
            if kind == "ce":
                out[:, k] = torch.where(valid, lse_raw - target_logit, torch.zeros_like(lse_raw))
            elif kind == "forward":
                out[:, k] = exp_t / xt_lse.sum - lse_t + lse_s
            elif kind == "reverse":
                out[:, k] = exp_s / xs_lse.sum - lse_s + lse_t
            else:
                out[:, k] = jsd_rows

        ctx.kinds, ctx.temperature, ctx.jsd_beta, ctx.chunk_size = kinds, temperature, jsd_beta, chunk_size
        ctx.save_for_backward(
            hs, ws, bs, ht, wt, bt, targets, lse_raw, lse_s, lse_t,
            out[:, kinds.index("reverse")].clone() if "reverse" in want else None, jsd_mean_g, kept_zs, kept_zt,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt, targets, lse_raw, lse_s, lse_t, rkl, jsd_mean_g, kept_zs, kept_zt = ctx.saved_tensors
        kinds, temperature, chunk_size = ctx.kinds, ctx.temperature, ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_h or need_w or need_b):
            return (None,) * 13
        inv_t = 1.0 / temperature
        hs32 = hs.float()
        ht32 = ht.float() if ht is not None else None
        weight = {kind: grad_out[:, k].float() for k, kind in enumerate(kinds)}
        need_kl = any(k in weight for k in ("forward", "reverse", "jsd"))
        shared = "ce" in weight and need_kl and temperature == 1.0  # as in the forward pass
        if "ce" in weight:
            valid = targets != IGNORE_INDEX
            g_ce = torch.where(valid, weight["ce"], torch.zeros_like(weight["ce"]))  # (N,)
        grad_h = torch.zeros_like(hs32) if need_h else None
        grad_w = torch.empty(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None  # every row written
        grad_b = torch.empty(bs.shape, dtype=torch.float32, device=bs.device) if need_b else None
        log_beta = log_1mb = None
        if "jsd" in weight:
            log_beta, log_1mb = math.log(ctx.jsd_beta), math.log(1.0 - ctx.jsd_beta)

        v = ws.shape[0]
        for start, stop in vocab_chunks(v, chunk_size):
            # the forward pass's logits when it kept them (one chunk; read, never written), else recomputed
            zs = kept_zs if kept_zs is not None else _chunk_logits(hs32, ws, bs, start, stop)  # (N, C)
            g = torch.zeros_like(zs)  # d loss / d z_s, (N, C)
            if "ce" in weight and not shared:
                g.add_((zs - lse_raw[:, None]).exp_().mul_(g_ce[:, None]))
            if need_kl:
                # (N, C), in place of recomputed raw logits, into a new buffer when they are the forward pass's
                log_ps = (zs.mul_(inv_t) if kept_zs is None else zs * inv_t).sub_(lse_s[:, None])
                ps = log_ps.exp()
                if shared:  # temperature 1: softmax(z_s) is p_s, bit for bit (z * 1.0 == z)
                    g.addcmul_(ps, g_ce[:, None])
            if "ce" in weight:
                inside, col = _target_columns(targets, valid, start, stop)
                # -g_ce at the target's column of the rows whose target is in this chunk, -0 (no change) elsewhere
                g.scatter_add_(1, col, torch.where(inside, g_ce, 0.0).neg_()[:, None])
            if need_kl:
                zt = kept_zt if kept_zt is not None else _chunk_logits(ht32, wt, bt, start, stop)  # (N, C)
                log_pt = (zt.mul_(inv_t) if kept_zt is None else zt * inv_t).sub_(lse_t[:, None])  # (N, C)
                if "forward" in weight:
                    g.add_((ps - log_pt.exp()).mul_((weight["forward"] * inv_t)[:, None]))
                if "reverse" in weight:
                    term = (log_ps - log_pt).sub_(rkl[:, None]).mul_(ps)
                    g.add_(term.mul_((weight["reverse"] * inv_t)[:, None]))
                    del term
                if "jsd" in weight:
                    log_m = torch.logaddexp(log_pt + log_beta, log_ps + log_1mb)
                    term = (log_ps - log_m).mul_(1.0 - ctx.jsd_beta).sub_(jsd_mean_g[:, None]).mul_(ps)
                    g.add_(term.mul_((weight["jsd"] * inv_t)[:, None]))
                    del term, log_m
                del ps, log_pt
            del zs
            if need_h:
                grad_h.addmm_(g, ws[start:stop].float())  # (N, D)
            if need_w:
                torch.mm(g.T, hs32, out=grad_w[start:stop])  # (C, D)
            if need_b:
                torch.sum(g, dim=0, out=grad_b[start:stop])
        return (
            grad_h.to(hs.dtype) if need_h else None,
            grad_w.to(ws.dtype) if need_w else None,
            grad_b.to(bs.dtype) if need_b else None,
            None, None, None, None, None, None, None, None, None, None,
        )


def _kept(z: torch.Tensor, written_later: bool) -> torch.Tensor:
    """Chunk logits ``z`` as the backward pass reads them: float32 (under ``torch.autocast`` the product comes out in
    autocast's dtype, and the backward pass, which runs outside it, computes in float32), and a copy when the
    forward pass is about to write into ``z``."""
    if z.dtype != torch.float32:
        return z.float()
    return z.clone() if written_later else z


def _given_or_computed(h32, w, b, start, stop, given):
    """The float32 logits ``[N, C]`` of chunk ``start:stop``; with ``given`` ``[K, V]`` (one chunk only), the last
    ``K`` rows are ``given`` and only the first ``N - K`` are computed."""
    if given is None:
        return _chunk_logits(h32, w, b, start, stop)
    computed = _chunk_logits(h32[: h32.shape[0] - given.shape[0]], w, b, start, stop)  # (N - K, C)
    return torch.cat([computed, given.float()])


def _jsd_pass(hs32, ws, bs, ht32, wt, bt, lse_s, lse_t, inv_t, beta, chunk_size):
    """Second pass of JSD, once both log-sum-exps are known: per row ``JSD_beta`` and ``E_{p_s}[g]`` (for the
    backward), ``g = (1 - beta)(log p_s - log m)``."""
    n, v = hs32.shape[0], ws.shape[0]
    log_beta, log_1mb = math.log(beta), math.log(1.0 - beta)
    rows = torch.zeros(n, device=hs32.device)
    mean_g = torch.zeros(n, device=hs32.device)
    for start, stop in vocab_chunks(v, chunk_size):
        log_ps = _chunk_logits(hs32, ws, bs, start, stop) * inv_t - lse_s[:, None]  # (N, C)
        log_pt = _chunk_logits(ht32, wt, bt, start, stop) * inv_t - lse_t[:, None]  # (N, C)
        log_m = torch.logaddexp(log_pt + log_beta, log_ps + log_1mb)
        ps, pt = torch.exp(log_ps), torch.exp(log_pt)
        s_term = (ps * (log_ps - log_m)).sum(dim=1)
        rows += beta * (pt * (log_pt - log_m)).sum(dim=1) + (1.0 - beta) * s_term
        mean_g += (1.0 - beta) * s_term
    return rows, mean_g


def fused_head_divergences(
    hs: torch.Tensor,
    ws: torch.Tensor,
    bs: torch.Tensor | None,
    ht: torch.Tensor | None,
    wt: torch.Tensor | None,
    bt: torch.Tensor | None,
    kinds: tuple[str, ...],
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    jsd_beta: float = 0.5,
    chunk_size: int | None = None,
    given: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row divergences between ``softmax(hs W_s^T + b_s)`` and ``softmax(ht W_t^T + b_t)``, never holding more
    than ``N x chunk_size`` logits.

    Args:
        hs: ``[N, Ds]`` student rows (gradient flows to ``hs``, ``ws`` and ``bs``); ``ws`` ``[V, Ds]``, ``bs`` ``[V]``.
        ht: ``[N, Dt]`` teacher rows paired with ``hs`` row by row (no gradient); ``wt`` ``[V, Dt]``, ``bt`` ``[V]``.
            May be ``None`` when ``kinds`` is ``("ce",)``.
        kinds: any of ``ce`` (needs ``targets`` ``[N]``, ``-100`` rows give 0), ``forward`` ``KL(p_t || p_s)``,
            ``reverse`` ``KL(p_s || p_t)``, ``jsd`` (mixture ``m = jsd_beta p_t + (1 - jsd_beta) p_s``).
        temperature: ``p = softmax(z / T)`` for the divergences (not for ``ce``); no ``T**2`` factor.
        chunk_size: vocabulary rows per chunk; ``None``: :func:`emkd.chunking.default_chunk_size` of ``hs``'s device.
        given: ``(z_s [K, V], z_t [K, V])``, the logits of the last ``K`` rows of ``hs`` and ``ht`` (without
            gradient; they must be those rows' logits), used instead of computing them. Only when the vocabulary is
            one chunk (``V <= chunk_size``); ignored otherwise. Gradients still reach ``hs``, ``ws`` and ``bs``
            for every row.

    Returns:
        ``[N, len(kinds)]`` float32, column ``k`` the per-row value of ``kinds[k]``, no reduction.
    """
    unknown = [k for k in kinds if k not in DIVERGENCE_KINDS]
    if unknown or len(set(kinds)) != len(kinds) or not kinds:
        raise ValueError(f"kinds must be distinct names from {DIVERGENCE_KINDS}, got {kinds}")
    if hs.dim() != 2 or ws.dim() != 2 or hs.shape[1] != ws.shape[1]:
        raise ValueError(f"fused_head_divergences: hs must be [N, D] and ws [V, D], got {tuple(hs.shape)} and {tuple(ws.shape)}")
    if kinds != ("ce",):
        if ht is None or wt is None:
            raise ValueError(f"kinds {kinds} need teacher rows ht and head wt")
        if ht.shape[0] != hs.shape[0] or wt.shape[0] != ws.shape[0] or ht.shape[1] != wt.shape[1]:
            raise ValueError(
                f"fused_head_divergences: student rows {tuple(hs.shape)} / head {tuple(ws.shape)} do not pair with "
                f"teacher rows {tuple(ht.shape)} / head {tuple(wt.shape)}"
            )
        ht, wt = ht.detach(), wt.detach()
        bt = None if bt is None else bt.detach()
    if "ce" in kinds:
        if targets is None or targets.shape != (hs.shape[0],):
            raise ValueError(f"kind 'ce' needs targets [N={hs.shape[0]}], got {None if targets is None else tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk_size = resolve_chunk_size(chunk_size, hs.device)
    if hs.shape[0] == 0:
        return hs.new_zeros(0, len(kinds), dtype=torch.float32) + 0.0 * hs.sum()
    given_s = given_t = None
    if given is not None and ws.shape[0] <= chunk_size:
        given_s, given_t = (z.detach() for z in given)
        k = given_s.shape[0]
        if given_s.shape != (k, ws.shape[0]) or given_t.shape != (k, ws.shape[0]) or k > hs.shape[0]:
            raise ValueError(f"fused_head_divergences: given logits {tuple(given_s.shape)} / {tuple(given_t.shape)} "
                             f"must be [K <= N={hs.shape[0]}, V={ws.shape[0]}] each")
        if ht is None:  # "ce" alone reads no teacher logits
            given_t = None
    return _FusedHeadDivergences.apply(hs, ws, bs, ht, wt, bt, targets, tuple(kinds), float(temperature),
                                       float(jsd_beta), chunk_size, given_s, given_t)


class _FusedHeadGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, chunk_size):
        h32 = h.float()
        gram = h32.new_zeros(*h.shape[:-1], h.shape[-2])  # ([G,] M, M)
        z = None
        for start, stop in vocab_chunks(w.shape[0], chunk_size):
            z = _chunk_logits(h32, w, b, start, stop)  # ([G,] M, C)
            gram += z @ z.transpose(-1, -2)
        ctx.chunk_size = chunk_size
        # one chunk: the backward pass reuses its logits (module docstring)
        ctx.save_for_backward(h, w, b, _kept(z, False) if w.shape[0] <= chunk_size else None)
        return gram

    @staticmethod
    def backward(ctx, grad_gram):
        h, w, b, kept_z = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h32 = h.float()
        sym = grad_gram.float() + grad_gram.float().transpose(-1, -2)  # d gram / d Z = (G + G^T) Z
        flat_h = h32.reshape(-1, h.shape[-1])  # (G M, D)
        grad_h = torch.zeros_like(h32) if need_h else None
        grad_w = torch.empty(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.empty(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        for start, stop in vocab_chunks(w.shape[0], ctx.chunk_size):
            z = kept_z if kept_z is not None else _chunk_logits(h32, w, b, start, stop)  # ([G,] M, C)
            g = sym @ z  # ([G,] M, C)
            if need_h:
                grad_h += g @ w[start:stop].float()
            flat_g = g.reshape(-1, stop - start)  # (G M, C)
            if need_w:
                torch.mm(flat_g.T, flat_h, out=grad_w[start:stop])
            if need_b:
                torch.sum(flat_g, dim=0, out=grad_b[start:stop])
        return (
            grad_h.to(h.dtype) if need_h else None,
            grad_w.to(w.dtype) if need_w else None,
            grad_b.to(b.dtype) if need_b else None,
            None,
        )


def fused_head_gram(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, chunk_size: int | None = None
) -> torch.Tensor:
    """``Z Z^T`` ``[M, M]`` (float32) of the logits ``Z = h W^T + b`` (``h`` ``[M, D]``, ``W`` ``[V, D]``), summed over
    vocabulary chunks of ``chunk_size`` rows (``None``: :func:`emkd.chunking.default_chunk_size` of ``h``'s device);
    ``h`` ``[G, M, D]`` gives ``G`` Gram matrices ``[G, M, M]`` at once. Gradients reach ``h``, ``W`` and ``b`` when
    they require it."""
    if h.dim() not in (2, 3) or w.dim() != 2 or h.shape[-1] != w.shape[1]:
        raise ValueError(
            f"fused_head_gram: h must be [M, D] or [G, M, D] and w [V, D], got {tuple(h.shape)} and {tuple(w.shape)}"
        )
    return _FusedHeadGram.apply(h, w, b, resolve_chunk_size(chunk_size, h.device))

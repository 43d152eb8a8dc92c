"""Row-wise divergences between two sets of logits over the same vocabulary (SPEC §1).

Every function takes ``student`` first and ``teacher`` second, both ``[N, V]`` logits, and returns ``[N]`` float32
values, one per row, with no reduction. ``p = softmax(z / T)``; ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` is
computed from log-softmax, so it is finite for any finite logits. No ``T**2`` factor is applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from log-probabilities ``[N, V]`` -> ``[N]``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` per row (mode-covering; LLaVA-KD's MDist, vanilla KD)."""
    return kl_rows(_log_probs(teacher, temperature), _log_probs(student, temperature))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_student || p_teacher)`` per row (mode-seeking; EM-KD's VSD and RLD, MiniLLM)."""
    return kl_rows(_log_probs(student, temperature), _log_probs(teacher, temperature))


def jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence per row.

    ``m = beta * p_teacher + (1 - beta) * p_student``;
    ``JSD_beta = beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m)``. ``beta = 0.5`` is the symmetric JSD.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must lie in (0, 1), got {beta}")
    log_s = _log_probs(student, temperature)
    log_t = _log_probs(teacher, temperature)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * kl_rows(log_t, log_m) + (1.0 - beta) * kl_rows(log_s, log_m)


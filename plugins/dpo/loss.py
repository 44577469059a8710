"""The DPO and IPO losses on summed response log-probabilities, and how those log-probabilities are computed.

With ``pi`` the policy, ``ref`` the frozen reference and, for a preference
``y_w > y_l`` to prompt ``x``, the implicit rewards
``r(y) = beta * (log pi(y|x) - log ref(y|x))`` (log-probabilities summed over
the response's tokens), DPO (Rafailov et al., 2023, https://arxiv.org/abs/2305.18290, Eq. 7) minimises::

    L_DPO = -log sigmoid(r(y_w) - r(y_l))

cDPO with ``label_smoothing`` eps (a fraction eps of the labels assumed flipped)::

    L_cDPO = -(1 - eps) log sigmoid(r(y_w) - r(y_l)) - eps log sigmoid(r(y_l) - r(y_w))

and IPO (Azar et al., 2023, https://arxiv.org/abs/2310.12036, Eq. 17) with
``h = (log pi/ref)(y_w) / |y_w| - (log pi/ref)(y_l) / |y_l|`` (per-token
averages, as TRL does with the IPO authors' agreement)::

    L_IPO = (h - 1 / (2 beta))^2
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.training.losses import IGNORE_INDEX, decoder_and_head, lm_hidden_states, supports_chunked_loss

__all__ = ["PreferenceLosses", "preference_losses", "sequence_logprobs"]


class PreferenceLosses(NamedTuple):
    """Per-pair results of :func:`preference_losses`, each ``(P,)``.

    Attributes:
        losses: the loss of each pair.
        chosen_rewards: ``beta * (log pi - log ref)(y_w)``, the implicit reward of the preferred response.
        rejected_rewards: the same for the other response.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PreferenceLosses:
    """DPO / cDPO / IPO losses of ``P`` preference pairs from their summed response log-probabilities.

    :param policy_chosen: ``(P,)`` ``log pi(y_w|x)``; the other three likewise.
    :param chosen_lengths: ``(P,)`` response token counts, needed by ``ipo`` only.
    :raises ValueError: for an unknown ``loss_type`` or ``ipo`` without lengths.
    """
    chosen_ratio = policy_chosen - reference_chosen  # (P,)
    rejected_ratio = policy_rejected - reference_rejected  # (P,)
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' averages log-ratios per token: pass chosen_lengths and rejected_lengths")
        h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    return PreferenceLosses(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def sequence_logprobs(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """``sum_t log p(labels[t] | tokens < t)`` of each row over its labelled positions: ``(N,)`` float32.

    ``batch`` holds ``input_ids``/``attention_mask`` ``(N, T)`` and ``labels`` ``(N, T)`` with -100 on
    positions that are not scored (prompt, padding). Only the labelled positions go through the output
    head, so the full ``(N, T, V)`` logits never exist. Input-side and attention-side adapters are in
    play as in every objective (:func:`peftkit.training.losses.lm_hidden_states`).
    """
    if supports_chunked_loss(model):
        hidden = lm_hidden_states(model, batch)  # (N, T, H)
        _, head = decoder_and_head(model)
    else:  # the model post-processes its logits (soft-capping): use its own head
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits  # (N, T, V)
        head = None
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE_INDEX  # (N, T-1)
    selected = hidden[:, :-1][keep]  # (K, H) or (K, V)
    logits = (head(selected) if head is not None else selected).float()  # (K, V)
    token_logprobs = -F.cross_entropy(logits, labels[keep], reduction="none")  # (K,)
    rows = keep.nonzero()[:, 0]  # (K,) the row of each labelled position
    return torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logprobs)

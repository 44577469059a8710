"""Sampling responses from the policy and laying (prompt, response) out for the forward passes.

Generation takes left-padded prompts (what ``generate`` needs). The episodes
are then re-packed right-padded, ``[prompt | response | pad]``, so every
forward pass of every role (policy, reference, value, reward) sees each real
token at the same position as an unpadded sequence, under every method.

Response-aligned tensors are ``(B, R)``: response token ``j`` of row ``b`` sits
at sequence position ``p_b + j`` (``p_b`` = prompt length) and is predicted by
the hidden state at ``action_index[b, j] = p_b + j - 1``, which is also the
state its value estimate ``V(s_t)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from peftkit.errors import TrainingError

__all__ = ["Rollout", "generate_responses", "pack_episodes", "left_pad"]


@dataclass
class Rollout:
    """One batch of episodes and everything PPO computes about them."""

    input_ids: torch.Tensor  # (B, L) prompt + response, right padded
    attention_mask: torch.Tensor  # (B, L)
    action_index: torch.Tensor  # (B, R) hidden-state position predicting each response token
    response_tokens: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) 1 on response tokens
    ended: torch.Tensor  # (B,) bool: the response closed with a stop token
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # logprobs, values, scores, advantages, ...

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: torch.Tensor) -> "Rollout":
        """The episodes ``rows`` (a minibatch), trimmed to their own longest sequence and response."""
        mask, response_mask = self.attention_mask[rows], self.response_mask[rows]
        length = int(mask.sum(-1).max())
        width = max(int(response_mask.sum(-1).max()), 1)
        return Rollout(
            self.input_ids[rows, :length],
            mask[:, :length],
            self.action_index[rows, :width],
            self.response_tokens[rows, :width],
            response_mask[:, :width],
            self.ended[rows],
            {k: (v[rows, :width] if v.dim() == 2 else v[rows]) for k, v in self.stats.items()},
        )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(B, max length)``, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


class _RefuseNonFiniteLogits:
    """Stops sampling on NaN/+inf logits with a TrainingError; torch's sampler would fail with a bare
    "probability tensor contains either inf, nan or element < 0". (-inf is fine: top-k/top-p masking.)"""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores: (B, V)
        if torch.isnan(scores).any() or torch.isposinf(scores).any():
            raise TrainingError(
                f"the policy's next-token logits hold NaN/inf while sampling token {input_ids.shape[1] + 1} of a "
                "rollout: the policy adapter has diverged (its weights are finite but too large for the model's "
                "outputs). Lower train.lr or set train.max_grad_norm, and restart from the last good checkpoint"
            )
        return scores


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    device: Any = None,
    do_sample: bool = True,
) -> list[tuple[list[int], bool]]:
    """Sample one response per prompt from ``model``'s active adapter (``do_sample=False``: greedy).

    :returns: per prompt ``(response token ids, ended)``: the ids run through
        the first stop token (kept: the reward head reads there) or to
        ``max_new_tokens``, and ``ended`` says whether a stop token came.
    """
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=do_sample,
        **({"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}),
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
        logits_processor=[_RefuseNonFiniteLogits()],
    )
    new_tokens = out[:, input_ids.shape[1] :].tolist()
    stops = set(stop_ids)
    results = []
    for tokens in new_tokens:
        cut = next((i for i, t in enumerate(tokens) if t in stops), None)
        results.append((tokens[: cut + 1], True) if cut is not None else (tokens[:max_new_tokens], False))
    return results


def pack_episodes(prompts: Sequence[Sequence[int]], responses: Sequence[tuple[Sequence[int], bool]], pad_id: int, device: Any = None) -> Rollout:
    """Right-padded ``[prompt | response]`` rows and the response-aligned index tensors."""
    rows = [list(p) + list(r) for p, (r, _) in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    resp_width = max(max(len(r) for r, _ in responses), 1)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    action_index = torch.zeros((batch, resp_width), dtype=torch.long)
    response_tokens = torch.full((batch, resp_width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((batch, resp_width), dtype=torch.long)
    for b, (prompt, (response, _)) in enumerate(zip(prompts, responses)):
        if not prompt:
            raise ValueError(f"prompt {b} is empty: a response needs at least one prompt token to be predicted from")
        input_ids[b, : len(rows[b])] = torch.tensor(rows[b], dtype=torch.long)
        attention_mask[b, : len(rows[b])] = 1
        n = len(response)
        action_index[b, :n] = torch.arange(len(prompt) - 1, len(prompt) - 1 + n)
        response_tokens[b, :n] = torch.tensor(list(response), dtype=torch.long)
        response_mask[b, :n] = 1
    ended = torch.tensor([e for _, e in responses], dtype=torch.bool)
    return Rollout(*(t.to(device) for t in (input_ids, attention_mask, action_index, response_tokens, response_mask, ended)))

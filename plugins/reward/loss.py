"""The InstructGPT pairwise ranking loss over all C(K, 2) comparisons of each prompt.

For a prompt with K responses ranked best first, ``y_1 > y_2 > ... > y_K``::

    loss(x) = -1/C(K,2) * sum_{i<j} log sigmoid(r(x, y_i) - r(x, y_j))

(Ouyang et al., 2022, https://arxiv.org/abs/2203.02155, Eq. 1). Each response
is scored by ONE forward pass; the pairs only index those scores, so a group
costs K forwards, not K(K-1). The batch loss is the mean over prompts, so each
prompt weighs the same whatever its K (the paper's reason for keeping all
comparisons of a prompt in one batch element: no overfitting to repeated
responses). A (prompt, chosen, rejected) pair is the case K = 2.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pair_indices", "ranking_loss", "RankingStats"]


def pair_indices(group_sizes: Sequence[int], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Winner and loser positions of every comparison, and each comparison's weight.

    Responses are laid out flat, group after group, best first within a group.

    :returns: ``(winners, losers, weights)``, each ``(num_pairs,)``; the weights
        are ``1 / (C(K,2) * num_groups)`` so that their sum is 1.
    """
    winners, losers, weights = [], [], []
    start = 0
    for k in group_sizes:
        if k < 2:
            raise ValueError(f"a ranked group needs at least 2 responses, got {k}")
        i, j = torch.triu_indices(k, k, offset=1)
        winners.append(i + start)
        losers.append(j + start)
        weights.append(torch.full((i.numel(),), 1.0 / (i.numel() * len(group_sizes))))
        start += k
    return torch.cat(winners).to(device), torch.cat(losers).to(device), torch.cat(weights).to(device)


class RankingStats(dict):
    """``accuracy`` (fraction of pairs with r_w > r_l) and ``margin`` (mean r_w - r_l), per pair."""


def ranking_loss(scores: torch.Tensor, group_sizes: Sequence[int]) -> tuple[torch.Tensor, RankingStats]:
    """The mean over groups of the mean over each group's pairs of ``-log sigmoid(r_w - r_l)``.

    :param scores: ``(N,)`` one score per response, groups laid out flat, best first.
    :param group_sizes: K of each group; they sum to N.
    :returns: ``(loss, stats)``; ``stats`` holds plain floats over all pairs.
    """
    if sum(group_sizes) != scores.shape[0]:
        raise ValueError(f"group sizes {list(group_sizes)} sum to {sum(group_sizes)}, but there are {scores.shape[0]} scores")
    winners, losers, weights = pair_indices(group_sizes, scores.device)
    margins = scores[winners] - scores[losers]  # (num_pairs,)
    loss = -(weights.to(margins.dtype) * F.logsigmoid(margins)).sum()
    with torch.no_grad():
        stats = RankingStats(accuracy=float((margins > 0).float().mean()), margin=float(margins.mean()), pairs=int(margins.numel()))
    return loss, stats

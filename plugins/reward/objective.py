"""The ``reward`` objective: train adapter + scalar head with the pairwise ranking loss.

``loss`` scores every response of the batch with one forward pass (the active
adapter + its head ``heads[<adapter name>]``) and applies
:func:`~peftkit_plugins.reward.loss.ranking_loss`. The trainer's usual loop
runs it, with the objective's three optional steps for what a head needs:
``setup_model`` creates the head before the optimizer sees the parameters (or
restores the checkpoint's on ``--resume``), ``save_extras`` saves it next to
every adapter (:mod:`~peftkit_plugins.reward.saving`), and ``eval_metrics``
reports held-out pairwise accuracy and mean margin with the held-out loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.registry import ObjectiveLoss
from peftkit_plugins.reward import data as reward_data
from peftkit_plugins.reward.head import ScalarHead, heads_of, sequence_scores
from peftkit_plugins.reward.loss import ranking_loss
from peftkit_plugins.reward.options import RewardOptions
from peftkit_plugins.reward.saving import load_head, save_head

__all__ = ["RewardObjective", "attach_head", "evaluate_ranking"]


def attach_head(tuned: nn.Module, name: str | None = None, *, seed: int = 0) -> ScalarHead:
    """Create (or return the existing) trainable head ``heads[name]`` for adapter ``name`` (default: the active one)."""
    name = name or tuned.active_adapter
    heads = heads_of(tuned)
    if name not in heads:
        head = ScalarHead(int(tuned.config.hidden_size), generator=torch.Generator().manual_seed(seed))
        param = next(p for p in tuned.base_model.parameters() if p.is_floating_point())
        heads[name] = head.to(device=param.device, dtype=param.dtype)
    return heads[name]


def _head_for(model: nn.Module) -> nn.Module:
    name = getattr(model, "active_adapter", None)
    heads = model._modules.get("heads") or {}
    if name not in heads:
        raise PeftkitError(
            f"the reward objective found no head for adapter {name!r}; call "
            "peftkit_plugins.reward.attach_head(tuned) before training (the trainer does it through setup_model)"
        )
    return heads[name]


@torch.no_grad()
def evaluate_ranking(model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, batch_size: int = 8) -> dict[str, float]:
    """Held-out pairwise accuracy (fraction of pairs ranked right) and mean margin over ``examples``."""
    head = _head_for(model)
    device = next(head.parameters()).device
    correct, margin, pairs = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = reward_data.collate(examples[start : start + batch_size], tokenizer)
        scores = sequence_scores(model, head, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        _, stats = ranking_loss(scores.float(), batch["group_sizes"].tolist())
        correct += stats["accuracy"] * stats["pairs"]
        margin += stats["margin"] * stats["pairs"]
        pairs += stats["pairs"]
    return {"eval_accuracy": correct / pairs, "eval_margin": margin / pairs} if pairs else {}


class RewardObjective:
    """Reward model: ``r(x, y) = head(h_last)`` trained on rankings with ``-mean log sigmoid(r_w - r_l)``."""

    name = "reward"
    description = "reward model: scalar head on the last token, InstructGPT pairwise ranking loss over K responses"
    options = RewardOptions

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
        return reward_data.prepare_data(records, tokenizer, options, max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return reward_data.collate(examples, tokenizer)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: Any) -> ObjectiveLoss:
        scores = sequence_scores(model, _head_for(model), batch["input_ids"], batch["attention_mask"])  # (N,)
        group_sizes = batch["group_sizes"].tolist()
        loss, stats = ranking_loss(scores.float(), group_sizes)
        return ObjectiveLoss(loss, len(group_sizes), {"accuracy": stats["accuracy"], "margin": stats["margin"]})

    # --------------------------------------------- the trainer's optional steps
    def setup_model(self, tuned: nn.Module, options: RewardOptions, *, checkpoint: Path | None = None) -> None:
        """Give the active adapter its head (before the optimizer sees the parameters); on resume, the checkpoint's."""
        head = attach_head(tuned, seed=options.head_seed)
        if checkpoint is not None:
            with torch.no_grad():
                head.load_state_dict(load_head(checkpoint).state_dict())

    def save_extras(self, tuned: nn.Module, directory: Path, options: RewardOptions) -> None:
        """The head beside every adapter the trainer saves (checkpoint and final)."""
        save_head(heads_of(tuned)[tuned.active_adapter], directory)

    def eval_metrics(self, model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, options: RewardOptions) -> dict[str, float]:
        """Held-out pairwise accuracy and mean margin."""
        return evaluate_ranking(model, examples, tokenizer)

"""The ``dpo`` objective: direct preference optimisation of an adapter against a frozen reference on the same base.

Data are the reward objective's preference files (pairs, and K-rankings whose
C(K, 2) comparisons all count, each prompt weighing the same), read by
:mod:`peftkit_plugins.reward.data`. ``loss`` runs the policy (the active
adapter) once over every response of the batch, the reference once without
grad, and applies :func:`~.loss.preference_losses`. The reference is

* a frozen copy of the SFT adapter, loaded as adapter ``"reference"`` on the
  same base and switched to for its pass (``set_adapter``), when
  ``sft_adapter`` is set; the policy then starts as a trainable copy of it;
* the bare base (``disable_adapters()``) otherwise.

Either way the base model is held once. The reference pass runs in eval mode
(no dropout: the reference is one fixed function). The trainer's ordinary
loop drives it, so gradient accumulation, DDP, checkpoints and ``--resume``
work as for SFT; ``setup_model`` loads the reference (and, on a fresh run,
the policy's start) before the optimizer sees the parameters.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.registry import ObjectiveLoss
from peftkit.training.losses import IGNORE_INDEX
from peftkit_plugins.dpo.loss import PreferenceLosses, preference_losses, sequence_logprobs
from peftkit_plugins.dpo.options import DPOOptions
from peftkit_plugins.reward import data as reward_data
from peftkit_plugins.reward.loss import pair_indices

__all__ = ["DPOObjective", "REFERENCE", "collate", "evaluate_preferences", "reference_logprobs", "setup_reference"]

#: Adapter name of the frozen reference (a copy of the SFT adapter).
REFERENCE = "reference"


def collate(examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """The reward objective's flat batch plus ``labels`` (the response tokens, -100 elsewhere) and ``response_lengths``.

    :returns: ``input_ids``/``attention_mask``/``labels`` ``(N, T)``, ``group_sizes`` ``(G,)``, ``response_lengths`` ``(N,)``.
    """
    batch = reward_data.collate(examples, tokenizer)
    lengths = torch.tensor([n for e in examples for n in e["response_lengths"]], dtype=torch.long)  # (N,)
    ends = batch["attention_mask"].sum(-1)  # (N,) right padding: row i is real up to ends[i]
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])  # (N, T)
    scored = (positions >= (ends - lengths).unsqueeze(-1)) & (positions < ends.unsqueeze(-1))
    batch["labels"] = batch["input_ids"].masked_fill(~scored, IGNORE_INDEX)
    batch["response_lengths"] = lengths
    return batch


@contextlib.contextmanager
def _reference_active(model: nn.Module) -> Iterator[None]:
    """The reference adapter active (or, without one, every adapter off) and eval mode inside the block."""
    was_training = model.training
    model.eval()
    try:
        if REFERENCE in getattr(model, "adapters", {}):
            previous = model.active_adapter
            model.set_adapter(REFERENCE)
            try:
                yield
            finally:
                model.set_adapter(previous)
        else:
            with model.disable_adapters():
                yield
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probabilities ``(N,)`` under the reference (no grad)."""
    with _reference_active(model):
        return sequence_logprobs(model, dict(batch))


def _pair_losses(model: nn.Module, batch: Mapping[str, torch.Tensor], options: DPOOptions) -> tuple[PreferenceLosses, torch.Tensor]:
    """Per-pair losses and rewards of a batch, and each pair's weight (each prompt weighs the same)."""
    policy = sequence_logprobs(model, dict(batch))  # (N,)
    reference = batch["reference_logprobs"] if "reference_logprobs" in batch else reference_logprobs(model, batch)
    winners, losers, weights = pair_indices(batch["group_sizes"].tolist(), policy.device)
    lengths = batch["response_lengths"].to(policy.device)
    out = preference_losses(
        policy[winners], policy[losers], reference[winners], reference[losers],
        beta=options.beta, label_smoothing=options.label_smoothing, loss_type=options.loss_type,
        chosen_lengths=lengths[winners], rejected_lengths=lengths[losers],
    )
    return out, weights.to(out.losses.dtype)


def _stats(out: PreferenceLosses) -> dict[str, float]:
    margins = out.chosen_rewards - out.rejected_rewards
    return {
        "accuracy": float((margins > 0).float().mean()), "margin": float(margins.mean()),
        "chosen_reward": float(out.chosen_rewards.mean()), "rejected_reward": float(out.rejected_rewards.mean()),
    }


@torch.no_grad()
def evaluate_preferences(model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, options: DPOOptions, batch_size: int = 8) -> dict[str, float]:
    """Held-out preference accuracy (implicit reward margin > 0), mean margin and mean chosen/rejected rewards, per pair."""
    device = next(p for p in model.parameters()).device
    totals = {"accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
    pairs = 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer).items()}
        out, _ = _pair_losses(model, batch, options)
        n = int(out.losses.numel())
        for key, value in _stats(out).items():
            totals[key] += value * n
        pairs += n
    return {f"eval_{key}": value / pairs for key, value in totals.items()} if pairs else {}


def _adapter_method(path: str) -> str:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise PeftkitError(f"dpo option sft_adapter = {path!r} is not an adapter directory (no adapter_config.json); "
                           "give the adapter/ folder an SFT run wrote, or null for a bare-base reference")
    return json.loads(config.read_text())["method"]


def setup_reference(tuned: Any, options: DPOOptions, *, resuming: bool = False) -> str | None:
    """Load the frozen reference (a copy of ``options.sft_adapter``) next to the policy; the policy becomes a copy too.

    :param resuming: keep the policy as it is (the checkpoint's), load only the reference.
    :returns: the reference adapter's name, or ``None`` for the bare base.
    :raises PeftkitError: if the SFT adapter is missing or of another method than the policy.
    """
    if not options.sft_adapter:
        return None
    policy = tuned.active_adapter
    sft_method = _adapter_method(options.sft_adapter)
    current = tuned.adapters.get(policy)
    if current is not None and current != sft_method:
        raise PeftkitError(
            f"the dpo policy starts as a copy of sft_adapter {options.sft_adapter!r}, a {sft_method!r} adapter, but "
            f"method.name is {current!r}; set method.name: {sft_method} (its options come from the SFT adapter)"
        )
    if not resuming:
        tuned.delete_adapter(policy)
        tuned.load_adapter(options.sft_adapter, policy, is_trainable=True)
    tuned.load_adapter(options.sft_adapter, REFERENCE, is_trainable=False)
    tuned.set_adapter(policy)
    return REFERENCE


class DPOObjective:
    """DPO: ``-log sigmoid(beta * (log-ratio(y_w) - log-ratio(y_l)))`` against a frozen reference, no reward model."""

    name = "dpo"
    description = "direct preference optimisation on preference pairs/rankings against the frozen SFT adapter (or bare base); ipo and cDPO"
    options = DPOOptions

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
        return reward_data.prepare_data(records, tokenizer, options, max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return collate(examples, tokenizer)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: DPOOptions) -> ObjectiveLoss:
        """The mean over prompts of the mean over each prompt's pairs of the DPO (cDPO, IPO) loss."""
        out, weights = _pair_losses(model, batch, options)
        return ObjectiveLoss((weights * out.losses).sum(), int(batch["group_sizes"].numel()), _stats(out))

    # --------------------------------------------- the trainer's optional steps
    def setup_model(self, tuned: nn.Module, options: DPOOptions, *, checkpoint: Path | None = None) -> None:
        """Load the reference adapter; on a fresh run the policy becomes a trainable copy of the SFT adapter."""
        setup_reference(tuned, options, resuming=checkpoint is not None)

    def eval_metrics(self, model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, options: DPOOptions) -> dict[str, float]:
        """Held-out preference accuracy, mean implicit-reward margin, mean chosen and rejected rewards."""
        return evaluate_preferences(model, examples, tokenizer, options)

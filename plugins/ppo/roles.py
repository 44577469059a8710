"""One frozen base model, four roles: policy, reference, value and reward, switched per forward pass.

* **policy**: a trainable adapter (a copy of the SFT adapter when there is one);
* **reference**: the SFT policy, frozen: a second copy of the SFT adapter
  (``None`` means the bare base, used only when there is no SFT adapter, i.e.
  when the policy itself started from the base);
* **value**: a scalar head on the policy's hidden states (``heads["value"]``),
  so one policy forward gives log-probabilities and values. By default the
  head reads them detached: the value loss trains the head only, because its
  gradient through a shared adapter competes with the policy's (measured on
  the tiny pipeline: with large returns the joint, clipped gradient was mostly
  the value's, and the policy drifted to high entropy). ``value_shares_trunk``
  lets it train the adapter too (TRL's shared value head);
* **reward**: a frozen reward adapter + its head (``heads[<reward name>]``).

Every adapter lives on the same :class:`peftkit.TunedModel`; :meth:`Roles.use`
makes one of them active for the next forward (``set_adapter``), so PPO holds
one base model in memory, not four. Methods may be mixed (a LoRA reward model
under a prompt-tuning policy): only one adapter takes part in each forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from peftkit.training.losses import decoder_and_head, lm_hidden_states
from peftkit_plugins.ppo.rollout import Rollout
from peftkit_plugins.reward.head import ScalarHead, heads_of, last_token_hidden

__all__ = ["Roles", "attach_value_head"]


def attach_value_head(tuned: nn.Module, *, seed: int = 0, name: str = "value") -> ScalarHead:
    """The trainable value head ``heads[name]`` (created on first use, on the model's device and dtype)."""
    heads = heads_of(tuned)
    if name not in heads:
        head = ScalarHead(int(tuned.config.hidden_size), generator=torch.Generator().manual_seed(seed))
        param = next(p for p in tuned.base_model.parameters() if p.is_floating_point())
        heads[name] = head.to(device=param.device, dtype=param.dtype)
    return heads[name]


@dataclass
class Roles:
    """Adapter names of the four roles on ``tuned`` (see the module docstring)."""

    tuned: Any
    policy: str
    reward: str | None  # None: no reward model role (GRPO with a reward function)
    reference: str | None = None
    value_head: str = "value"
    value_shares_trunk: bool = False

    @contextlib.contextmanager
    def use(self, role: str) -> Iterator[None]:
        """Make ``role``'s adapter (``"policy"``, ``"reference"``, ``"reward"``) the active one inside the block."""
        name = getattr(self, role)
        if name is None:  # the bare base as reference
            with self.tuned.disable_adapters():
                yield
            return
        previous = self.tuned.active_adapter
        self.tuned.set_adapter(name)
        try:
            yield
        finally:
            self.tuned.set_adapter(previous)

    # ------------------------------------------------------------ forwards
    def _response_hidden(self, rollout: Rollout) -> torch.Tensor:
        hidden = lm_hidden_states(self.tuned, {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask})  # (B, L, H)
        index = rollout.action_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, R, H)
        return torch.gather(hidden, 1, index)  # (B, R, H)

    def policy_forward(self, rollout: Rollout, temperature: float = 1.0, *, with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy logits at the response positions ``(B, R, V)`` (tempered) and values ``(B, R)``."""
        _, lm_head = decoder_and_head(self.tuned)
        with self.use("policy"):
            hidden = self._response_hidden(rollout)  # (B, R, H)
        logits = lm_head(hidden).float() / temperature  # (B, R, V)
        value_input = hidden if self.value_shares_trunk else hidden.detach()
        values = heads_of(self.tuned)[self.value_head](value_input).float() if with_values else None  # (B, R)
        return logits, values

    def reference_logits(self, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        """Reference logits at the response positions ``(B, R, V)``."""
        _, lm_head = decoder_and_head(self.tuned)
        with self.use("reference"):
            hidden = self._response_hidden(rollout)
        return lm_head(hidden).float() / temperature

    def reward_scores(self, rollout: Rollout) -> torch.Tensor:
        """Reward-model scores ``(B,)`` at each episode's last real token."""
        with self.use("reward"):
            hidden = lm_hidden_states(self.tuned, {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask})
        return heads_of(self.tuned)[self.reward](last_token_hidden(hidden, rollout.attention_mask)).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The policy adapter's and the value head's parameters (what PPO optimises)."""
        return [p for p in self.tuned.parameters() if p.requires_grad]

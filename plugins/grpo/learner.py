"""One GRPO iteration: sample G completions per prompt, score them, group-normalise, optimise.

Plain functions on a :class:`~peftkit_plugins.ppo.roles.Roles` object (the
``grpo`` objective's ``run`` drives it from the trainer; tests drive it
directly on tiny models)::

    rollout  = G samples y ~ pi(.|x) per prompt, packed [prompt | completion]  (policy, no grad)
    r        = reward(prompts, completions, records)  or a reward model's score
    A        = (r - mean_group) / (std_group + eps)                           (one per completion)
    old      = log pi_old(y_t)                     (only when the policy moves before the last update)
    ref      = log pi_ref(y_t)                     (kl_coef > 0: SFT adapter, or the bare base)
    repeat num_iterations: for each minibatch (shuffled):
        loss = clipped ratio loss + kl_coef * k3 KL; optimizer step

Sampling, packing, the role switching and the log-probabilities are PPO's
(:mod:`peftkit_plugins.ppo.rollout`, :mod:`~peftkit_plugins.ppo.roles`,
:func:`~peftkit_plugins.ppo.losses.token_logprobs`). As in PPO the model stays
in ``eval()`` (no dropout), so the first ratio of every rollout is exactly 1.

Several processes: each rank samples and scores its own prompts (a group never
spans ranks), and gradients are averaged over ranks before every optimizer
step (:func:`average_gradients`), so every rank keeps the same adapter.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from peftkit.errors import PeftkitError
from peftkit_plugins.grpo.losses import group_advantages, grpo_loss
from peftkit_plugins.grpo.options import GRPOOptions
from peftkit_plugins.ppo.advantages import masked_mean
from peftkit_plugins.ppo.distributed import average_gradients
from peftkit_plugins.ppo.losses import entropy_from_logits, token_logprobs
from peftkit_plugins.ppo.roles import Roles
from peftkit_plugins.ppo.rollout import Rollout, generate_responses, pack_episodes

__all__ = ["GRPOLearner", "RewardFunction", "average_gradients"]

#: ``(prompts, completions, records) -> list[float]``: a registered :class:`peftkit.registry.Reward`.
RewardFunction = Callable[[Sequence[str], Sequence[str], Sequence[Mapping[str, Any]]], list[float]]


class GRPOLearner:
    """GRPO on the roles of one tuned model.

    :param roles: policy, reference (``None``: the bare base) and, for a reward model, reward.
    :param options: validated :class:`GRPOOptions`.
    :param optimizer: over the policy adapter's parameters.
    :param reward_function: a registered reward; ``None`` scores with the reward model role.
    :param decode: token ids -> text (the tokenizer's, special tokens skipped).
    :param pad_id, stop_ids: padding token and the tokens that end a completion.
    :param max_grad_norm: clip the gradient norm (``None``: no clipping).
    :param device: where rollouts are built. :param autocast: a context factory for mixed precision.
    """

    def __init__(
        self,
        roles: Roles,
        options: GRPOOptions,
        optimizer: torch.optim.Optimizer,
        *,
        reward_function: RewardFunction | None,
        decode: Callable[[Sequence[int]], str],
        pad_id: int,
        stop_ids: Sequence[int],
        max_grad_norm: float | None = 1.0,
        device: Any = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ):
        self.roles, self.options, self.optimizer = roles, options, optimizer
        self.reward_function, self.decode = reward_function, decode
        self.pad_id, self.stop_ids = int(pad_id), [int(s) for s in stop_ids]
        self.max_grad_norm, self.device, self.autocast = max_grad_norm, device, autocast

    # ============================================================ rollout
    @torch.no_grad()
    def sample(self, prompts: Sequence[Sequence[int]], *, copies: int, greedy: bool = False) -> Rollout:
        """``copies`` completions of each prompt (consecutive rows), packed for the forward passes."""
        opts, roles = self.options, self.roles
        roles.tuned.eval()
        expanded = [list(p) for p in prompts for _ in range(copies)]
        with roles.use("policy"), self.autocast():
            responses = generate_responses(
                roles.tuned, expanded, pad_id=self.pad_id, stop_ids=self.stop_ids, max_new_tokens=opts.max_new_tokens,
                temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, device=self.device, do_sample=not greedy,
            )
        return pack_episodes(expanded, responses, self.pad_id, self.device)

    @torch.no_grad()
    def score(self, rollout: Rollout, prompts: Sequence[str], records: Sequence[Mapping[str, Any]], copies: int) -> torch.Tensor:
        """The reward of every completion of ``rollout``, ``(B * copies,)`` float32."""
        if self.reward_function is None:
            with self.autocast():
                return self.roles.reward_scores(rollout).float()
        completions = [self.decode(row[mask.bool()].tolist()) for row, mask in zip(rollout.response_tokens, rollout.response_mask)]
        prompts = [p for p in prompts for _ in range(copies)]
        records = [r for r in records for _ in range(copies)]
        name = getattr(self.reward_function, "name", repr(self.reward_function))
        values = self.reward_function(prompts, completions, records)
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise PeftkitError(
                f"reward {name!r} returned {type(values).__name__} of length {len(values) if hasattr(values, '__len__') else '?'} "
                f"for {len(completions)} completions; a reward returns one float per completion"
            )
        bad = next((i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)), None)
        if bad is not None:
            raise PeftkitError(f"reward {name!r} returned {values[bad]!r} for completion {bad} ({completions[bad]!r}); rewards must be finite floats")
        return torch.tensor([float(v) for v in values], dtype=torch.float32, device=rollout.input_ids.device)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]], texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> Rollout:
        """Sample G completions per prompt, score them and compute the group advantages (and old/reference log-probs)."""
        opts, roles = self.options, self.roles
        G = opts.num_generations
        rollout = self.sample(prompts, copies=G)
        rewards = self.score(rollout, texts, records, G)  # (B * G,)
        rollout.stats.update(rewards=rewards, advantages=group_advantages(rewards, G, scale_rewards=opts.scale_rewards, eps=opts.std_eps))
        # pi_old is needed only if the policy moves before the last minibatch; otherwise the update's own
        # forward is pi_old (same weights, eval mode), and one forward pass per rollout is saved.
        if opts.num_iterations > 1 or (opts.minibatch_size or len(rollout)) < len(rollout):
            with self.autocast():
                logits, _ = roles.policy_forward(rollout, opts.temperature, with_values=False)  # (B*G, R, V)
            rollout.stats["logprobs"] = token_logprobs(logits, rollout.response_tokens)
        if opts.kl_coef > 0:
            with self.autocast():
                ref_logits = roles.reference_logits(rollout, opts.temperature)
            rollout.stats["ref_logprobs"] = token_logprobs(ref_logits, rollout.response_tokens)
        return rollout

    # ============================================================ update
    def _minibatches(self, size: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(size)  # the global generator: checkpointed with the run's RNG state
        step = self.options.minibatch_size or size
        for start in range(0, size, step):
            yield order[start : start + step]

    def update(self, rollout: Rollout) -> dict[str, float]:
        """``num_iterations`` passes over ``rollout`` in minibatches; returns averaged diagnostics."""
        opts, roles = self.options, self.roles
        params = roles.trainable_parameters()
        sums: dict[str, float] = {}
        n_updates = 0
        for iteration in range(opts.num_iterations):
            for rows in self._minibatches(len(rollout)):
                mb = rollout.select(rows.to(rollout.input_ids.device))
                with self.autocast():
                    logits, _ = roles.policy_forward(mb, opts.temperature, with_values=False)
                logprobs = token_logprobs(logits, mb.response_tokens)
                old = mb.stats["logprobs"] if "logprobs" in mb.stats else logprobs.detach()
                out = grpo_loss(
                    logprobs, old, mb.stats["advantages"], mb.response_mask, clip_range=opts.clip_range,
                    ref_logprobs=mb.stats.get("ref_logprobs"), kl_coef=opts.kl_coef, loss_type=opts.loss_type,
                )
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"the GRPO loss became {float(out.loss)}; lower train.lr or kl_coef")
                out.loss.backward()
                average_gradients(params)
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                metrics = {"loss": out.loss, "policy_loss": out.policy_loss, "kl": out.kl, "clip_fraction": out.clip_fraction}
                if iteration == 0:
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach()), mb.response_mask)
                    sums["entropy"] = sums.get("entropy", 0.0) + float(entropy) * len(rows) / len(rollout)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_updates += 1
        entropy = sums.pop("entropy", 0.0)  # already a mean over the first pass's minibatches
        return {**{k: v / max(n_updates, 1) for k, v in sums.items()}, "entropy": entropy}

    # ============================================================ a step
    def step(self, prompts: Sequence[Sequence[int]], texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Rollout + update; returns the step's logged metrics."""
        rollout = self.rollout(prompts, texts, records)
        metrics = self.update(rollout)
        rewards = rollout.stats["rewards"].view(-1, self.options.num_generations)  # (B, G)
        mask = rollout.response_mask
        metrics.update(
            reward=float(rewards.mean()),
            reward_std=float(rewards.std(dim=1).mean()),
            zero_std_fraction=float((rewards.std(dim=1) == 0).float().mean()),
            completion_length=float(mask.sum(-1).float().mean()),
            ended_with_eos=float(rollout.ended.float().mean()),
        )
        return metrics

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[Sequence[int]], texts: Sequence[str], records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """Rewards of the greedy completion of each prompt ``(B,)`` (no update)."""
        rollout = self.sample(prompts, copies=1, greedy=True)
        return self.score(rollout, texts, records, 1)

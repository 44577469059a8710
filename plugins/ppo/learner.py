"""One PPO iteration: sample a rollout, score it, compute advantages, optimise for several epochs.

This is the whole algorithm as plain functions on a :class:`~.roles.Roles`
object, with no trainer in it (the ``ppo`` objective's ``run`` drives it from
the peftkit trainer; tests drive it directly on tiny models)::

    rollout  = sample y ~ pi(.|x) for a batch of prompts          (policy, no grad)
    old      = log pi_old(y_t), V_old(s_t)                        (policy + value head, no grad)
    ref      = log pi_SFT(y_t)                                    (reference, no grad)
    score    = r(x, y) at the last token, minus a penalty if y has no stop token
    r_t      = -beta (log pi_old - log pi_SFT) (+ score at the last token)
    A, R     = GAE(r, V_old); A whitened
    repeat ppo_epochs: for each minibatch (shuffled):
        loss = L_policy(clip) + vf_coef * L_value(clip) [+ ptx_coef * NLL_pretrain]
        optimizer step

The module keeps dropout off (``eval()`` throughout), so the first ratio of
every rollout is exactly 1 and the clipping sees only the policy's change.

Several processes (``torchrun``/``accelerate launch``): each rank rolls out its
own prompts; the advantages are whitened with the statistics of all ranks'
tokens, the gradients of the policy adapter and the value head are averaged
over ranks before every optimizer step (so every rank keeps the same ones),
the KL controller sees the mean KL of all ranks' episodes and :meth:`step`
returns metrics averaged over ranks (:mod:`.distributed`). Every rank must
hold the same number of prompts (so the same number of minibatch updates).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from peftkit.training.losses import chunked_cross_entropy, decoder_and_head, lm_hidden_states
from peftkit_plugins.ppo.advantages import gae, masked_mean
from peftkit_plugins.ppo.distributed import average_gradients, mean_over_ranks, sum_over_ranks, whiten_over_ranks
from peftkit_plugins.ppo.kl_control import KLController
from peftkit_plugins.ppo.losses import entropy_from_logits, policy_loss, token_logprobs, token_rewards, value_loss
from peftkit_plugins.ppo.options import PPOOptions
from peftkit_plugins.ppo.roles import Roles
from peftkit_plugins.ppo.rollout import Rollout, generate_responses, pack_episodes

__all__ = ["PPOLearner", "ptx_loss"]


def ptx_loss(roles: Roles, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of pretraining text under the policy: ``-E_pretrain[log pi_RL(x)]`` per token."""
    _, lm_head = decoder_and_head(roles.tuned)
    with roles.use("policy"):
        hidden = lm_hidden_states(roles.tuned, batch)  # (B, T, H)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    total, count = chunked_cross_entropy(hidden, lm_head, labels)
    return total / max(count, 1)


class PPOLearner:
    """PPO on the roles of one tuned model.

    :param roles: the four roles (see :mod:`.roles`).
    :param options: validated :class:`PPOOptions`.
    :param optimizers: optimizers over :meth:`Roles.trainable_parameters` (all are stepped together).
    :param pad_id, stop_ids: padding token and the tokens that end a response.
    :param max_grad_norm: clip the joint gradient norm (``None``: no clipping).
    :param device: where rollouts are built. :param autocast: a context factory for mixed precision.
    """

    def __init__(
        self,
        roles: Roles,
        options: PPOOptions,
        optimizers: Sequence[torch.optim.Optimizer],
        *,
        pad_id: int,
        stop_ids: Sequence[int],
        max_grad_norm: float | None = 1.0,
        device: Any = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
    ):
        self.roles, self.options, self.optimizers = roles, options, list(optimizers)
        self.pad_id, self.stop_ids = int(pad_id), [int(s) for s in stop_ids]
        self.max_grad_norm, self.device, self.autocast = max_grad_norm, device, autocast
        self.kl = KLController(options.kl_coef, options.target_kl, options.kl_horizon)

    # ============================================================ rollout
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]], *, advantages: bool = True) -> Rollout:
        """Sample, score and compute advantages for one batch of prompt token ids.

        :param advantages: ``False`` skips GAE and the whitening (and its all-reduce): a held-out
            rollout, which each rank runs on its own share of prompts.
        """
        opts, roles = self.options, self.roles
        roles.tuned.eval()
        with roles.use("policy"), self.autocast():
            responses = generate_responses(
                roles.tuned, prompts, pad_id=self.pad_id, stop_ids=self.stop_ids, max_new_tokens=opts.max_new_tokens,
                temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, device=self.device,
            )
        rollout = pack_episodes(prompts, responses, self.pad_id, self.device)
        mask = rollout.response_mask
        with self.autocast():
            logits, values = roles.policy_forward(rollout, opts.temperature)
            ref_logits = roles.reference_logits(rollout, opts.temperature)
            scores = roles.reward_scores(rollout)  # (B,)
        logprobs = token_logprobs(logits, rollout.response_tokens)  # (B, R)
        ref_logprobs = token_logprobs(ref_logits, rollout.response_tokens)
        penalised = scores - opts.missing_eos_penalty * (~rollout.ended).float()
        rewards, kl = token_rewards(penalised, logprobs, ref_logprobs, mask, self.kl.value)
        if advantages:
            gains, returns = gae(rewards, values * mask, mask, gamma=opts.gamma, lam=opts.lam)
            if opts.whiten_advantages:
                gains = whiten_over_ranks(gains, mask)  # over all ranks' tokens; whiten() in one process
            rollout.stats.update(advantages=gains, returns=returns)
        rollout.stats.update(
            logprobs=logprobs, values=values * mask, kl=kl,
            scores=scores, penalised_scores=penalised, entropy=entropy_from_logits(logits) * mask,
        )
        return rollout

    # ============================================================ update
    def _minibatches(self, size: int) -> Iterator[torch.Tensor]:
        order = torch.randperm(size)  # the global generator: checkpointed with the run's RNG state
        for start in range(0, size, self.options.minibatch_size):
            yield order[start : start + self.options.minibatch_size]

    def update(self, rollout: Rollout, ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped PPO over ``rollout`` in minibatches; returns averaged diagnostics."""
        opts, roles = self.options, self.roles
        params = roles.trainable_parameters()
        sums: dict[str, float] = {}
        n_updates = 0
        for _ in range(opts.ppo_epochs):
            for rows in self._minibatches(len(rollout)):
                mb = rollout.select(rows.to(rollout.input_ids.device))
                mask = mb.response_mask
                with self.autocast():
                    logits, values = roles.policy_forward(mb, opts.temperature)
                logprobs = token_logprobs(logits, mb.response_tokens)
                pg = policy_loss(logprobs, mb.stats["logprobs"], mb.stats["advantages"], mask, opts.clip_range)
                vf = value_loss(values, mb.stats["values"], mb.stats["returns"], mask, opts.clip_range_value)
                loss = pg.loss + opts.vf_coef * vf.loss
                metrics = {"policy_loss": pg.loss, "value_loss": vf.loss, "clip_fraction": pg.clip_fraction,
                           "approx_kl": pg.approx_kl, "value_clip_fraction": vf.clip_fraction}
                if opts.ptx_coef > 0 and ptx_batches is not None:
                    with self.autocast():
                        lm = ptx_loss(roles, next(ptx_batches))
                    loss = loss + opts.ptx_coef * lm
                    metrics["ptx_loss"] = lm
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the PPO loss became {float(loss)}; lower train.lr or the options' coefficients")
                loss.backward()
                average_gradients(params)  # every rank: the same adapter and value head
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                for optimizer in self.optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_updates += 1
        return {k: v / max(n_updates, 1) for k, v in sums.items()}

    # ============================================================ a step
    def step(self, prompts: Sequence[Sequence[int]], ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """Rollout + update + KL-coefficient update; returns the step's logged metrics (means over ranks)."""
        rollout = self.rollout(prompts)
        mask = rollout.response_mask
        kl_per_episode = rollout.stats["kl"].sum(-1)  # (B,) the sequence-level KL estimate
        beta = self.kl.value
        metrics = self.update(rollout, ptx_batches)
        kl_sum, episodes = sum_over_ranks([float(kl_per_episode.sum()), len(rollout)], self.device)
        self.kl.update(kl_sum / episodes, int(episodes))  # the KL of all ranks' episodes
        metrics.update(
            reward=float(rollout.stats["scores"].mean()),
            reward_with_penalty=float(rollout.stats["penalised_scores"].mean()),
            kl=float(kl_per_episode.mean()),
            kl_coef=beta,
            entropy=float(masked_mean(rollout.stats["entropy"], mask)),
            response_length=float(mask.sum(-1).float().mean()),
            ended_with_eos=float(rollout.ended.float().mean()),
        )
        return mean_over_ranks(metrics, self.device)

"""Options of the ``grpo`` objective (group-relative policy optimisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftkit.errors import PeftkitError
from peftkit_plugins.ppo.options import MAX_BATCH, MAX_PPO_EPOCHS, MAX_TEMPERATURE, MAX_TOKENS, MAX_WEIGHT, MIN_TEMPERATURE

__all__ = ["GRPOOptions", "resolve_reward", "MAX_GENERATIONS"]

#: Most completions per prompt: DeepSeekMath uses 64; past a few thousand a rollout of one prompt fills any accelerator.
MAX_GENERATIONS = 4096


def _looks_like_directory(spec: str) -> bool:
    return "/" in spec or "\\" in spec or Path(spec).is_dir()


def resolve_reward(spec: str, plugin_manager: Any) -> tuple[Any, str | None]:
    """``(reward function, None)`` for a registered reward name, ``(None, directory)`` for a reward model directory.

    :raises PeftkitError: naming ``objective.options.reward``, the value and every registered reward.
    """
    if _looks_like_directory(spec):
        return None, spec
    rewards = plugin_manager.rewards()
    if spec in rewards:
        return rewards[spec].obj, None
    from peftkit.options import did_you_mean

    reason = plugin_manager.unavailable_reason("reward", spec)
    registered = ", ".join(sorted(rewards)) or "(none installed)"
    raise PeftkitError(
        f"objective.options.reward = {spec!r} names no registered reward{did_you_mean(spec, rewards)}"
        + (f" ({reason})" if reason else "")
        + f"; registered rewards: {registered} (see `peftkit methods`), or give a reward model directory "
        "(what an `objective.name: reward` run wrote, e.g. runs/rm-lora/adapter)"
    )


@dataclass
class GRPOOptions:
    """``objective.options`` for ``objective.name: grpo``.

    Reward and roles (all on one frozen base model):
        reward: a registered reward function (``peftkit methods`` lists them, e.g.
            ``arithmetic_exact_match``) or a reward model directory (an ``objective.name: reward``
            run's adapter + head, as PPO's ``reward_model``; a value with a ``/`` is a directory). Required.
        sft_adapter: the SFT adapter. When given, the policy starts as a trainable copy of it and the
            KL reference is a frozen copy; ``method.name`` must then be its method. When null, the
            policy is a fresh adapter of ``method`` and the reference is the bare base (``disable_adapters()``).

    Sampling:
        num_generations: G, completions sampled per prompt (a group; >= 2, or every advantage is 0).
        max_new_tokens: completion length limit (<= MAX_TOKENS).
        temperature, top_p: sampling; the log-probabilities are those of the same tempered distribution.
        top_k: sample among the k likeliest tokens only; 0 is off.
        stop_tokens: extra single tokens that end a completion (the tokenizer's EOS always does).

    Advantages and loss:
        scale_rewards: divide ``r - mean_group`` by ``std_group + std_eps`` (the paper's GRPO);
            false keeps ``r - mean_group`` (Dr. GRPO: no bias toward groups with a small spread).
        std_eps: the epsilon added to the group standard deviation.
        num_iterations: optimisation passes over each rollout (mu in the paper; 1: on-policy, the
            ratio is 1 and the clipping never acts). minibatch_size: completions per optimizer step
            (null: the whole rollout in one step).
        clip_range: epsilon of the clipped ratio. kl_coef: beta of the KL term to the reference
            (k3 estimator, per token; 0: no reference forward at all).
        loss_type: ``token``: the per-token loss averaged over every completion token of the
            minibatch (DAPO; long completions weigh more); ``sequence``: averaged per completion,
            then over completions (the GRPO paper).
        chat_template: render prompts with the tokenizer's chat template (as sft, reward and ppo do).
    """

    reward: str = ""
    sft_adapter: str | None = None
    num_generations: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: list[str] = field(default_factory=list)
    scale_rewards: bool = True
    std_eps: float = 1e-4
    num_iterations: int = 1
    minibatch_size: int | None = None
    clip_range: float = 0.2
    kl_coef: float = 0.04
    loss_type: Literal["token", "sequence"] = "token"
    chat_template: bool = True

    @property
    def reward_model(self) -> str | None:
        """The reward model directory when ``reward`` names one (what :func:`~peftkit_plugins.ppo.setup_roles` loads)."""
        return self.reward if self.reward and _looks_like_directory(self.reward) else None

    def validate(self) -> list[str]:
        problems = []
        if not self.reward:
            problems.append(
                "option 'reward' is required: a registered reward function (see `peftkit methods`, e.g. "
                "arithmetic_exact_match) or a reward model directory"
            )
        else:
            from peftkit.plugins import plugin_manager

            try:
                resolve_reward(self.reward, plugin_manager())
            except PeftkitError as exc:
                problems.append(str(exc))
        if self.num_generations < 2:
            problems.append(f"option 'num_generations' = {self.num_generations!r} must be >= 2 (with one completion per prompt every advantage is 0)")
        for key in ("max_new_tokens", "num_iterations"):
            if getattr(self, key) < 1:
                problems.append(f"option {key!r} = {getattr(self, key)!r} must be >= 1")
        if self.minibatch_size is not None and self.minibatch_size < 1:
            problems.append(f"option 'minibatch_size' = {self.minibatch_size!r} must be >= 1, or null (the whole rollout)")
        for key, limit in (("max_new_tokens", MAX_TOKENS), ("num_generations", MAX_GENERATIONS),
                           ("minibatch_size", MAX_BATCH), ("num_iterations", MAX_PPO_EPOCHS)):
            if (getattr(self, key) or 0) > limit:
                problems.append(f"option {key!r} = {getattr(self, key)!r} is too large: must be <= {limit}")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            problems.append(
                f"option 'temperature' = {self.temperature!r} must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] "
                "(outside it sampling is argmax or noise, and log-probabilities overflow)"
            )
        if not 0 < self.top_p <= 1:
            problems.append(f"option 'top_p' = {self.top_p!r} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"option 'top_k' = {self.top_k!r} must be >= 0")
        if self.clip_range <= 0:
            problems.append(f"option 'clip_range' = {self.clip_range!r} must be > 0")
        if not 0 <= self.kl_coef <= MAX_WEIGHT:
            problems.append(f"option 'kl_coef' = {self.kl_coef!r} must be in [0, {MAX_WEIGHT:g}]")
        if not 0 < self.std_eps <= 1:
            problems.append(f"option 'std_eps' = {self.std_eps!r} must be in (0, 1]")
        return problems

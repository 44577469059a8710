"""Options of the ``ppo`` objective (InstructGPT's PPO and PPO-ptx)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PPOOptions"]

#: Largest loss weights (kl_coef, ptx_coef, vf_coef) and score penalty: a term 1000x the others is the
#: only term (set the others to 0 instead), and larger ones overflow float32 gradients.
MAX_WEIGHT = 1000.0
#: Most tokens per response or pretraining example, and examples per minibatch: past any context window
#: and any accelerator's memory.
MAX_TOKENS = 2**20
MAX_BATCH = 2**20
#: Most optimisation passes over one rollout (the paper's PPO uses 4; more only overfits the rollout).
MAX_PPO_EPOCHS = 1000
#: Sampling temperature range: below 0.01 sampling is argmax, above 100 it is uniform noise, and the
#: log-probabilities of logits / temperature overflow at the extremes.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


@dataclass
class PPOOptions:
    """``objective.options`` for ``objective.name: ppo``.

    Roles (all on one frozen base model):
        reward_model: directory of a reward model (``objective.name: reward`` output: adapter + head). Required.
        sft_adapter: the SFT adapter. When given, the policy starts as a trainable copy of it and the
            reference is a frozen copy (never the bare base); ``method.name`` must then be its method.
            When null, the policy is a fresh adapter of ``method`` and the reference is the bare base.

    Sampling:
        max_new_tokens: response length limit (<= MAX_TOKENS). temperature (MIN_TEMPERATURE..MAX_TEMPERATURE),
            top_k (0: off), top_p: sampling
            (the log-probabilities PPO uses are those of the same tempered distribution).
        stop_tokens: extra single tokens that end a response (the tokenizer's EOS always does).
        missing_eos_penalty: subtracted from the score of a response that hit max_new_tokens
            without a stop token.

    PPO:
        kl_coef: beta of the per-token KL penalty against the reference. target_kl: when set, beta
            adapts to keep the KL near it (Ziegler et al.), over kl_horizon episodes.
        gamma, lam: GAE discount and lambda. whiten_advantages: normalise advantages per rollout.
        ppo_epochs: optimisation passes over each rollout; minibatch_size: episodes per optimizer step.
        clip_range: policy ratio clip eps; clip_range_value: value clip; vf_coef: value-loss weight.
        value_shares_trunk: let the value loss train the policy adapter too (default: head only).
        chat_template: render prompts with the tokenizer's chat template (as sft and reward do).

    PPO-ptx:
        ptx_coef: gamma of ``gamma * E_pretrain[log pi_RL(x)]`` (0: plain PPO). ptx_data: a plain-text
            file (.txt, or .jsonl/.json with a ``text`` field). ptx_batch_size, ptx_max_length: per step.
    """

    reward_model: str = ""
    sft_adapter: str | None = None
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: list[str] = field(default_factory=list)
    missing_eos_penalty: float = 1.0
    kl_coef: float = 0.05
    target_kl: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ppo_epochs: int = 4
    minibatch_size: int = 4
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    value_shares_trunk: bool = False
    chat_template: bool = True
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_batch_size: int = 4
    ptx_max_length: int = 128

    def validate(self) -> list[str]:
        problems = []
        if not self.reward_model:
            problems.append("option 'reward_model' is required: the directory a `objective.name: reward` run wrote (its adapter/)")
        for key in ("max_new_tokens", "ppo_epochs", "minibatch_size", "ptx_batch_size", "kl_horizon", "ptx_max_length"):
            if getattr(self, key) < 1:
                problems.append(f"option {key!r} = {getattr(self, key)!r} must be >= 1")
        if self.temperature <= 0:
            problems.append(f"option 'temperature' = {self.temperature!r} must be > 0")
        elif not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            problems.append(
                f"option 'temperature' = {self.temperature!r} must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] "
                "(outside it sampling is argmax or noise, and log-probabilities overflow)"
            )
        for key, limit in (("max_new_tokens", MAX_TOKENS), ("ptx_max_length", MAX_TOKENS), ("minibatch_size", MAX_BATCH),
                           ("ptx_batch_size", MAX_BATCH), ("ppo_epochs", MAX_PPO_EPOCHS)):
            if getattr(self, key) > limit:
                problems.append(f"option {key!r} = {getattr(self, key)!r} is too large: must be <= {limit}")
        for key in ("kl_coef", "ptx_coef", "vf_coef", "missing_eos_penalty"):
            if getattr(self, key) > MAX_WEIGHT:
                problems.append(f"option {key!r} = {getattr(self, key)!r} is too large: must be <= {MAX_WEIGHT:g} (it would drown every other term)")
        if not 0 < self.top_p <= 1:
            problems.append(f"option 'top_p' = {self.top_p!r} must be in (0, 1]")
        for key in ("kl_coef", "ptx_coef", "vf_coef", "missing_eos_penalty", "top_k"):
            if getattr(self, key) < 0:
                problems.append(f"option {key!r} = {getattr(self, key)!r} must be >= 0")
        for key in ("clip_range", "clip_range_value"):
            if getattr(self, key) <= 0:
                problems.append(f"option {key!r} = {getattr(self, key)!r} must be > 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"options 'gamma' = {self.gamma!r} and 'lam' = {self.lam!r} must be in [0, 1]")
        if self.target_kl is not None and self.target_kl <= 0:
            problems.append(f"option 'target_kl' = {self.target_kl!r} must be > 0 or null (fixed kl_coef)")
        if self.ptx_coef > 0 and not self.ptx_data:
            problems.append("option 'ptx_coef' > 0 needs 'ptx_data': a plain-text .txt/.jsonl file for the pretraining term")
        return problems

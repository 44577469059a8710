"""The ``grpo`` objective: group-relative policy optimisation against a reward function or model, driven by the peftkit trainer.

``run(trainer, options)`` replaces the trainer's loop, as ``ppo``'s does: it
puts the roles on the trainer's tuned model (PPO's :func:`~peftkit_plugins.ppo.setup_roles`
without a value head), then repeats ``train.max_steps`` times: take
``train.batch_size`` prompts, :meth:`~.learner.GRPOLearner.step` (G samples per
prompt, rewards, group advantages, ``num_iterations`` x minibatch updates), log,
checkpoint.

What the recipe's sections mean here: ``train.batch_size`` = prompts per
rollout per process (each brings ``num_generations`` completions);
``train.max_steps`` (or epochs over the prompts) = rollouts; ``train.lr``/
``scheduler``/``warmup_steps`` drive the policy adapter (the schedule advances
once per rollout); ``train.max_grad_norm`` clips each update;
``data.train``/``data.eval`` are prompt files whose records also reach the
reward (``{"prompt": ..., "answer": ...}``). Several processes (``accelerate
launch``/``torchrun``): each rank samples its own prompts, so a group never
spans ranks, and gradients are averaged before every optimizer step.

Outputs in ``output.dir``: ``adapter/`` (the policy, a plain adapter of its
method), ``metrics.jsonl`` (per step: reward mean and within-group std, share
of groups with zero reward variance, KL, clip fraction, completion length,
entropy, loss; at the end ``eval_reward``: the mean reward of the greedy reply
to each held-out prompt). ``--resume`` restores the policy, its optimizer and
schedule, the RNG and the prompt position (GRPO has no state of its own
beyond the trainer's: no value head, no adaptive KL).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.registry import ObjectiveLoss
from peftkit_plugins.grpo.learner import GRPOLearner
from peftkit_plugins.grpo.options import GRPOOptions, resolve_reward
from peftkit_plugins.ppo import data as ppo_data
from peftkit_plugins.ppo.distributed import mean_over_ranks
from peftkit_plugins.ppo.objective import POLICY, check_train_settings, setup_roles, stop_token_ids

__all__ = ["GRPOObjective", "prepare_prompts_with_records"]


def prepare_prompts_with_records(records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
    """PPO's prompt examples, each also holding its record (what the reward reads: ``answer``, ...)."""
    examples = ppo_data.prepare_prompts(records, tokenizer, options, max_length)
    for example, record in zip(examples, records):
        example["record"] = dict(record)
    return examples


class GRPOObjective:
    """GRPO (DeepSeekMath): G samples per prompt, group-normalised rewards, clipped ratio loss, optional KL."""

    name = "grpo"
    description = "RL from a reward function (peftkit methods lists them) or model: GRPO, G samples per prompt, no value head"
    options = GRPOOptions

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
        return prepare_prompts_with_records(records, tokenizer, options, max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return ppo_data.collate_prompts(examples, tokenizer)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: Any) -> ObjectiveLoss:
        raise PeftkitError("objective 'grpo' has no per-batch loss: it trains through run() (rollouts of G samples per prompt)")

    # ------------------------------------------------------------------ run
    def run(self, trainer: Any, options: GRPOOptions) -> Any:
        from tqdm.auto import tqdm
        from peftkit.training.checkpoint import CHECKPOINT_DIR, STATE_FILE, read_state_file, restoring, set_rng_state
        from peftkit.training.trainer import TrainResult, make_scheduler

        check_train_settings(trainer.recipe.train, "grpo")
        reward_function, _ = resolve_reward(options.reward, trainer.pm)
        tuned, tokenizer, cfg, out = trainer.tuned, trainer.tokenizer, trainer.recipe.train, trainer.recipe.output
        accelerator = trainer.accelerator
        device = accelerator.device
        checkpoint = trainer.output_dir / CHECKPOINT_DIR

        # ---- roles; a fresh policy copied from the SFT adapter needs a fresh optimizer over its parameters
        roles = setup_roles(tuned, options, replace_policy_with_sft=not trainer.resume, seed=cfg.seed, value_head=False)
        tuned.to(device)
        if options.sft_adapter and not trainer.resume:
            trainer.optimizer = accelerator.prepare(torch.optim.AdamW(roles.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay))
            trainer.scheduler = make_scheduler(trainer.optimizer, cfg.scheduler, cfg.warmup_steps, trainer.total_steps)
        learner = GRPOLearner(
            roles, options, trainer.optimizer, reward_function=reward_function,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            pad_id=int(tokenizer.pad_token_id), stop_ids=stop_token_ids(tokenizer, options.stop_tokens),
            max_grad_norm=cfg.max_grad_norm, device=device, autocast=accelerator.autocast,
        )
        if trainer.resume:
            # Loading the reference/reward adapters above drew from the RNG; start from the checkpoint's state.
            with restoring(checkpoint / STATE_FILE):
                set_rng_state(read_state_file(checkpoint / STATE_FILE)["rng"])

        # ---- the loop: one step = one rollout (G samples per prompt) + its updates
        order = iter(trainer.order)
        bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not (trainer.progress and accelerator.is_main_process), unit="rollout")
        start = time.perf_counter()
        last: dict[str, float] = {}
        while trainer.step < trainer.total_steps:
            examples = [trainer.train_examples[i] for i in next(order)]
            last = learner.step([e["prompt_ids"] for e in examples], [e["prompt"] for e in examples], [e["record"] for e in examples])
            last = mean_over_ranks(last, device)
            trainer.scheduler.step()
            trainer.step += 1
            trainer.check_adapter_finite()  # a diverged policy must not sample the next rollout or reach a save
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.3f}")
            if trainer.step % out.log_every == 0 or trainer.step == trainer.total_steps:
                trainer.log({"step": trainer.step, **last, "lr": trainer.scheduler.get_last_lr()[0]})
            if out.save_every and trainer.step % out.save_every == 0 and trainer.step < trainer.total_steps:
                trainer.save_checkpoint()  # policy adapter (training form), optimizer/schedule, RNG, step, prompt position
        bar.close()
        seconds = time.perf_counter() - start

        # ---- the end: held-out greedy reward, checkpoint, the policy adapter
        held_out = self.evaluate(learner, trainer.eval_examples, cfg.eval_batch_size or cfg.batch_size)
        if held_out:
            trainer.log({"step": trainer.step, **held_out})
        trainer.save_checkpoint()
        adapter_dir = trainer.save_final_adapter(POLICY)
        return TrainResult(
            output_dir=trainer.output_dir, adapter_dir=adapter_dir, steps=trainer.step, eval_loss_before=None,
            eval_loss_after=None, train_loss=last.get("loss"), seconds=seconds, tokens_per_second=0.0,
        )

    @staticmethod
    def evaluate(learner: GRPOLearner, examples: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, float]:
        """Mean reward of the greedy completion of each held-out prompt (no update)."""
        if not examples:
            return {}
        total = 0.0
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            total += float(learner.evaluate([e["prompt_ids"] for e in chunk], [e["prompt"] for e in chunk], [e["record"] for e in chunk]).sum())
        return {"eval_reward": total / len(examples)}

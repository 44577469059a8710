"""The ``ppo`` objective: InstructGPT's RLHF step (PPO, and PPO-ptx with ``ptx_coef``), driven by the peftkit trainer.

``run(trainer, options)`` replaces the trainer's loop. It puts the four roles
on the trainer's tuned model (:mod:`.roles`), then repeats ``train.max_steps``
times: take ``train.batch_size`` prompts, :meth:`~.learner.PPOLearner.step`
(rollout, advantages, ``ppo_epochs`` x minibatch updates), log, checkpoint.

What the recipe's sections mean here: ``train.batch_size`` = prompts per
rollout; ``train.max_steps`` (or epochs over the prompts) = rollouts;
``train.lr``/``scheduler``/``warmup_steps`` drive the policy adapter and the
value head (the schedule advances once per rollout); ``train.max_grad_norm``
clips each minibatch update; ``data.train``/``data.eval`` are prompt files.

Several processes (``torchrun --nproc_per_node N`` / ``accelerate launch``):
``train.batch_size`` is prompts per rollout *per process*, as for every
objective, so one step rolls out ``N x batch_size`` distinct prompts (each
rank its own share of each epoch's shuffle); one process with ``batch_size``
``N x`` as large sees the same prompts per step. Advantages are whitened over
all ranks, gradients of the policy and the value head averaged before every
optimizer step (every rank keeps the same adapter), the adaptive KL controller
sees the mean KL of all ranks, the logged metrics are means over ranks
(written once, by the main process), the PPO-ptx rows are dealt out over the
ranks like the prompts, and the held-out prompts are split over the ranks.
The four roles stay on one base model per rank.

Outputs in ``output.dir``: ``adapter/`` (the policy, a plain adapter of its
method, loadable like any SFT adapter), ``value_head.safetensors`` in the
checkpoint, ``metrics.jsonl`` (per step: reward, KL, entropy, policy/value
loss, clip fraction, approx-KL, response length, ...). ``--resume`` restores
policy, value head, both optimizers and schedules, RNG, rollout position, KL
coefficient and the pretraining-text position; with several processes every
rank's RNG, prompt and pretraining-text positions come from its own
``ppo_state_rank{N}.pt`` (a resume needs the same number of processes).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.registry import ObjectiveLoss
from peftkit_plugins.ppo import data as ppo_data
from peftkit_plugins.ppo.distributed import sum_over_ranks
from peftkit_plugins.ppo.learner import PPOLearner
from peftkit_plugins.ppo.options import PPOOptions
from peftkit_plugins.ppo.roles import Roles, attach_value_head
from peftkit_plugins.reward.formatting import end_token_id
from peftkit_plugins.reward.head import heads_of
from peftkit_plugins.reward.saving import load_reward_model

__all__ = ["PPOObjective", "check_train_settings", "setup_roles", "stop_token_ids", "PPO_STATE_FILE", "rank_state_file"]

PPO_STATE_FILE = "ppo_state.pt"


def rank_state_file(rank: int) -> str:
    """The checkpoint file of one process's own state (RNG, prompt and pretraining-text positions) in a multi-process run."""
    return f"ppo_state_rank{rank}.pt"
POLICY, REFERENCE, REWARD = "default", "reference", "reward"


def stop_token_ids(tokenizer: Any, stop_tokens: Sequence[str]) -> list[int]:
    """The EOS id plus the ids of ``stop_tokens`` (each must be one token of the vocabulary)."""
    ids = [end_token_id(tokenizer)]
    for token in stop_tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
            raise PeftkitError(f"objective option stop_tokens: {token!r} is not a single token of this tokenizer; give vocabulary tokens")
        ids.append(int(token_id))
    return sorted(set(ids))


def _adapter_method(path: str) -> str:
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        raise PeftkitError(f"objective option sft_adapter = {path!r} is not an adapter directory (no adapter_config.json)")
    return json.loads(config.read_text())["method"]


def setup_roles(
    tuned: Any, options: Any, *, policy: str = POLICY, replace_policy_with_sft: bool = True, seed: int = 0, value_head: bool = True
) -> Roles:
    """Load reference and reward adapters next to the policy on ``tuned``, and add the value head.

    :param options: any options with ``sft_adapter`` and ``reward_model`` (``None``/empty: no reward
        model role, e.g. GRPO with a reward function) and optionally ``value_shares_trunk``.
    :param replace_policy_with_sft: start the policy as a trainable copy of ``options.sft_adapter``
        (the policy adapter ``policy`` is replaced); ``False`` keeps the policy as it is (resuming).
    :param value_head: attach the value head (PPO); GRPO has no value function.
    :raises PeftkitError: if the SFT adapter's method is not the policy's method.
    """
    reference = None
    if options.sft_adapter:
        sft_method = _adapter_method(options.sft_adapter)
        current = tuned.adapters.get(policy)
        if current is not None and current != sft_method:
            raise PeftkitError(
                f"the policy starts as a copy of sft_adapter {options.sft_adapter!r}, a {sft_method!r} adapter, but "
                f"method.name is {current!r}; set method.name: {sft_method} (its options come from the SFT adapter)"
            )
        if replace_policy_with_sft:
            if current is not None:
                tuned.delete_adapter(policy)
            tuned.load_adapter(options.sft_adapter, policy, is_trainable=True)
        tuned.load_adapter(options.sft_adapter, REFERENCE, is_trainable=False)
        reference = REFERENCE
    if options.reward_model:
        load_reward_model(tuned, options.reward_model, REWARD)
    tuned.set_adapter(policy)
    if value_head:
        attach_value_head(tuned, seed=seed)
    return Roles(
        tuned, policy=policy, reward=REWARD if options.reward_model else None, reference=reference,
        value_shares_trunk=getattr(options, "value_shares_trunk", False),
    )


def check_train_settings(cfg: Any, objective: str) -> None:
    """Refuse loop settings a rollout objective (``ppo``, ``grpo``) would otherwise ignore silently."""
    problems = []
    if cfg.gradient_accumulation_steps != 1:
        problems.append(
            f"train.gradient_accumulation_steps = {cfg.gradient_accumulation_steps}: {objective} updates once per minibatch "
            "of the rollout; set it to 1 and size updates with objective.options.minibatch_size"
        )
    if cfg.gradient_checkpointing:
        problems.append(
            f"train.gradient_checkpointing = true: {objective} runs the policy in eval mode (no dropout, so update-time "
            "log-probs match the rollout's), where transformers does not checkpoint; set it to false"
        )
    if problems:
        raise PeftkitError(f"objective {objective!r} cannot use these train settings:\n" + "\n".join(f"  - {p}" for p in problems))


class PPOObjective:
    """PPO with a per-token KL penalty against the SFT policy, and optional PPO-ptx."""

    name = "ppo"
    description = "RLHF: PPO against a reward model with a KL penalty to the SFT policy; ptx_coef > 0 gives PPO-ptx"
    options = PPOOptions

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
        return ppo_data.prepare_prompts(records, tokenizer, options, max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return ppo_data.collate_prompts(examples, tokenizer)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: Any) -> ObjectiveLoss:
        raise PeftkitError("objective 'ppo' has no per-batch loss: it trains through run() (rollouts, then PPO epochs)")

    # ------------------------------------------------------------------ run
    def run(self, trainer: Any, options: PPOOptions) -> Any:
        from tqdm.auto import tqdm
        from peftkit.training.checkpoint import CHECKPOINT_DIR, STATE_FILE, read_state_file, restoring, rng_state, set_rng_state
        from peftkit.training.trainer import TrainResult, make_scheduler

        self._check_train_settings(trainer.recipe.train)
        tuned, tokenizer, cfg, out = trainer.tuned, trainer.tokenizer, trainer.recipe.train, trainer.recipe.output
        accelerator = trainer.accelerator
        device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
        checkpoint = trainer.output_dir / CHECKPOINT_DIR

        # ---- roles; a fresh policy copied from the SFT adapter needs a fresh optimizer over its parameters
        roles = setup_roles(tuned, options, replace_policy_with_sft=not trainer.resume, seed=cfg.seed)
        tuned.to(device)
        if options.sft_adapter and not trainer.resume:
            policy_params = [p for n, p in tuned.named_trainable_parameters() if not n.startswith("heads.")]
            trainer.optimizer = accelerator.prepare(torch.optim.AdamW(policy_params, lr=cfg.lr, weight_decay=cfg.weight_decay))
            trainer.scheduler = make_scheduler(trainer.optimizer, cfg.scheduler, cfg.warmup_steps, trainer.total_steps)
        value_head = heads_of(tuned)["value"]
        value_optimizer = torch.optim.AdamW(value_head.parameters(), lr=cfg.lr)
        value_scheduler = make_scheduler(value_optimizer, cfg.scheduler, cfg.warmup_steps, trainer.total_steps)
        learner = PPOLearner(
            roles, options, [trainer.optimizer, value_optimizer], pad_id=int(tokenizer.pad_token_id),
            stop_ids=stop_token_ids(tokenizer, options.stop_tokens), max_grad_norm=cfg.max_grad_norm,
            device=device, autocast=accelerator.autocast,
        )
        ptx = None
        if options.ptx_coef > 0:
            rows = ppo_data.tokenize_ptx(ppo_data.load_ptx_texts(options.ptx_data), tokenizer, options.ptx_max_length)
            if len(rows) < world:
                raise PeftkitError(
                    f"objective option ptx_data = {options.ptx_data!r} holds {len(rows)} usable texts for {world} processes; "
                    "every process needs its own: give more texts or launch fewer processes"
                )
            ptx = ppo_data.PtxStream(
                rows, options.ptx_batch_size, int(tokenizer.pad_token_id), seed=cfg.seed, device=device, rank=rank, world_size=world
            )
        if trainer.resume:
            state = read_state_file(checkpoint / PPO_STATE_FILE)
            with restoring(checkpoint / PPO_STATE_FILE):
                value_head.load_state_dict(state["value_head"])
                value_optimizer.load_state_dict(state["value_optimizer"])
                value_scheduler.load_state_dict(state["value_scheduler"])
                learner.kl.load_state_dict(state["kl"])
                if ptx is not None and state["ptx"] is not None:
                    ptx.load_state_dict(state["ptx"])
            if world == 1:
                # Loading the reference/reward adapters above drew from the RNG; start from the checkpoint's state.
                with restoring(checkpoint / STATE_FILE):
                    set_rng_state(read_state_file(checkpoint / STATE_FILE)["rng"])
            else:  # this rank's own RNG and positions (the trainer restored rank 0's)
                own = checkpoint / rank_state_file(rank)
                if not own.is_file():
                    raise PeftkitError(
                        f"--resume with {world} processes: {own} does not exist; the checkpoint was written by a run of "
                        "another number of processes (resume with that number: torchrun --nproc_per_node), or it stopped while saving"
                    )
                mine = read_state_file(own)
                with restoring(own):
                    trainer.order.load_state_dict(mine["data"])
                    if ptx is not None and mine["ptx"] is not None:
                        ptx.load_state_dict(mine["ptx"])
                    set_rng_state(mine["rng"])

        def save_checkpoint() -> None:
            trainer.save_checkpoint()  # policy adapter (training form), policy optimizer/schedule, RNG, step, data position
            state = {
                "value_head": value_head.state_dict(), "value_optimizer": value_optimizer.state_dict(),
                "value_scheduler": value_scheduler.state_dict(), "kl": learner.kl.state_dict(),
                "ptx": ptx.state_dict() if ptx is not None else None,
            }
            files = {PPO_STATE_FILE: state} if accelerator.is_main_process else {}  # value head etc.: the same on every rank
            if world > 1:
                files[rank_state_file(rank)] = {
                    "rng": rng_state(), "data": trainer.order.state_dict(), "ptx": ptx.state_dict() if ptx is not None else None,
                }
            for name, content in files.items():
                tmp = checkpoint / (name + ".tmp")
                torch.save(content, tmp)
                tmp.replace(checkpoint / name)
            accelerator.wait_for_everyone()

        # ---- the loop: one step = one rollout + its PPO epochs
        order = iter(trainer.order)
        bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not (trainer.progress and accelerator.is_main_process), unit="rollout")
        start = time.perf_counter()
        last: dict[str, float] = {}
        while trainer.step < trainer.total_steps:
            prompts = [trainer.train_examples[i]["prompt_ids"] for i in next(order)]
            last = learner.step(prompts, ptx)
            trainer.scheduler.step()
            value_scheduler.step()
            trainer.step += 1
            trainer.check_adapter_finite()  # a diverged policy must not sample the next rollout or reach a save
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.3f}")
            if trainer.step % out.log_every == 0 or trainer.step == trainer.total_steps:
                trainer.log({"step": trainer.step, **last, "lr": trainer.scheduler.get_last_lr()[0]})
            if out.save_every and trainer.step % out.save_every == 0 and trainer.step < trainer.total_steps:
                save_checkpoint()
        bar.close()
        seconds = time.perf_counter() - start

        # ---- the end: held-out reward, checkpoint, the policy adapter
        held_out = self.evaluate(learner, trainer.eval_examples[rank::world], cfg.eval_batch_size or cfg.batch_size)
        if held_out:
            trainer.log({"step": trainer.step, **held_out})
        save_checkpoint()
        adapter_dir = trainer.save_final_adapter(POLICY)
        return TrainResult(
            output_dir=trainer.output_dir, adapter_dir=adapter_dir, steps=trainer.step, eval_loss_before=None,
            eval_loss_after=None, train_loss=last.get("policy_loss"),
            seconds=seconds, tokens_per_second=0.0,
        )

    @staticmethod
    def _check_train_settings(cfg: Any) -> None:
        """Refuse loop settings PPO would otherwise ignore silently."""
        check_train_settings(cfg, "ppo")

    @staticmethod
    def evaluate(learner: PPOLearner, examples: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, float]:
        """Mean reward-model score and KL of sampled responses to held-out prompts (no update).

        Several processes: each passes its own share of ``examples``; the means are over all ranks' prompts.
        """
        scores, kls, n = 0.0, 0.0, 0
        for start in range(0, len(examples), batch_size):
            rollout = learner.rollout([e["prompt_ids"] for e in examples[start : start + batch_size]], advantages=False)
            scores += float(rollout.stats["scores"].sum())
            kls += float(rollout.stats["kl"].sum())
            n += len(rollout)
        scores, kls, n = sum_over_ranks([scores, kls, n], learner.device)
        if not n:
            return {}
        return {"eval_reward": scores / n, "eval_kl": kls / n}

"""The training loop: one plain, readable loop over ``accelerate``.

``accelerate`` places the model, runs mixed precision and DDP (launch the same
command under ``torchrun``/``accelerate launch``); with ``train.distributed:
fsdp`` torch FSDP2 shards the model instead (:mod:`.distributed`: the base and
the adapter per decoder layer; checkpoints and the adapter gather the
adapter's tensors only); everything else is here, in
the order it happens: load the base model, inject the adapter, prepare data,
then loop ``optimizer step <- gradient accumulation <- micro-batches``, logging,
evaluating and checkpointing as the recipe says.

Outputs in ``output.dir``: ``recipe.yaml`` (what ran), ``metrics.jsonl`` (one
JSON object per logged step or evaluation), ``checkpoint/`` (adapter in its
training form + optimizer, scheduler, RNG states, step and data position,
replaced atomically), ``adapter/`` (the final adapter, inference form),
``loss_curve.png``, and with ``output.report_to`` the trackers' files under
``tracking/`` (:mod:`.tracking`: every logged record goes to the trackers too,
the recipe as hyperparameters). While a run writes there, ``output.dir`` is locked
(:mod:`.run_lock`); a run start puts back what a crash between the two renames
of a replacement left as ``checkpoint.peftkit-old``/``adapter.peftkit-old``, and
refuses to replace a finished run of another recipe without ``overwrite``
(:mod:`.run_files`).

Resuming (``resume=True``) restores every piece of the checkpoint, so on the
CPU a run that was killed and resumed ends with an adapter bit-identical to an
uninterrupted one (single process; under DDP every rank restores rank 0's RNG
state; under FSDP the optimizer state is saved gathered in full and re-sharded on
resume, and a resumed run matches an uninterrupted one to float tolerance, not
bitwise, see docs/distributed.md). A NaN/inf loss, adapter or held-out loss stops the run with a
:class:`TrainingError` before anything is saved (:mod:`.finite_guard`); the
last checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from torch import nn

from peftkit.training.data import BatchOrder, DataError, RecordError, load_records, split_records
from peftkit.training.checkpoint import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    METRICS_FILE,
    RECIPE_FILE,
    STATE_FILE,
    read_state_file,
    restoring,
    rng_state,
    set_rng_state,
)
from peftkit.errors import TrainingError
from peftkit.training import distributed
from peftkit.training.finite_guard import FiniteGuard
from peftkit.training.run_files import keep_metrics_through, refuse_replacing_run, refuse_wrong_resume
from peftkit.training.run_lock import RunLock
from peftkit.training import tracking
from peftkit.options import options_to_dict
from peftkit.plugins import PluginManager
from peftkit.plugins import plugin_manager as default_plugin_manager
from peftkit.training.recipe import Recipe
from peftkit.registry import ObjectiveLoss
from peftkit.serialization import atomic_directory, recover_directory

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainingError",
    "train",
    "enable_gradient_checkpointing",
    "make_scheduler",
]

@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    adapter_dir: Path
    steps: int
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_loss: float | None
    seconds: float
    tokens_per_second: float
    metrics: dict[str, float] = field(default_factory=dict)  # the final held-out metrics (eval_loss and the objective's)


class _ObjectiveStep(nn.Module):
    """The model plus the objective's loss as one module, so DDP and autocast wrap the whole loss computation."""

    def __init__(self, tuned: nn.Module, objective: Any, options: Any):
        super().__init__()
        self.tuned = tuned
        self.objective = objective
        self.options = options

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveLoss:
        return self.objective.loss(self.tuned, batch, self.options)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule: a multiplier of the peak ``lr`` per optimizer step.

    ``constant``: 1; ``constant_with_warmup``: linear from 0 to 1 over
    ``warmup_steps``, then 1; ``linear``/``cosine``: that warm-up, then down to 0
    at ``total_steps`` along a line / half a cosine. (The same curves as
    transformers' schedulers, whose module would import the training stack.)
    """

    def factor(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if name == "constant_with_warmup":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def enable_gradient_checkpointing(tuned: nn.Module) -> None:
    """Turn on activation checkpointing in the transformers model inside ``tuned`` (any method).

    :raises TrainingError: if the model does not support it.
    """
    hf_model = tuned.base_model if hasattr(tuned, "adapters") else tuned
    if not getattr(hf_model, "supports_gradient_checkpointing", False):
        raise TrainingError(
            f"train.gradient_checkpointing: {type(hf_model).__name__} does not support activation checkpointing; "
            "set it to false"
        )
    # Non-reentrant checkpointing back-propagates into adapters inside the
    # checkpointed layers even when the layer inputs need no grad; input grads
    # are enabled too, for input-side methods whose tensors join at the embeddings.
    if hasattr(hf_model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with contextlib.suppress(NotImplementedError, AttributeError):
        hf_model.enable_input_require_grads()
    if getattr(hf_model.config, "use_cache", None):
        hf_model.config.use_cache = False


def _forget_other_precision(mixed_precision: str) -> None:
    """Let one process run recipes after other accelerate users (e.g. TRL with bf16) set another precision.

    accelerate keeps one process-wide ``AcceleratorState``; once something in this
    process made an ``Accelerator`` with another ``mixed_precision``, a new one
    raises "AcceleratorState has already been initialized". In a single process
    nothing else depends on that state between runs, so it is reset (accelerate's
    own tests do the same); a launched multi-process run keeps it.
    """
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


class Trainer:
    """Runs one recipe. Construct, then call :meth:`train`.

    :param recipe: a validated :class:`peftkit.training.recipe.Recipe`.
    :param model: a base model to use instead of loading ``recipe.model`` (tests, notebooks).
    :param tokenizer: its tokenizer (required with ``model``).
    :param resume: continue from ``output.dir/checkpoint``.
    :param progress: show a progress bar (main process only).
    :param overwrite: replace a finished run in ``output.dir`` even if its recipe differs.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        resume: bool = False,
        progress: bool = True,
        plugin_manager: PluginManager | None = None,
        overwrite: bool = False,
    ):
        from accelerate import Accelerator

        if (model is None) != (tokenizer is None):
            raise TrainingError("pass both model and tokenizer, or neither (then recipe.model is loaded)")
        self.recipe = recipe
        self.pm = plugin_manager or default_plugin_manager()
        self.resume = resume
        self.progress = progress
        self.overwrite = overwrite
        self.output_dir = Path(recipe.output.dir)
        # accelerate only runs CPU processes as one DDP group (gloo) when told
        # cpu=True; under torchrun on a machine without GPU that is what is meant.
        launched = distributed.launched_world_size() > 1
        cpu = recipe.train.cpu or (launched and not torch.cuda.is_available())
        problems = tracking.report_to_problems(recipe.output.report_to)  # a Recipe built by hand skipped validation
        if problems:
            raise TrainingError("; ".join(problems))
        if not launched:
            _forget_other_precision(recipe.train.mixed_precision)
        self.accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=recipe.train.mixed_precision,
            **tracking.accelerator_kwargs(recipe.output.report_to, self.output_dir),
        )
        self.objective = self.pm.get_objective(recipe.objective.name)
        self.objective_options = recipe.objective_options
        #: FSDP2 sharding (train.distributed: fsdp under a launcher with several processes)
        self.fsdp = recipe.train.distributed == "fsdp" and launched
        if self.fsdp and callable(getattr(self.objective, "run", None)):
            raise TrainingError(
                f"train.distributed = 'fsdp': objective {recipe.objective.name!r} runs a loop of its own, which does "
                "not shard the model; use train.distributed: auto (DDP where the objective supports several processes)"
            )
        if recipe.train.distributed == "fsdp" and not launched and self.accelerator.is_main_process:
            print("note: train.distributed = 'fsdp' with one process: nothing to shard, training in this one process "
                  "(launch with torchrun --nproc_per_node N to shard)")
        self._given_model, self._given_tokenizer = model, tokenizer
        self.metrics_path = self.output_dir / METRICS_FILE
        self.history: list[dict[str, Any]] = []
        self.guard = FiniteGuard(self.output_dir / CHECKPOINT_DIR, recipe.train)
        self.run_lock = RunLock(self.output_dir, enabled=self.accelerator.is_main_process)

    # ============================================================ setup
    def setup(self) -> None:
        """Claim ``output.dir``, then load the model, inject the adapter, read the data, build optimizer and scheduler.

        ``output.dir`` stays locked until :meth:`train` returns (or this raises).
        """
        try:
            self._claim_output_dir()
            self._build()
        except BaseException:
            self.run_lock.release()
            raise

    def _claim_output_dir(self) -> None:
        """Lock ``output.dir``, repair what a crash left there, refuse a wrong resume or a silent replacement.

        All before the model loads: a refused run should fail in a second.
        """
        if self.accelerator.is_main_process:
            note = self.run_lock.acquire()
            if note:
                print(f"note: {note}")
            for name in (CHECKPOINT_DIR, ADAPTER_DIR):  # a crash between the two renames of a replacement
                if recover_directory(self.output_dir / name):
                    print(f"note: restored {self.output_dir / name} from the complete copy a crash left beside it")
        self.accelerator.wait_for_everyone()
        if self.resume:
            refuse_wrong_resume(self.output_dir, self.recipe.to_dict())
        elif not self.overwrite:
            refuse_replacing_run(self.output_dir, self.recipe.to_dict())

    def _build(self) -> None:
        """Everything :meth:`setup` does once ``output.dir`` is claimed."""
        import peftkit
        from accelerate.utils import set_seed

        recipe, train_cfg = self.recipe, self.recipe.train
        checkpoint = self.output_dir / CHECKPOINT_DIR
        set_seed(train_cfg.seed)  # python, numpy and torch: the adapter's initialisation depends on it

        # ---- base model, loaded straight into whatever form the method needs (e.g. 4-bit)
        if self._given_model is not None:
            model, tokenizer = self._given_model, self._given_tokenizer
        else:
            from peftkit.training.models import load_model_and_tokenizer

            kwargs = self.pm.model_load_kwargs(recipe.method.name, recipe.method_options)
            kwargs.update(recipe.model.load_kwargs)
            refusal = distributed.fsdp_refusal(kwargs) if self.fsdp else None
            if refusal:
                raise TrainingError(refusal)
            model, tokenizer = load_model_and_tokenizer(recipe.model.name_or_path, dtype=recipe.model.dtype, load_kwargs=kwargs)
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        refusal = distributed.fsdp_refusal({}, model) if self.fsdp else None
        if refusal:
            raise TrainingError(refusal)

        # ---- adapter: fresh, or the checkpoint's (training form, so e.g. reparameterisations come back too)
        if self.resume:
            self.tuned = peftkit.load(model, checkpoint / ADAPTER_DIR, is_trainable=True)
        else:
            self.tuned = self.build_adapter(model)
        setup_model = getattr(self.objective, "setup_model", None)
        if callable(setup_model):  # e.g. the reward head: before the optimizer sees the parameters
            setup_model(self.tuned, self.objective_options, checkpoint=checkpoint / ADAPTER_DIR if self.resume else None)
        self.tuned.train()
        if train_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.tuned)

        # ---- data
        self.train_examples, self.eval_examples = self._prepare_data()

        # ---- optimizer and schedule (under FSDP over the sharded parameters, so after sharding)
        step_module = _ObjectiveStep(self.tuned, self.objective, self.objective_options)
        if self.fsdp:
            distributed.shard(step_module, self.tuned, self.accelerator.device)
        params = self.tuned.trainable_parameters()
        if not params:
            raise TrainingError(f"method {recipe.method.name!r} left no trainable parameter; check method.options")
        self.optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self.order = BatchOrder(
            len(self.train_examples),
            train_cfg.batch_size,
            seed=train_cfg.seed,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        if train_cfg.max_steps is not None:
            self.total_steps = train_cfg.max_steps
        else:
            micro = math.ceil(train_cfg.epochs * self.order.batches_per_epoch)
            self.total_steps = max(1, micro // train_cfg.gradient_accumulation_steps)
        self.scheduler = make_scheduler(self.optimizer, train_cfg.scheduler, train_cfg.warmup_steps, self.total_steps)
        if self.fsdp:  # FSDP2 placed and sharded it; accelerate's DDP wrapper must not replicate it
            self.step_module = step_module
        else:
            self.step_module = self.accelerator.prepare(step_module)
            self.optimizer = self.accelerator.prepare(self.optimizer)
        self.step = 0
        self.eval_loss_before: float | None = None
        if self.resume:
            self._load_checkpoint(checkpoint)

    def build_adapter(self, model: nn.Module) -> nn.Module:
        """The model the loop trains: ``model`` with a fresh adapter of ``recipe.method``.

        Override it to train something else under the same loop (the benchmarks
        train a ``peft`` model this way). The result must be a module with
        ``trainable_parameters()`` and ``save(directory, training=...)``.
        """
        import peftkit
        from peftkit.errors import TargetError

        method = self.recipe.method
        try:
            return peftkit.wrap(model, method.name, modules_to_save=method.modules_to_save, **options_to_dict(self.recipe.method_options))
        except TargetError as exc:
            if not str(exc).startswith("modules_to_save="):
                raise
            raise TargetError(f"recipe key method.{exc}") from None

    def _prepare_data(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        data = self.recipe.data
        records = load_records(data.train)
        if data.eval:
            train_records, eval_records = records, load_records(data.eval)
        elif data.eval_size:
            train_records, eval_records = split_records(records, data.eval_size, data.seed)
        else:
            train_records, eval_records = records, []
        if data.max_train_samples is not None:
            train_records = train_records[: data.max_train_samples]
        train = self._prepare_examples(train_records)
        evals = self._prepare_examples(eval_records) if eval_records else []
        if not train:
            raise DataError(f"data.train = {data.train!r}: no usable training example after preparation")
        return train, evals

    def _prepare_examples(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The objective's examples of ``records``; a record it refuses is named by file and number."""
        try:
            return self.objective.prepare_data(records, self.tokenizer, self.objective_options, self.recipe.data.max_length)
        except RecordError as exc:
            raise exc.located(records) from None

    # ============================================================ pieces
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices in self.order:
            yield self._to_device(self.objective.collate([self.train_examples[i] for i in indices], self.tokenizer))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per target over the held-out examples (``None`` without any)."""
        if not self.eval_examples:
            return None
        was_training = self.tuned.training
        self.tuned.eval()
        size = self.recipe.train.eval_batch_size or self.recipe.train.batch_size
        module = self.step_module if self.fsdp else self.accelerator.unwrap_model(self.step_module)
        total, count = 0.0, 0
        for start in range(0, len(self.eval_examples), size):
            batch = self._to_device(self.objective.collate(self.eval_examples[start : start + size], self.tokenizer))
            with self.accelerator.autocast():
                out = module(batch)
            total += float(out.loss) * out.num_targets
            count += out.num_targets
        self.tuned.train(was_training)
        return total / count if count else None

    def evaluate_and_log(self) -> dict[str, float]:
        """Held-out loss plus the objective's own held-out metrics (``eval_metrics``), logged at the current step."""
        metrics: dict[str, float] = {}
        loss = self.evaluate()
        self.guard.eval_loss(loss, self.step)
        if loss is not None:
            metrics["eval_loss"] = loss
        eval_metrics = getattr(self.objective, "eval_metrics", None)
        if callable(eval_metrics) and self.eval_examples:
            was_training = self.tuned.training
            self.tuned.eval()
            with torch.no_grad(), self.accelerator.autocast(), distributed.unsharded(self.step_module):
                metrics.update(eval_metrics(self.tuned, self.eval_examples, self.tokenizer, self.objective_options))
            self.tuned.train(was_training)
        if metrics:
            self.log({"step": self.step, **metrics})
        return metrics

    def _save_extras(self, directory: Path) -> None:
        save_extras = getattr(self.objective, "save_extras", None)
        if callable(save_extras):
            save_extras(self.tuned, directory, self.objective_options)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record to ``metrics.jsonl``, send it to the ``output.report_to`` trackers and tell the
        ``peftkit_on_log`` hook (main process). Objectives with a loop of their own log through here too."""
        self.history.append(record)
        if not self.accelerator.is_main_process:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.accelerator.trackers:
            self.accelerator.log(metrics, step=int(record["step"]))
        self.pm.call_hook("peftkit_on_log", step=int(record["step"]), metrics=metrics)

    def save_final_adapter(self, adapter_name: str | None = None) -> Path:
        """Write the run's result to ``output.dir/adapter`` (main process) and return that path.

        The adapter (``adapter_name``, default the active one) in its inference form, the
        objective's extras, the tokenizer (``tokenizer/``) and, for a base loaded from the
        recipe, ``base_model.txt`` naming it (what ``peftkit generate``/``merge`` load). Under
        FSDP only the adapter's shards are gathered. Objectives with a loop of their own
        (``run``) call this at their end too. Every process waits until it is written.
        """
        accel = self.accelerator
        adapter_dir = self.output_dir / ADAPTER_DIR
        with distributed.full_adapter(self.step_module, main_process=accel.is_main_process) if self.fsdp else contextlib.nullcontext():
            if accel.is_main_process:
                self.tuned.save(adapter_dir, adapter_name=adapter_name)
                self._save_extras(adapter_dir)
        if accel.is_main_process:
            if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(adapter_dir / "tokenizer")
            if self._given_model is None:  # a model handed in has no name to record
                (adapter_dir / "base_model.txt").write_text(self.recipe.model.name_or_path + "\n")
        accel.wait_for_everyone()
        return adapter_dir

    def save_checkpoint(self) -> None:
        """Write ``checkpoint/`` atomically: the adapter (training form) and every piece of loop state.

        :raises TrainingError: if a trainable parameter is not finite (nothing is written then).
        """
        self.check_adapter_finite()
        self.accelerator.wait_for_everyone()
        main = self.accelerator.is_main_process
        # FSDP: the optimizer state and the adapter are gathered in full (collectives: every rank), the base never
        optimizer_state = distributed.full_optimizer_state(self.optimizer) if self.fsdp else None
        with distributed.full_adapter(self.step_module, main_process=main) if self.fsdp else contextlib.nullcontext():
            if main:
                self._write_checkpoint(optimizer_state)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, optimizer_state: dict[str, Any] | None) -> None:
        """The main process's part of :meth:`save_checkpoint`."""
        with atomic_directory(self.output_dir / CHECKPOINT_DIR) as tmp:
            self.tuned.save(tmp / ADAPTER_DIR, training=True)
            self._save_extras(tmp / ADAPTER_DIR)
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
            state = {
                "step": self.step,
                "data": self.order.state_dict(),
                "optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
                "eval_loss_before": self.eval_loss_before,
            }
            torch.save(state, tmp / STATE_FILE)

    def _load_checkpoint(self, checkpoint: Path) -> None:
        state = read_state_file(checkpoint / STATE_FILE)
        with restoring(checkpoint / STATE_FILE):
            if self.fsdp:
                distributed.load_full_optimizer_state(self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.order.load_state_dict(state["data"])
            self.step = int(state["step"])
            if not 0 <= self.step <= self.total_steps:
                raise ValueError(f"its step {self.step} is outside this run's 0..{self.total_steps}")
            self.eval_loss_before = state["eval_loss_before"]
            set_rng_state(state["rng"])
        if self.metrics_path.is_file():
            self.history = keep_metrics_through(self.metrics_path, self.step, rewrite=self.accelerator.is_main_process)

    def check_adapter_finite(self) -> None:
        """Stop the run (:class:`TrainingError`) if an optimizer step left NaN/inf in a trainable parameter."""
        # Under FSDP each process checks its own shards (a failing process stops the launcher's whole group).
        self.guard.parameters([(n, distributed.local(p)) for n, p in self.tuned.named_parameters() if p.requires_grad], self.step)

    # ============================================================ the loop
    def train(self) -> TrainResult:
        """Run the recipe to its last step and return what it produced; ``output.dir`` is unlocked on return or error."""
        try:
            if not hasattr(self, "tuned"):
                self.setup()
            if self.accelerator.is_main_process:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / RECIPE_FILE).write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
                if not self.resume and self.metrics_path.exists():
                    self.metrics_path.unlink()
            self._start_trackers()
            run = getattr(self.objective, "run", None)
            if callable(run):  # an objective with a loop of its own (e.g. PPO rollouts)
                return run(self, self.objective_options)
            return self._sft_style_loop()
        finally:
            self._end_trackers()
            self.run_lock.release()

    def _start_trackers(self) -> None:
        """Start the ``output.report_to`` trackers with the recipe as hyperparameters (nothing without any)."""
        if self.recipe.output.report_to and not self.accelerator.trackers:
            self.accelerator.init_trackers(
                tracking.project_name(self.output_dir),
                config=tracking.flat_hyperparameters(self.recipe),
                init_kwargs=tracking.init_kwargs(self.recipe.output.report_to, self.output_dir),
            )

    def _end_trackers(self) -> None:
        """Flush and close the trackers (the run returned or failed)."""
        if self.accelerator.trackers:
            self.accelerator.end_training()
            self.accelerator.trackers.clear()

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradient synchronisation for one micro-batch: only the last of an accumulation reduces across processes."""
        if sync:
            return contextlib.nullcontext()
        if self.fsdp:
            return distributed.gradient_sync(self.step_module, False)
        return self.accelerator.no_sync(self.step_module)

    def _sft_style_loop(self) -> TrainResult:
        from tqdm.auto import tqdm

        train_cfg, out_cfg, accel = self.recipe.train, self.recipe.output, self.accelerator
        accum = train_cfg.gradient_accumulation_steps
        if not self.resume:
            self.eval_loss_before = self.evaluate_and_log().get("eval_loss")
        batches = self._batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.progress and accel.is_main_process), unit="step")
        start_time, tokens_seen, window_loss, window_steps, last_loss = time.perf_counter(), 0, 0.0, 0, None
        window_start, window_tokens, window_metrics = start_time, 0, {}
        self.step_module.train()

        while self.step < self.total_steps:
            # ---- one optimizer step = `accum` micro-batches
            step_loss = 0.0
            for micro in range(accum):
                batch = next(batches)
                sync = micro == accum - 1
                with self._sync_context(sync), accel.autocast() if self.fsdp else contextlib.nullcontext():
                    out = self.step_module(batch)
                    self.guard.loss(out.loss, self.step + 1)
                    accel.backward(out.loss / accum)
                step_loss += float(out.loss.detach()) / accum
                for key, value in out.metrics.items():  # the objective's own parts, averaged over the log window
                    window_metrics[key] = window_metrics.get(key, 0.0) + value / accum
                n_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel())
                tokens_seen += n_tokens
                window_tokens += n_tokens
            if train_cfg.max_grad_norm is not None:
                accel.clip_grad_norm_(self.tuned.trainable_parameters(), train_cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.check_adapter_finite()
            window_loss += step_loss
            window_steps += 1
            bar.update(1)

            # ---- log, evaluate, checkpoint
            if self.step % out_cfg.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                last_loss = window_loss / window_steps
                tps = window_tokens * accel.num_processes / max(now - window_start, 1e-9)
                record = {
                    "step": self.step,
                    "loss": last_loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tps,
                    "epoch": self.order.epoch + self.order.batch_in_epoch / self.order.batches_per_epoch,
                    **{key: value / window_steps for key, value in window_metrics.items()},
                }
                self.log(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tps:.0f}")
                window_loss, window_steps, window_start, window_tokens, window_metrics = 0.0, 0, now, 0, {}
            if out_cfg.eval_every and self.step % out_cfg.eval_every == 0 and self.step < self.total_steps:
                eval_loss = self.evaluate_and_log().get("eval_loss")
                if eval_loss is not None:
                    bar.set_postfix(loss=f"{last_loss or step_loss:.4f}", eval=f"{eval_loss:.4f}")
            if out_cfg.save_every and self.step % out_cfg.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()

        # ---- the end: final eval, checkpoint, adapter, plot
        seconds = time.perf_counter() - start_time
        final_metrics = self.evaluate_and_log()
        eval_after = final_metrics.get("eval_loss")
        self.save_checkpoint()
        adapter_dir = self.save_final_adapter()
        if accel.is_main_process:
            if self.recipe.output.plot:
                from peftkit.training._plot import plot_losses

                plot_losses(self.history, self.output_dir / "loss_curve.png")
        accel.wait_for_everyone()
        return TrainResult(
            output_dir=self.output_dir,
            adapter_dir=adapter_dir,
            steps=self.step,
            eval_loss_before=self.eval_loss_before,
            eval_loss_after=eval_after,
            train_loss=last_loss,
            seconds=seconds,
            tokens_per_second=tokens_seen * accel.num_processes / max(seconds, 1e-9),
            metrics=final_metrics,
        )


def train(recipe: Recipe, **kwargs: Any) -> TrainResult:
    """Train ``recipe`` (see :class:`Trainer` for the keyword arguments)."""
    return Trainer(recipe, **kwargs).train()

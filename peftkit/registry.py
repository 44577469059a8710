"""The shapes plugins fill in: the ``Injector``, ``Objective``, ``Reward`` and ``AdapterLayer`` protocols.

These are :class:`typing.Protocol` classes, not base classes: a plugin
satisfies them by having the right attributes, and never needs to import
peftkit beyond :mod:`peftkit.hookspecs` (for ``hookimpl``) and the helpers it
chooses to use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.injection import InjectionContext

__all__ = ["Injector", "Objective", "ObjectiveLoss", "Reward", "AdapterLayer", "is_adapter_layer"]


class Injector(Protocol):
    """A PEFT method, registered through ``peftkit_register_injectors``.

    Attributes:
        name: the method name users type (``"lora"``); unique across plugins.
        description: one line shown by ``peftkit methods``.
        options: a dataclass of the method's options (see :mod:`peftkit.options`).
        supports_merge: whether the adapter can be folded into the base weights.
        merge_refusal: (optional) why merge is impossible, shown when a user asks.
        peft_format: (optional) a :class:`peftkit.interop.PeftFormat` converting
            adapters to and from Hugging Face peft's directory format.
        recommended_lr: (optional) the AdamW learning rate a recipe with
            ``train.lr: auto`` uses for this method (methods differ by more than
            10x: prompt tuning moves a few embeddings, LoRA low-rank updates).
    """

    name: str
    description: str
    options: type
    supports_merge: bool

    def inject(self, context: "InjectionContext", options: Any) -> None:
        """Insert adapter ``context.adapter_name`` into ``context.model`` in place.

        Weight-side methods call ``context.wrap(...)`` on each target; input- or
        attention-side methods ``context.attach(...)`` a standalone module.
        Every module that holds adapter state must satisfy :class:`AdapterLayer`.
        """
        ...


class Objective(Protocol):
    """A training objective, registered through ``peftkit_register_objectives``.

    The training loop (:mod:`peftkit.training.trainer`) calls, in order:

    * ``prepare_data(records, tokenizer, options, max_length)`` once per split:
      raw records (dicts read from a jsonl/json/csv/parquet file or a dataset)
      -> examples (dicts of token-id lists), dropping what cannot be trained on;
    * ``collate(examples, tokenizer)`` per batch: examples -> tensors;
    * ``loss(model, batch, options)`` per micro-batch, in training (with grad)
      and evaluation (without): returns an :class:`ObjectiveLoss`.

    Optional steps, each called only if the objective defines it:

    * ``setup_model(tuned, options, *, checkpoint)`` after the adapter is made
      (or loaded for ``--resume``) and before the optimizer sees the
      parameters: add trainable modules of the objective's own (the reward
      head); ``checkpoint`` is the checkpoint's adapter directory on resume,
      else ``None``, so they can be restored;
    * ``save_extras(tuned, directory, options)`` after every adapter the
      trainer saves (each checkpoint and the final adapter);
    * ``eval_metrics(model, examples, tokenizer, options)`` -> ``{name: float}``
      at every evaluation, logged beside ``eval_loss`` (runs without grad);
    * ``run(trainer, options)``: a loop of its own (PPO: rollouts, then
      several optimisation epochs over them); the trainer hands it the model,
      optimizer, data and checkpointing helpers and calls it instead of its
      own loop.

    Attributes:
        name: the name recipes use (``objective.name: sft``).
        description: one line shown by ``peftkit methods``.
        options: a dataclass of the objective's options (see :mod:`peftkit.options`).
    """

    name: str
    description: str
    options: type

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
        """Tokenize ``records`` into training examples (raise ``PeftkitError`` naming bad records)."""
        ...

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Pad and stack examples into a batch of tensors."""
        ...

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: Any) -> "ObjectiveLoss":
        """The loss of ``model`` on ``batch`` (a scalar with a graph when grad is enabled)."""
        ...


class ObjectiveLoss(NamedTuple):
    """What :meth:`Objective.loss` returns.

    Attributes:
        loss: the scalar to minimise (mean over this batch's targets).
        num_targets: how many targets it averages over (evaluation weights
            batches by it, so the eval loss is a per-target mean).
        metrics: extra floats to log (e.g. the parts of a combined loss).
    """

    loss: torch.Tensor
    num_targets: int
    metrics: dict[str, float] = {}


class Reward(Protocol):
    """A programmatic reward, registered through ``peftkit_register_rewards``.

    Objectives that learn from sampled completions (``grpo``) name one in
    ``objective.options.reward`` and call it once per rollout with every
    completion of the batch (all prompts, ``num_generations`` each).

    Attributes:
        name: the name recipes use (``reward: arithmetic_exact_match``); unique across plugins.
        description: one line shown by ``peftkit methods``.
    """

    name: str
    description: str

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        """One finite reward per completion.

        :param prompts: the prompt text of each completion (repeated for completions of one prompt).
        :param completions: the decoded completions (special tokens removed), aligned with ``prompts``.
        :param records: the data record each prompt came from (its other fields, e.g. ``answer``), aligned too.
        :returns: a list of ``len(completions)`` floats.
        """
        ...


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that holds the state of one or more named adapters.

    Weight-side wrappers also have a ``base_layer`` attribute (the module they
    wrap) and are replaced by it when their last adapter is deleted.
    """

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        ...

    def set_active_adapters(self, names: Sequence[str]) -> None:
        """Make exactly ``names`` (possibly none) take part in ``forward``."""
        ...

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The trainable parameters of adapter ``name``."""
        ...

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        """Tensors to save for adapter ``name``.

        :param training: ``True`` for a resumable checkpoint (keep whatever
            training-only parameters exist, e.g. a reparameterization network);
            ``False`` for the inference form.
        """
        ...

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict` (either form)."""
        ...

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name`` and everything it registered."""
        ...

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weights (raise ``MergeNotSupportedError`` if impossible)."""
        ...

    def unmerge(self, name: str) -> None:
        """Undo :meth:`merge`."""
        ...


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether ``module`` satisfies :class:`AdapterLayer`."""
    return isinstance(module, AdapterLayer)

"""``AdapterTrainerMixin``: ``transformers.Trainer`` (and TRL's trainers) saving and resuming peftkit adapters."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.trainer import TRAINING_ARGS_NAME

from peftkit._hf_compat import holds_adapter, reload_adapter_in_place
from peftkit.errors import AdapterError
from peftkit.integrations._trl import move_fused_lm_head_inside
from peftkit.integrations.reference import ReferenceModel
from peftkit.tuned_model import TunedModel

__all__ = ["AdapterTrainerMixin", "AdapterTrainer"]


class AdapterTrainerMixin:
    """Mix into ``transformers.Trainer`` or any subclass (TRL's ``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``, ...).

    With ``model`` a :class:`~peftkit.TunedModel`:

    * ``save_model()`` and every checkpoint write the active adapter with
      :meth:`TunedModel.save_pretrained` (``adapter_config.json`` +
      ``adapter.safetensors``, loadable with ``peftkit.load``) instead of the full
      model; checkpoints keep training-only tensors. The tokenizer and
      ``training_args.bin`` are saved beside it, as ``Trainer`` does.
    * ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy the
      checkpoint's adapter into the model's adapter in place.
    * TRL trainers patch the model's ``forward`` with a fused LM head that reads the
      decoder as ``model.base_model`` (the transformers convention, where
      ``TunedModel.base_model`` is the whole transformers model); the mixin puts the
      same head, with the same settings, on the transformers model inside instead.
    * A trainer taking a ``ref_model`` (TRL's ``DPOTrainer``) given none gets
      :class:`~peftkit.integrations.ReferenceModel` ``(model)``: the same model with its
      adapters disabled, as TRL does for ``peft`` models, instead of a second copy.

    Put the mixin first: ``class MyTrainer(AdapterTrainerMixin, transformers.Trainer)``.
    Not covered: DeepSpeed / FSDP sharded saving, ``push_to_hub``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, TunedModel):
            raise AdapterError(
                f"{type(self).__name__} (AdapterTrainerMixin) needs model=TunedModel (peftkit.wrap or peftkit.load), "
                f"got {type(model).__name__}; use the plain trainer class for other models"
            )
        own_forward = vars(model).get("forward")
        args, kwargs = _reference_by_default(super().__init__, model, args, kwargs)  # type: ignore[misc]
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        move_fused_lm_head_inside(model, own_forward)
        self._refuse_unshifted_label_smoothing(model)

    def _refuse_unshifted_label_smoothing(self, model: TunedModel) -> None:
        """Trainer.compute_loss shifts smoothed labels only for model classes it names as causal LMs (trainer.py:2190)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        factor = getattr(self.args, "label_smoothing_factor", 0.0)  # type: ignore[attr-defined]
        causal = type(model.base_model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        if factor and causal and type(self).compute_loss is transformers.Trainer.compute_loss:
            raise AdapterError(
                f"label_smoothing_factor = {factor}: transformers.Trainer shifts the labels of a causal LM only when "
                f"the model's class is one (trainer.py:2190), and a TunedModel's is not, so every token would be "
                f"scored against itself; set label_smoothing_factor=0, or use TRL's SFTTrainer, which shifts them itself"
            )

    @property
    def tuned_model(self) -> TunedModel:
        """The trainer's model, unwrapped from accelerate's containers."""
        return self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the active adapter (training form for checkpoints), the tokenizer and the training arguments."""
        args = self.args  # type: ignore[attr-defined]
        output_dir = output_dir if output_dir is not None else args.output_dir
        if not args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.tuned_model.save_pretrained(output_dir, training=_internal_call)
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)
        torch.save(args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not holds_adapter(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        reload_adapter_in_place(self.tuned_model, Path(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if best is None or not holds_adapter(best):
            return super()._load_best_model()  # type: ignore[misc]
        reload_adapter_in_place(self.tuned_model, Path(best))


def _reference_by_default(init: Any, model: TunedModel, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    """``ref_model=None`` (given or left out) of a trainer that takes one becomes ``ReferenceModel(model)``.

    TRL reads ``ref_model=None`` with a ``peft`` model as "the model with its adapters
    disabled"; for other models it loads a second copy of the base from
    ``config.name_or_path`` (trl/trainer/dpo_trainer.py:909-927).
    """
    names = [name for name in inspect.signature(init).parameters if name not in ("self", "args", "kwargs")]
    if "ref_model" not in names:
        return args, kwargs
    index = names.index("ref_model")
    if index < len(args):
        if args[index] is None:
            args = (*args[:index], ReferenceModel(model), *args[index + 1 :])
    elif kwargs.get("ref_model") is None:
        kwargs = {**kwargs, "ref_model": ReferenceModel(model)}
    return args, kwargs


class AdapterTrainer(AdapterTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` that saves and resumes peftkit adapters (see :class:`AdapterTrainerMixin`)."""

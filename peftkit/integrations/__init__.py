"""Using a :class:`~peftkit.TunedModel` with ``transformers.Trainer`` and TRL's trainers.

A plain ``transformers.Trainer(model=tuned, ...)`` trains with default
arguments (column filtering sees the base model's ``forward``, labels are found,
gradient checkpointing reaches the base model). What it cannot do is save an
adapter: ``Trainer`` calls ``save_pretrained`` only on a ``PreTrainedModel`` or
a ``peft.PeftModel`` (``isinstance``, transformers/trainer.py ``_save``) and
writes every other model's full ``state_dict``. :class:`AdapterTrainerMixin`
adds that, and the move of TRL's fused LM head onto the transformers model::

    class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer): ...

See docs/integrations.md for what works with each trainer and what does not.
"""

from peftkit.integrations.reference import ReferenceModel
from peftkit.integrations.trainer import AdapterTrainer, AdapterTrainerMixin

__all__ = ["AdapterTrainerMixin", "AdapterTrainer", "ReferenceModel"]

"""LoRA <-> Hugging Face peft (``peft_type: LORA``): option names and tensor names.

Tensors keep their names apart from peft's ``base_model.model.`` prefix
(``<module>.lora_A.weight``, ``<module>.lora_B.weight``, and DoRA's
``<module>.lora_magnitude_vector``); the update is the same ``(alpha / r) B A``
(``alpha / sqrt(r)`` with rsLoRA; per module with ``rank_pattern``/``alpha_pattern``,
matched by the same rule) in both libraries.

Import reads only the config fields and values in :data:`ACCEPTED_FIELDS`, the
ones known to give the same model as peft: an initialisation that rewrites the
base weights in peft (PiSSA, OLoRA, CorDA, LoftQ, ...) leaves A and B that mean
something else on an untouched base, and activated LoRA (``alora_invocation_tokens``)
applies the update only after the invocation tokens; those are refused, naming the field.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.interop import ANY_VALUE, PEFT_PREFIX, WEIGHT_CONVERSION_FIX, PeftField, one_of
from peftkit.targeting import innermost_base
from peftkit_plugins.lora.options import LoraOptions

__all__ = ["LoraPeftFormat", "ACCEPTED_FIELDS"]

_A, _B = ".lora_A.weight", ".lora_B.weight"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pattern(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and _number(v) for k, v in value.items())


_BOOL = PeftField(lambda v: isinstance(v, bool), "true or false")

#: The peft LoRA config fields import reads, with the values that load exactly (any other field must be null/false/empty).
ACCEPTED_FIELDS: dict[str, PeftField] = {
    "task_type": one_of(None, "CAUSAL_LM", "FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS"),
    "r": PeftField(lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "lora_alpha": PeftField(_number, "a number"),
    "lora_dropout": PeftField(_number, "a number"),
    "use_rslora": _BOOL,
    "fan_in_fan_out": _BOOL,
    "use_dora": _BOOL,
    "rank_pattern": PeftField(_pattern, "a dict of module pattern -> rank"),
    "alpha_pattern": PeftField(_pattern, "a dict of module pattern -> alpha"),
    # Targeting: the weights name the adapted modules, so how peft chose them does not matter.
    "target_modules": ANY_VALUE,
    "exclude_modules": ANY_VALUE,
    "layers_to_transform": ANY_VALUE,
    "layers_pattern": ANY_VALUE,
    # Only read together with a feature that is itself off.
    "megatron_core": ANY_VALUE,
    "qalora_group_size": ANY_VALUE,
    "bias": one_of("none", fix="peftkit's lora trains no biases; retrain with bias='none' or use the adapter with peft"),
    # True/False/"gaussian" only choose the starting A and B, which the saved weights replace.
    "init_lora_weights": one_of(True, False, "gaussian", fix=WEIGHT_CONVERSION_FIX),
    "loftq_config": PeftField(lambda v: v in ({}, None), "{} (no LoftQ)", WEIGHT_CONVERSION_FIX),
    "alora_invocation_tokens": one_of(
        None,
        fix="activated LoRA applies the update only to the tokens after its invocation sequence, which peftkit's "
        "lora does not do; run this adapter with peft",
    ),
    "trainable_token_indices": one_of(
        None,
        fix="peftkit has no trainable-token adapter (peft's TrainableTokens); train the embeddings with "
        "modules_to_save=['embed_tokens'] instead, or run this adapter with peft",
    ),
    "ensure_weight_tying": one_of(False, fix="peftkit unties a module it saves from the modules tied to it; save the adapter with ensure_weight_tying=False"),
    "use_qalora": one_of(False),
    "lora_bias": one_of(False),
}


class LoraPeftFormat:
    peft_type = "LORA"
    accepted_fields = ACCEPTED_FIELDS

    def to_peft(self, options: LoraOptions, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        modules = {k[: -len(_A)] for k in tensors if k.endswith(_A)}
        conv1d = any(type(innermost_base(model.get_submodule(m))).__name__ == "Conv1D" for m in modules)
        fields = {
            "r": options.r,
            "lora_alpha": options.alpha,
            "lora_dropout": options.dropout,
            # The exact modules, so peft targets exactly what peftkit did.
            "target_modules": sorted(modules),
            "bias": "none",
            "use_rslora": options.use_rslora,
            "init_lora_weights": True if options.init == "default" else "gaussian",
            "fan_in_fan_out": conv1d,
            "use_dora": options.use_dora,
            # Matched by the same rule in both libraries (peftkit.targeting.pattern_key is peft's get_pattern_key).
            "rank_pattern": dict(options.rank_pattern),
            "alpha_pattern": dict(options.alpha_pattern),
        }
        return fields, {PEFT_PREFIX + k: v for k, v in tensors.items()}

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        init = config.get("init_lora_weights", True)
        prefix_free = {}
        for key, value in tensors.items():
            if not key.startswith(PEFT_PREFIX):
                raise AdapterFormatError(f"unexpected tensor {key!r} in a peft LoRA adapter (expected {PEFT_PREFIX}...)")
            prefix_free[key[len(PEFT_PREFIX):]] = value
        a_weights = {k: v for k, v in prefix_free.items() if k.endswith(_A)}
        if not a_weights:
            raise AdapterFormatError("the peft LoRA adapter holds no lora_A weights")
        options = {
            "r": int(config.get("r", 8)),
            "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout", 0.0)),
            # Target exactly the modules the weights are for.
            "target_modules": sorted(k[: -len(_A)] for k in a_weights),
            "use_rslora": bool(config.get("use_rslora", False)),
            "init": "gaussian" if init == "gaussian" else "default",
            "use_dora": bool(config.get("use_dora", False)),
            "rank_pattern": {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
        }
        return options, prefix_free

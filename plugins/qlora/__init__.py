"""QLoRA: LoRA on a 4-bit quantized base (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314).

The frozen base weights are stored as 4-bit NormalFloat (NF4) codes with
double-quantized block scales (bitsandbytes ``Linear4bit``); LoRA matrices
``A`` (r x in) and ``B`` (out x r) are trained in full precision on top::

    h = dequant(W_nf4) x + (alpha / r) * B A dropout(x)     # alpha / sqrt(r) with use_rslora

``wrap(model, "qlora", ...)`` quantizes the target layers of a full-precision
model *in place* (``"all-linear"``: every Linear/Conv1D but the output head)
and then injects LoRA on them. Quantization cannot be undone: ``unload()``
returns the model with its targets still 4-bit. Layers already 4-bit (a model
loaded with the ``quantization_config`` from the ``peftkit_model_load_kwargs``
hook, the memory-saving route) are kept as they are. The method also prepares
the model for k-bit training: norms and head in float32, and input embeddings
marked as requiring grad so activation checkpointing works.

Merge: ``merge()`` replaces each adapted 4-bit layer by a full-precision Linear
``dequant(W) + scale B A`` (re-quantizing would bury the update in rounding error) and
``unmerge()`` restores the 4-bit layer bit-exactly; ``merge_and_unload()``
returns that dequantized, merged model.

This plugin also teaches plain ``lora`` to wrap ``Linear4bit`` layers, and
guards every 4-bit layer of a model that receives any adapter against
bitsandbytes' CPU inference repacking, which silently stops gradients (see
:mod:`peftkit_plugins.qlora.cpu_layout`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from peftkit.errors import TargetError
from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit.targeting import innermost_base
from peftkit_plugins.qlora.cpu_layout import is_linear4bit, keep_trainable_layout
from peftkit_plugins.qlora.kbit_training import InputGradients, cast_norms_and_head_to_float32
from peftkit_plugins.qlora.layer import Lora4bitLayer
from peftkit_plugins.qlora.loading import bnb_config, model_load_kwargs
from peftkit_plugins.qlora.optimizer import make_optimizer
from peftkit_plugins.qlora.options import QLoraOptions
from peftkit_plugins.qlora.peft_format import QLoraPeftFormat
from peftkit_plugins.qlora.quantize import check_quantizable, dequantize_to_linear, quantize_layer, quantize_model

__all__ = [
    "QLoraInjector",
    "QLoraOptions",
    "Lora4bitLayer",
    "InputGradients",
    "quantize_model",
    "quantize_layer",
    "dequantize_to_linear",
    "keep_trainable_layout",
    "cast_norms_and_head_to_float32",
    "make_optimizer",
    "bnb_config",
    "model_load_kwargs",
]


class QLoraInjector:
    name = "qlora"
    description = "QLoRA: LoRA on a 4-bit NF4 base (Dettmers et al., 2023); merges into a dequantized copy"
    options = QLoraOptions
    supports_merge = True
    recommended_lr = 1e-3  # train.lr: auto; as LoRA: the same low-rank updates, on a 4-bit base
    peft_format = QLoraPeftFormat()  # export only: a peft LoRA adapter for the 4-bit base

    def inject(self, context: InjectionContext, options: QLoraOptions) -> None:
        import torch

        targets = context.find_targets(options.target_modules, layers=options.layers)
        problems = [p for p in (check_quantizable(n, m) for n, m in targets) if p]
        if problems:  # checked before anything is quantized, so an error leaves the model as it was
            raise TargetError(f"method 'qlora': {'; '.join(problems)}")
        for name, module in targets:
            if not is_linear4bit(innermost_base(module)):
                context.replace(
                    name,
                    quantize_layer(
                        module,
                        quant_type=options.quant_type,
                        double_quant=options.double_quant,
                        compute_dtype=getattr(torch, options.compute_dtype),
                    ),
                )
        keep_trainable_layout(context.model)
        cast_norms_and_head_to_float32(context.model)
        context.attach(InputGradients(context.model, context.adapter_name))
        for name, _ in targets:
            context.wrap(name, options.for_module(name))


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(QLoraInjector())


# Not trylast: Linear4bit subclasses nn.Linear, which lora's own (trylast)
# implementation claims, so this more specific answer must come first.
# Plugins registered later are still asked before this one.
@hookimpl
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method in ("lora", "qlora") and is_linear4bit(layer):
        return functools.partial(Lora4bitLayer, method=method)
    return None


@hookimpl
def peftkit_after_inject(model: Any, adapter_name: str, method: str) -> None:
    # Whatever the method: any adapter on a 4-bit base needs gradients through every 4-bit layer.
    keep_trainable_layout(model.base_model)


@hookimpl
def peftkit_model_load_kwargs(method: str, options: Any) -> dict[str, Any] | None:
    if method != "qlora":
        return None
    return model_load_kwargs(options)

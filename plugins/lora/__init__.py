"""LoRA: low-rank adaptation of Linear layers (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

For each target layer with frozen weight ``W`` (out x in), LoRA learns
``A`` (r x in) and ``B`` (out x r) and computes::

    h = W x + (alpha / r) * B A dropout(x)        # alpha / sqrt(r) with use_rslora

``B`` starts at zero, so training starts exactly at the base model; the update
merges exactly into ``W`` (``W + (alpha / r) B A``) for inference.

Options shared with peft: ``use_dora`` (DoRA: a trained magnitude per output
feature times the row-normalised ``W + (alpha / r) B A``, Liu et al., 2024,
https://arxiv.org/abs/2402.09353) and ``rank_pattern``/``alpha_pattern``
(per-module ``r`` and ``alpha`` by name suffix or regex, matched as peft does).

This package is an ordinary peftkit plugin: it registers the ``lora`` method
and answers the ``peftkit_layer_wrapper`` hook for ``nn.Linear`` and
transformers' ``Conv1D`` (with ``trylast`` so other plugins can teach LoRA more
layer types, e.g. quantized ones).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit_plugins.lora.layer import LoraLayer
from peftkit_plugins.lora.options import LoraOptions
from peftkit_plugins.lora.peft_format import LoraPeftFormat

__all__ = ["LoraInjector", "LoraLayer", "LoraOptions", "inject_lora"]


def inject_lora(context: InjectionContext, options: LoraOptions) -> None:
    """Wrap every target of ``options.target_modules`` with a LoRA layer (shared with LoRA variants).

    Named targets may be of any type some plugin can wrap (``peftkit_layer_wrapper``);
    ``"all-linear"`` selects Linear-like layers only.
    """
    for name, _ in context.find_targets(options.target_modules, layers=options.layers, linear_only=False):
        context.wrap(name, options.for_module(name))


class LoraInjector:
    name = "lora"
    description = "LoRA: low-rank updates B·A added to Linear layers (Hu et al., 2021); exact merge"
    options = LoraOptions
    supports_merge = True
    recommended_lr = 1e-3  # train.lr: auto; low-rank updates of every linear layer; tuned on SmolLM2-135M SFT
    peft_format = LoraPeftFormat()

    def inject(self, context: InjectionContext, options: LoraOptions) -> None:
        inject_lora(context, options)


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(LoraInjector())


@hookimpl(trylast=True)
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method != "lora":
        return None
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return LoraLayer
    return None

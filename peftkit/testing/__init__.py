"""Test kit for peftkit and its plugins: tiny models, the injector conformance suite, and helpers for plugin authors.

* :func:`registered_plugin`: use a plugin for one test without installing it, isolated from installed plugins;
* :func:`check_injector` / :data:`CHECKS`: the conformance suite every method passes;
* :func:`assert_matches_reference`: compare a tuned model with a reference implementation (e.g. ``peft``);
* :func:`layer_features`: ``(in, out)`` sizes of Linear, ``Conv1D`` and quantized linears;
* :func:`lr_sweep`: measure a method's learning rate (also ``peftkit tune-lr``).
"""

from peftkit.injection import layer_features
from peftkit.testing.conformance import CHECKS, MERGE_TOLERANCE, check_injector, train_steps
from peftkit.testing.lr_sweep import LrRun, LrSweepResult, lr_sweep
from peftkit.testing.models import FAMILIES, MODEL_FACTORIES, sample_batch, tiny_family_model, tiny_gpt2, tiny_llama
from peftkit.testing.plugins import registered_plugin
from peftkit.testing.reference import assert_matches_reference, greedy_by_full_forward
from peftkit.testing.tokenizers import tiny_tokenizer

__all__ = [
    "CHECKS",
    "MERGE_TOLERANCE",
    "check_injector",
    "train_steps",
    "assert_matches_reference",
    "greedy_by_full_forward",
    "layer_features",
    "lr_sweep",
    "LrRun",
    "LrSweepResult",
    "registered_plugin",
    "FAMILIES",
    "MODEL_FACTORIES",
    "tiny_family_model",
    "sample_batch",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]

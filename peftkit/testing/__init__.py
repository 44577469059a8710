"""Test kit for peftkit and its plugins: tiny models and the injector conformance suite."""

from peftkit.testing.conformance import CHECKS, MERGE_TOLERANCE, check_injector, train_steps
from peftkit.testing.models import FAMILIES, MODEL_FACTORIES, sample_batch, tiny_family_model, tiny_gpt2, tiny_llama
from peftkit.testing.reference import greedy_by_full_forward
from peftkit.testing.tokenizers import tiny_tokenizer

__all__ = [
    "CHECKS",
    "MERGE_TOLERANCE",
    "check_injector",
    "train_steps",
    "greedy_by_full_forward",
    "FAMILIES",
    "MODEL_FACTORIES",
    "tiny_family_model",
    "sample_batch",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_tokenizer",
]

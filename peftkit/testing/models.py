"""Tiny transformers models built from configs, for tests (no downloads, milliseconds to build)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["tiny_llama", "tiny_gpt2", "tiny_family_model", "FAMILIES", "MODEL_FACTORIES", "sample_batch"]


def tiny_llama(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer Llama-style causal LM (grouped-query attention: 4 heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config))
    return model.eval()


def tiny_gpt2(seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-layer GPT-2-style causal LM (``Conv1D`` projections, tied embeddings, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = dict(
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config))
    return model.eval()


FAMILIES = ("opt", "gpt_neox", "falcon", "bloom")


def tiny_family_model(architecture: str, seed: int = 0) -> nn.Module:
    """A 2-layer causal LM of another family (``"opt"``, ``"gpt_neox"``, ``"falcon"``, ``"bloom"``), for layout tables."""
    import transformers as tf

    if architecture not in FAMILIES:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if architecture == "opt":
        config = tf.OPTConfig(num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, **common)
        model = tf.OPTForCausalLM(config)
    elif architecture == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(num_hidden_layers=2, intermediate_size=64, **common))
    elif architecture == "falcon":
        model = tf.FalconForCausalLM(tf.FalconConfig(num_hidden_layers=2, **common))
    else:
        common["n_head"] = common.pop("num_attention_heads")
        model = tf.BloomForCausalLM(tf.BloomConfig(n_layer=2, **common))
    return model.eval()


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def sample_batch(batch_size: int = 2, seq_len: int = 8, vocab_size: int = 128, seed: int = 1) -> dict[str, torch.Tensor]:
    """A deterministic batch: ``input_ids``, ``attention_mask`` (all ones) and ``labels``."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

"""Swapping the method is one line: identical code trains, saves, loads and generates with every built-in."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.testing import sample_batch, tiny_llama

BUILTINS = ["lora", "qlora", "ia3", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning"]


def test_every_builtin_is_installed():
    assert set(BUILTINS) <= set(peftkit.available_methods())


@pytest.mark.parametrize("method", BUILTINS)
def test_same_code_for_every_method(method, tmp_path):
    batch = sample_batch(batch_size=2, seq_len=10)
    # ---- the user code: only `method` changes ----
    tuned = peftkit.wrap(tiny_llama(), method)
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    tuned.train()
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = tuned(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tuned.eval()
    tuned.save(tmp_path / "adapter")
    loaded = peftkit.load(tiny_llama(), tmp_path / "adapter")
    prompt = batch["input_ids"][:, :4]
    out = loaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                          min_new_tokens=3, do_sample=False, pad_token_id=0)
    # ---- what the user relies on ----
    assert losses[-1] < losses[0], f"{method}: loss did not fall: {losses}"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, tuned(input_ids=batch["input_ids"]).logits)
    assert out.shape == (2, 7) and torch.equal(out[:, :4], prompt)

"""The chunked LM loss equals the plain loss in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.training.losses import IGNORE_INDEX, chunked_cross_entropy, decoder_and_head, lm_hidden_states, supports_chunked_loss


def _plain(hidden, head, labels):
    logits = head(hidden)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("chunk_size", [0, 1, 3, 7, 1000])
def test_chunked_equals_plain_in_value_and_gradient(chunk_size):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    expected = _plain(hidden, head, labels)
    g_hidden, g_head = torch.autograd.grad(expected, [hidden, head.weight])

    total, count = chunked_cross_entropy(hidden, head, labels, chunk_size=chunk_size)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    got = total / count
    c_hidden, c_head = torch.autograd.grad(got, [hidden, head.weight])
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert torch.allclose(c_hidden, g_hidden, atol=1e-5, rtol=0)
    assert torch.allclose(c_head, g_head, atol=1e-5, rtol=0)


def test_no_targets_gives_zero_count():
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    total, count = chunked_cross_entropy(hidden, torch.nn.Linear(4, 6), torch.full((2, 5), IGNORE_INDEX), chunk_size=2)
    assert count == 0 and float(total.detach()) == 0.0


def test_matches_the_models_own_loss_through_lora():
    import peftkit
    from peftkit.testing import sample_batch, tiny_llama

    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, init="gaussian")  # nonzero B: the adapter changes the output
    tuned.train()
    batch = sample_batch(batch_size=2, seq_len=12)
    batch["labels"][:, :5] = IGNORE_INDEX
    plain = tuned(**batch).loss
    plain_grads = torch.autograd.grad(plain, tuned.trainable_parameters())

    assert supports_chunked_loss(tuned)
    _, head = decoder_and_head(tuned)
    total, count = chunked_cross_entropy(lm_hidden_states(tuned, batch), head, batch["labels"], chunk_size=4)
    chunked = total / count
    chunked_grads = torch.autograd.grad(chunked, tuned.trainable_parameters())
    assert torch.allclose(chunked, plain, atol=1e-5, rtol=0)
    for a, b in zip(chunked_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_models_that_rescale_logits_are_not_chunked():
    from peftkit.testing import tiny_llama

    model = tiny_llama()
    assert supports_chunked_loss(model)
    model.config.final_logit_softcapping = 30.0
    assert not supports_chunked_loss(model)

"""LoRA: conformance, agreement with Hugging Face peft, dropout without a saved copy, merge on Conv1D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.errors import OptionsError
from peftkit.testing import CHECKS, check_injector, sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.lora import dropout as lora_dropout

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("lora", model_factory=MODELS[model], checks=[check], r=4)


@pytest.mark.parametrize("model", MODELS)
def test_conformance_with_dropout_rslora_gaussian(model):
    targets = ["q_proj", "v_proj"] if model == "llama" else ["c_attn"]
    check_injector(
        "lora", model_factory=MODELS[model], r=4, dropout=0.1, use_rslora=True, init="gaussian", target_modules=targets
    )


@pytest.mark.parametrize("model", MODELS)
def test_matches_peft_reference(model):
    """Identical LoRA weights in peftkit and peft give the same logits (1e-5) and the same greedy tokens."""
    peft = pytest.importorskip("peft")
    factory = MODELS[model]
    batch = sample_batch(batch_size=3, seq_len=12)
    ours = peftkit.wrap(factory(), "lora", r=4, alpha=8, target_modules="all-linear")
    train_steps(ours, batch)  # make B non-zero so the check means something
    targets = sorted({k.split(".")[-3] for k in ours.adapter_state_dict()})
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=(model == "gpt2")
    )
    reference = peft.get_peft_model(factory(), config)
    ref_state = reference.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            module, _, leaf = key.rpartition(".")  # ...q_proj.lora_A, weight
            peft_key = f"base_model.model.{module}.default.{leaf}"
            assert peft_key in ref_state, peft_key
            ref_state[peft_key].copy_(tensor)
    reference.eval()
    with torch.no_grad():
        got = ours(input_ids=batch["input_ids"]).logits
        want = reference(input_ids=batch["input_ids"]).logits
    assert (got - want).abs().max() < 1e-5
    prompt = batch["input_ids"][:, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **kwargs), reference.generate(input_ids=prompt, **kwargs))


def test_dropout_linear_matches_explicit_dropout():
    """Fused dropout gives F.linear(mask * x / keep, A) and the same gradients, with the same mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    a = torch.randn(3, 8, requires_grad=True)
    p = 0.3
    torch.manual_seed(123)
    h = lora_dropout.dropout_linear(x, a, p)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = lora_dropout._mask(x.detach(), 1 - p, seed)
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    h2 = F.linear(x2 * mask / (1 - p), a2)
    assert torch.allclose(h, h2, atol=1e-6)
    g = torch.randn_like(h)
    h.backward(g)
    h2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(a.grad, a2.grad, atol=1e-5)
    assert 0.5 < mask.mean() < 0.9


def test_dropout_saves_no_copy_of_the_input():
    x = torch.randn(4, 16, 32)
    a = torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_dropout.dropout_linear(x, a, 0.1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only x itself (not a dropped copy) is saved"


def test_no_dropout_work_when_dropout_is_zero(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("dropout ran with dropout=0")

    monkeypatch.setattr("peftkit_plugins.lora.layer.dropout_linear", fail)
    tuned = peftkit.wrap(tiny_llama().train(), "lora", dropout=0.0)
    tuned(**sample_batch()).loss.backward()


def test_dropout_only_in_training_mode():
    tuned = peftkit.wrap(tiny_llama(), "lora", dropout=0.5)
    batch = sample_batch()
    train_steps(tuned, batch)
    with torch.no_grad():
        a = tuned(input_ids=batch["input_ids"]).logits
        b = tuned(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)


def test_conv1d_merge_uses_transposed_delta():
    tuned = peftkit.wrap(tiny_gpt2(), "lora", r=2, target_modules=["c_attn"])
    layer = tuned.base_model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 32)
    expected = layer(x)
    tuned.merge()
    assert torch.allclose(layer.base_layer(x), expected, atol=1e-5)


def test_rslora_scaling():
    a = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, target_modules=["q_proj"])
    b = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, use_rslora=True, target_modules=["q_proj"])
    layer_a = a.base_model.model.layers[0].self_attn.q_proj
    layer_b = b.base_model.model.layers[0].self_attn.q_proj
    assert layer_a.scaling["default"] == 2.0 and layer_b.scaling["default"] == 4.0


def test_option_validation_reports_all_problems():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "lora", r=0, alpha=-1, bias="all", target_modules=[])
    problems = info.value.problems
    assert problems == [
        "option 'bias' = 'all' is not valid; expected 'none'",
        "option 'r' = 0 must be >= 1",
        "option 'alpha' = -1.0 must be > 0",
        "option 'target_modules' = [] is empty; name at least one module or use 'all-linear'",
    ]

"""``assert_matches_reference``: agreement with peft's LoRA and with plain modules; the failure names the largest gap."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import peftkit
from peftkit.testing import assert_matches_reference, sample_batch, tiny_gpt2, tiny_llama, train_steps

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _peft_twin(ours: peftkit.TunedModel, factory, model: str):
    """peft's LoRA on a fresh base, holding exactly ``ours``' adapter weights (as tests/plugins/test_lora.py does)."""
    peft = pytest.importorskip("peft")
    targets = sorted({k.split(".")[-3] for k in ours.adapter_state_dict()})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=(model == "gpt2"))
    reference = peft.get_peft_model(factory(), config)
    state = reference.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            module, _, leaf = key.rpartition(".")
            state[f"base_model.model.{module}.default.{leaf}"].copy_(tensor)
    return reference


@pytest.mark.parametrize("model", MODELS)
def test_peftkit_lora_matches_peft_lora_with_the_same_weights(model):
    batch = sample_batch(batch_size=2, seq_len=10)
    ours = peftkit.wrap(MODELS[model](), "lora", r=4, alpha=8, target_modules="all-linear")
    train_steps(ours, batch)  # B != 0, so the adapters matter
    reference = _peft_twin(ours, MODELS[model], model)
    assert_matches_reference(ours, reference, batch)


def test_a_perturbed_lora_weight_fails_naming_the_largest_difference():
    batch = sample_batch(batch_size=2, seq_len=10)
    ours = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, target_modules="all-linear")
    train_steps(ours, batch)
    reference = _peft_twin(ours, tiny_llama, "llama")
    with torch.no_grad():
        next(p for n, p in reference.named_parameters() if "lora_B" in n).add_(0.5)
    with torch.no_grad():
        gap = (ours(**batch).logits - reference(**batch).logits).abs()
    with pytest.raises(AssertionError) as info:
        assert_matches_reference(ours, reference, batch, atol=1e-5)
    message = str(info.value)
    stated = float(re.search(r"by up to (\S+) at index", message).group(1))
    assert stated == pytest.approx(float(gap.max()), rel=1e-5)
    index = tuple(int(i) for i in re.search(r"at index \(([\d, ]+)\)", message).group(1).split(","))
    assert gap[index] == gap.max()
    assert "atol=1e-05" in message


class _Affine(nn.Module):
    """A reference written from a formula, returning a bare tensor."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.dropout = nn.Dropout(0.5)  # makes train mode visible in the output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x @ self.weight.T)


def test_plain_modules_returning_tensors_are_compared_in_eval_mode_and_modes_are_restored():
    torch.manual_seed(0)
    weight = torch.randn(4, 3)
    tuned, reference = _Affine(weight).train(), _Affine(weight).eval()
    batch = {"x": torch.randn(5, 3)}
    assert_matches_reference(tuned, reference, batch)  # dropout off, or the outputs would differ
    assert tuned.training and not reference.training


def test_the_tolerance_decides_and_modes_are_restored_after_a_failure():
    torch.manual_seed(0)
    weight = torch.randn(4, 3)
    tuned, reference = _Affine(weight).train(), _Affine(weight + 1e-3).train()
    batch = {"x": torch.ones(2, 3)}
    with pytest.raises(AssertionError, match=r"index \(\d+, \d+\).*atol=1e-05"):
        assert_matches_reference(tuned, reference, batch)
    assert tuned.training and reference.training
    assert_matches_reference(tuned, reference, batch, atol=1e-2)
    assert_matches_reference(tuned, reference, batch, atol=0.0, rtol=1.0)


def test_a_nan_output_never_matches():
    weight = torch.ones(2, 2)
    tuned, reference = _Affine(weight), _Affine(weight)
    with torch.no_grad():
        tuned.weight[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="by up to nan"):
        assert_matches_reference(tuned, reference, {"x": torch.ones(1, 2)})


def test_different_shapes_are_an_assertion_naming_both():
    tuned, reference = _Affine(torch.ones(2, 3)), _Affine(torch.ones(4, 3))
    with pytest.raises(AssertionError, match=r"shape \(1, 2\).*\(1, 4\)"):
        assert_matches_reference(tuned, reference, {"x": torch.ones(1, 3)})

"""Adapters move to and from the Hugging Face peft directory format, and run the same in both libraries."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.errors import AdapterFormatError, UnknownMethodError
from peftkit.testing import sample_batch, tiny_gpt2, tiny_llama, train_steps

peft = pytest.importorskip("peft")
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("model", MODELS)
def test_lora_export_runs_in_peft(model, tmp_path):
    factory = MODELS[model]
    batch = sample_batch()
    tuned = peftkit.wrap(factory(), "lora", r=4, alpha=8, use_rslora=True)
    train_steps(tuned, batch)
    peftkit.export_peft(tuned, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    assert config["fan_in_fan_out"] is (model == "gpt2")
    reference = peft.PeftModel.from_pretrained(factory(), tmp_path / "exported").eval()
    assert (logits(reference, batch) - logits(tuned, batch)).abs().max() < 1e-5


@pytest.mark.parametrize("model", MODELS)
def test_peft_lora_imports_bit_exact(model, tmp_path):
    factory = MODELS[model]
    batch = sample_batch()
    targets = ["q_proj", "v_proj"] if model == "llama" else ["c_attn"]
    reference = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                                 fan_in_fan_out=(model == "gpt2")))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_()
    reference.save_pretrained(tmp_path / "peft")
    reference.eval()
    tuned = peftkit.import_peft(factory(), tmp_path / "peft")
    assert tuned.adapter_info("default").options.alpha == 16
    assert (logits(tuned, batch) - logits(reference, batch)).abs().max() < 1e-5
    # ... and back out, bit-exact.
    peftkit.export_peft(tuned, tmp_path / "again")
    from safetensors.torch import load_file

    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    again = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)


def test_unsupported_peft_features_are_named(tmp_path):
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    reference.save_pretrained(tmp_path / "dora")
    with pytest.raises(AdapterFormatError, match="use_dora=True"):
        peftkit.import_peft(tiny_llama(), tmp_path / "dora")


def test_unknown_peft_type(tmp_path):
    reference = peft.get_peft_model(tiny_llama(), peft.LoHaConfig(r=4, target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "loha")
    with pytest.raises(UnknownMethodError, match="peft_type='LOHA', which no installed method imports; importable peft types: .*LORA"):
        peftkit.import_peft(tiny_llama(), tmp_path / "loha")


def test_import_onto_wrong_model_leaves_it_untouched(tmp_path):
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "peft")
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    with pytest.raises(AdapterFormatError, match="q_proj"):
        peftkit.import_peft(model, tmp_path / "peft")
    assert all(type(m).__name__ != "LoraLayer" for m in model.modules())


def test_missing_files(tmp_path):
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        peftkit.import_peft(tiny_llama(), tmp_path)


ROUND_TRIPS = {
    # method: (options, virtual positions that peft's logits carry in front)
    "ia3": ({}, 0),
    "prompt_tuning": ({"num_virtual_tokens": 5}, 5),
    "p_tuning": ({"num_virtual_tokens": 5, "encoder_hidden_size": 16}, 5),
    "prefix_tuning": ({"num_virtual_tokens": 4, "projection": True}, 0),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ROUND_TRIPS)
def test_round_trips_through_peft(method, model, tmp_path):
    """Exported adapters run in peft with the same logits (1e-5); peft's save imports back bit-exact."""
    factory = MODELS[model]
    options, virtual = ROUND_TRIPS[method]
    batch = sample_batch()
    tuned = peftkit.wrap(factory(), method, **options)
    train_steps(tuned, batch)
    peftkit.export_peft(tuned, tmp_path / "exported")
    reference = peft.PeftModel.from_pretrained(factory(), tmp_path / "exported").eval()
    theirs = logits(reference, batch)[:, virtual:]
    assert (theirs - logits(tuned, batch)).abs().max() < 1e-5
    reference.save_pretrained(tmp_path / "peft")
    back = peftkit.import_peft(factory(), tmp_path / "peft")
    assert torch.equal(logits(back, batch), logits(tuned, batch))

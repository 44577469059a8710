"""TunedModel: the public API a user relies on (wrap, adapters, merge, disable, summary)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import AdapterError, OptionsError, UnknownMethodError
from peftkit.testing import sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.lora import LoraOptions


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_wrap_freezes_base_and_only_adapter_trains():
    model = tiny_llama()
    tuned = peftkit.wrap(model, "lora", r=2, target_modules=["q_proj", "v_proj"])
    names = [n for n, _ in tuned.named_trainable_parameters()]
    assert names and all(".lora_" in n for n in names)
    assert len(names) == 2 * 2 * 2  # A and B, q and v, 2 layers
    assert tuned.active_adapter == "default" and tuned.adapters == {"default": "lora"}


def test_parameter_summary_counts():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    trainable = sum(p.numel() for p in tuned.trainable_parameters())
    total = sum(p.numel() for p in tuned.parameters())
    assert trainable == 2 * (2 * 32 + 32 * 2)
    assert tuned.parameter_summary() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


def test_unknown_option_lists_valid_ones_and_leaves_model_untouched():
    model = tiny_llama()
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(model, "lora", alhpa=4, dropout=2.0)
    text = str(info.value)
    assert "unknown option 'alhpa' (did you mean 'alpha'?)" in text and "valid options:" in text
    assert "'dropout' = 2.0 must be in [0, 1)" in text, "every problem is reported at once"
    assert all(p.requires_grad for p in model.parameters()), "a failed wrap must restore the model"


def test_bad_option_type_names_option_value_and_allowed():
    with pytest.raises(OptionsError, match=r"option 'init' = 'xavier' is not valid; expected 'default' \| 'gaussian'"):
        peftkit.wrap(tiny_llama(), "lora", init="xavier")


def test_wrap_accepts_options_object():
    tuned = peftkit.wrap(tiny_llama(), LoraOptions(r=3, target_modules=["q_proj"]))
    assert tuned.adapter_info("default").options.r == 3
    with pytest.raises(OptionsError):
        peftkit.wrap(tiny_llama(), LoraOptions(r=0))


def test_unknown_method():
    with pytest.raises(UnknownMethodError, match="unknown method 'nope'"):
        peftkit.wrap(tiny_llama(), "nope")


def test_multiple_adapters_switch_and_delete():
    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    train_steps(tuned, batch)
    tuned.add_adapter("other", "lora", r=4, target_modules=["q_proj"])
    assert tuned.active_adapter == "default", "add_adapter does not switch the active adapter"
    first = logits(tuned, batch)
    tuned.set_adapter("other")
    fresh = logits(tuned, batch)
    with tuned.disable_adapters():
        base = logits(tuned, batch)
    assert torch.equal(fresh, base), "the new adapter starts at the base (B = 0)"
    assert not torch.equal(first, fresh)
    tuned.set_adapter("default")
    assert torch.equal(logits(tuned, batch), first)
    tuned.delete_adapter("default")
    assert tuned.adapters == {"other": "lora"} and tuned.active_adapter == "other"
    with pytest.raises(AdapterError, match="no adapter named 'default'; this model has: other"):
        tuned.set_adapter("default")


def test_duplicate_and_invalid_adapter_names():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    with pytest.raises(AdapterError, match="already exists"):
        tuned.add_adapter("default", "lora")
    with pytest.raises(AdapterError, match="without '.'"):
        tuned.add_adapter("a.b", "lora")


def test_frozen_adapter_does_not_train():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    tuned.add_adapter("ref", "lora", r=2, trainable=False)
    names = {n for n, _ in tuned.named_trainable_parameters()}
    assert names and all(".default" in n for n in names)
    tuned.set_trainable("ref", True)
    assert any(".ref" in n for n, _ in tuned.named_trainable_parameters())


def test_merged_state_guards():
    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    train_steps(tuned, batch)
    tuned.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        with tuned.disable_adapters():
            pass
    with pytest.raises(AdapterError, match="unmerge"):
        tuned.save("/nonexistent/never-written")
    with pytest.raises(AdapterError, match="unmerge"):
        tuned.add_adapter("x", "lora")
    tuned.unmerge()
    assert tuned.merged_adapters == []


def test_attributes_fall_through_to_base_model():
    model = tiny_gpt2()
    tuned = peftkit.wrap(model, "lora", r=2)
    assert tuned.config is model.config
    assert tuned.base_model is model


def test_training_mode_follows_the_base_model():
    model = tiny_llama().train()
    tuned = peftkit.wrap(model, "lora", dropout=0.1)
    assert tuned.training and all(m.training for m in tuned.modules())
    model = tiny_llama()  # eval mode
    tuned = peftkit.wrap(model, "lora", dropout=0.1)
    assert not any(m.training for m in tuned.modules())


def test_merge_is_all_or_nothing(monkeypatch):
    from peftkit_plugins.lora.layer import LoraLayer

    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    train_steps(tuned, batch)
    expected = logits(tuned, batch)
    layers = [m for m in tuned.modules() if isinstance(m, LoraLayer)]
    real_merge = LoraLayer.merge

    def refuse_last(self, name):
        if self is layers[-1]:
            raise RuntimeError("this layer cannot merge")
        real_merge(self, name)

    monkeypatch.setattr(LoraLayer, "merge", refuse_last)
    with pytest.raises(RuntimeError, match="cannot merge"):
        tuned.merge()
    assert tuned.merged_adapters == []
    assert torch.allclose(logits(tuned, batch), expected, atol=1e-6)
    assert all(not layer._merged for layer in layers)


# ------------------------------------------------------------------ Hugging Face conventions
def test_forward_shows_the_base_signature_and_labels():
    import inspect

    from transformers.utils.generic import find_labels

    model = tiny_llama()
    tuned = peftkit.wrap(model, "lora", r=2)
    assert inspect.signature(tuned.forward) == inspect.signature(model.forward)
    assert find_labels(type(tuned)) == ["labels"], "transformers.Trainer finds label arguments on the class"
    batch = sample_batch()
    direct = tuned.base_model(**batch)
    for got in (tuned(**batch), tuned(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])):
        assert torch.equal(got.logits, direct.logits) and torch.equal(got.loss, direct.loss)
    copied = __import__("copy").deepcopy(tuned)
    assert copied.forward.__self__ is copied, "a copy calls its own modules"


def test_peft_style_names():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    train_steps(tuned, sample_batch())
    assert tuned.get_base_model() is tuned.base_model
    assert tuned.active_adapters == ["default"]
    with tuned.disable_adapter():
        bare = logits(tuned, sample_batch())
    with tuned.disable_adapters():
        assert torch.equal(logits(tuned, sample_batch()), bare)
    assert not torch.equal(logits(tuned, sample_batch()), bare)


def test_save_pretrained_keeps_other_files_and_from_pretrained_loads(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    train_steps(tuned, sample_batch())
    tuned.eval()
    fresh = tmp_path / "fresh"
    tuned.save_pretrained(fresh)  # a new directory: the atomic save
    shared = tmp_path / "shared"
    (shared / "checkpoint-1").mkdir(parents=True)
    (shared / "tokenizer.json").write_text("{}")
    tuned.save_pretrained(shared)
    tuned.save_pretrained(shared)  # again: replaces the adapter files only
    assert sorted(p.name for p in shared.iterdir()) == ["adapter.safetensors", "adapter_config.json", "checkpoint-1", "tokenizer.json"]
    for directory in (fresh, shared):
        again = peftkit.TunedModel.from_pretrained(tiny_llama(), directory)
        assert torch.equal(logits(again, sample_batch()), logits(tuned, sample_batch()))
    tuned.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()

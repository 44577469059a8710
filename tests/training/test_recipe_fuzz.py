"""The recipe fuzzer (issue 9): seeded mutants of every shipped recipe through ``peftkit validate``.

Every mutant must end in exit 2 with ``peftkit: error: ...`` (problems listed on the lines after) or in exit 0
for a recipe whose every value is usable; never a traceback, never an exception escaping ``main``, never a hang
(parsing is bounded, so no mutant can make validation run long). Mutants that are invalid by construction (a
NaN, a duplicate key, an alias bomb, a byte that is not UTF-8, ...) must give exit 2.

The default suite runs a few hundred mutants; ``-m slow`` runs more, plus the check that accepted numbers train:
two optimizer steps on a tiny model with the values validation let through, loss and adapter finite.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from peftkit.cli import main
from peftkit.options import MAX_INT
from peftkit.training._bounded_yaml import MAX_DEPTH
from peftkit.training.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {path.name: path.read_text() for path in sorted((ROOT / "recipes").glob("*.yaml"))}


@dataclass
class Mutant:
    """A recipe file's bytes, the CLI overrides, and whether the mutation alone makes it invalid."""

    data: bytes
    overrides: list[str] = field(default_factory=list)
    must_fail: bool = False
    what: str = ""


# ------------------------------------------------------------------ mutations
def _leaf_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in _leaf_paths(value, (*prefix, key))]
    return [prefix] if prefix else []


def _get(raw: dict, path: tuple) -> Any:
    for key in path:
        raw = raw[key]
    return raw


def _set(raw: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        raw = raw[key]
    raw[path[-1]] = value


def _delete(raw: dict, path: tuple) -> None:
    for key in path[:-1]:
        raw = raw[key]
    del raw[path[-1]]


def _dump(raw: Any) -> bytes:
    return yaml.safe_dump(raw, allow_unicode=True, sort_keys=False).encode("utf-8")


NON_FINITE = [math.nan, math.inf, -math.inf]
ABSURD_INTS = [2**63, -(2**63) - 1, 10**400]
ODD_VALUES = st.one_of(
    st.sampled_from([None, "", " ", True, False, 0, -1, 1, 0.0, -0.0, 1e-300, 1e300, 2**32, 2**63 - 1, -(2**63 - 1), 1e-5, 0.5, 1.0, 65536, 65537]),
    st.sampled_from([[], {}, [1, 2], {"a": 1}, "auto", "lora", "ia3", "float16", "runs/x", "data/arithmetic/train.jsonl",
                     "a" * 5000 + ".jsonl", "x/" + "a" * 300, "~no-such-user/x.jsonl", "/root", "/proc/self/mem.jsonl"]),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.dates(),
)
TAGS = ["!!int", "!!float", "!!bool", "!!str", "!!null", "!!timestamp", "!!binary", "!!set", "!!omap", "!!pairs", "!!seq", "!!map",
        "!!merge", "!!value", "!!python/object:os.system", "!custom", "!<tag:yaml.org,2002:int>", "!"]
RAW_VALUES = st.one_of(
    st.builds("{} {}".format, st.sampled_from(TAGS), st.sampled_from(["", "x", "1", "-1", "1.5", "[1]", "{a: 1}", "2001-13-45", "aGk=", "~", "[", "yes", ".nan"])),
    st.sampled_from(["2001-02-30", "2001-1-1 25:00:00", "0o19", "0x", "0b12", "1_", "._1", "+.inf", "1e", "1:30", "190:20:30", "=", "<<", "? x", "- a",
                     "|", ">", "'", '"', '"\\x"', '"\\u12"', '"\\U0011ffff"', "&", "*", "*nope", "%TAG", "@x", "`x", "{", "[a, {b: [c]}]"]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
)
NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, -0.5, 0.0, 1e-12, 0.999, 1.0, 1.5, 7, 2**31, 2**32 - 1, 2**32, 2**53, 10**9, 10**9 + 1, 10**12, 1e30, 1e308, -1e308]),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
)


@st.composite
def mutants(draw: st.DrawFn) -> Mutant:
    name = draw(st.sampled_from(sorted(RECIPES)))
    text = RECIPES[name]
    raw = yaml.safe_load(text)
    paths = _leaf_paths(raw)
    kind = draw(
        st.sampled_from(
            ["number", "number", "number", "delete", "odd", "non_finite", "absurd_int", "nul", "unicode", "unknown_key", "wrong_section", "duplicate_section",
             "duplicate_key", "shared_alias", "raw_value", "raw_value", "alias_bomb", "recursive_alias", "non_mapping", "deep", "not_utf8", "overrides", "nested_junk"]
        )
    )
    if kind == "delete":
        for path in draw(st.lists(st.sampled_from(paths), min_size=1, max_size=4, unique=True)):
            with contextlib.suppress(KeyError, TypeError):
                _delete(raw, path)
        return Mutant(_dump(raw), what=kind)
    if kind == "number":
        numeric = [p for p in paths if isinstance(_get(raw, p), (int, float)) and not isinstance(_get(raw, p), bool)]
        path, value = draw(st.sampled_from(numeric)), draw(NUMBERS)
        if draw(st.booleans()):
            return Mutant(text.encode(), overrides=[f"{'.'.join(path)}={value!r}"], what=f"{kind} {path}={value!r}")
        _set(raw, path, value)
        return Mutant(_dump(raw), what=f"{kind} {path}={value!r}")
    if kind == "odd":
        path = draw(st.sampled_from(paths))
        _set(raw, path, draw(ODD_VALUES))
        return Mutant(_dump(raw), what=f"{kind} {path}")
    if kind in ("non_finite", "absurd_int", "nul"):
        path = draw(st.sampled_from(paths))
        value = draw(st.sampled_from({"non_finite": NON_FINITE, "absurd_int": ABSURD_INTS, "nul": ["runs/a\0b", "\0", "a\0"]}[kind]))
        if draw(st.booleans()):
            value = [value] if draw(st.booleans()) else {"k": value}
        _set(raw, path, value)
        return Mutant(_dump(raw), must_fail=True, what=f"{kind} {path}")
    if kind == "unicode":
        path = draw(st.sampled_from(paths))
        _set(raw, path, draw(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20)))
        return Mutant(_dump(raw), what=f"{kind} {path}")
    if kind == "unknown_key":
        section = draw(st.sampled_from([k for k, v in raw.items() if isinstance(v, dict)]))
        raw[section][draw(st.sampled_from(["lrr", "nmae", "ép", "x" * 50, "1"]))] = 1
        return Mutant(_dump(raw), must_fail=True, what=kind)
    if kind == "wrong_section":
        section = draw(st.sampled_from(sorted(raw)))
        raw[section] = draw(st.sampled_from([[1, 2], "text", 3, 1.5, True, [{"a": 1}]]))
        return Mutant(_dump(raw), must_fail=True, what=f"{kind} {section}")
    if kind == "duplicate_section":
        section = draw(st.sampled_from(sorted(raw)))
        return Mutant(text.encode() + _dump({section: raw[section]}), must_fail=True, what=kind)
    if kind == "duplicate_key":
        lines = text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if line.startswith("  ") and ":" in line and not line.lstrip().startswith("#")]
        i = draw(st.sampled_from(candidates))
        lines.insert(i + 1, lines[i])  # the same key twice in one mapping, whatever its value
        return Mutant("".join(lines).encode(), must_fail=True, what=f"{kind} line {i + 1}")
    if kind == "shared_alias":
        a, b = draw(st.sampled_from(paths)), draw(st.sampled_from(paths))
        shared = draw(st.sampled_from([[1, 2, 3], {"x": [1, 2]}, ["a", "b"]]))
        _set(raw, a, shared)
        _set(raw, b, shared)  # safe_dump writes an anchor and an alias
        return Mutant(_dump(raw), what=kind)
    if kind == "alias_bomb":
        width, levels = draw(st.integers(8, 12)), draw(st.integers(7, 10))
        lines = ["bomb:", "  l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
        lines += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
        alias = f"*l{levels - 1}"
        body = draw(st.sampled_from([text.replace("load_kwargs: {}", f"load_kwargs: {{x: {alias}}}"), re.sub(r"^  lr: \S+", f"  lr: {alias}", text, flags=re.M)]))
        return Mutant(("\n".join(lines) + "\n" + body).encode(), must_fail=True, what=kind)
    if kind == "recursive_alias":
        return Mutant(text.encode() + b"\nextra: &r [1, *r]\n", must_fail=True, what=kind)
    if kind == "non_mapping":
        data = draw(st.sampled_from([b"", b"null\n", b"- 1\n- 2\n", b"42\n", b"'text'\n", b"---\n---\n", b"[1, {a: 1}]\n", b"!!binary aGk=\n"]))
        return Mutant(data, must_fail=True, what=kind)
    if kind == "deep":
        depth = draw(st.integers(1, 3 * MAX_DEPTH))
        path = draw(st.sampled_from(paths))
        value: Any = 1
        for _ in range(depth):
            value = [value] if draw(st.booleans()) else {"k": value}
        _set(raw, path, value)
        return Mutant(_dump(raw), must_fail=depth + len(path) >= MAX_DEPTH, what=f"{kind} {depth}")
    if kind == "not_utf8":
        data = text.encode()
        at = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\x80", b"\xed\xa0\x80"]))
        return Mutant(data[:at] + byte + data[at:], must_fail=True, what=kind)
    if kind == "raw_value":
        lines = text.splitlines(keepends=True)
        i = draw(st.sampled_from([i for i, line in enumerate(lines) if re.match(r"^ +\w+: \S", line)]))
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {draw(RAW_VALUES)}\n"
        return Mutant("".join(lines).encode(), what=f"{kind} {lines[i]!r}")
    if kind == "nested_junk":
        junk = draw(st.sampled_from(["!!python/object:os.system {}", "!!set {a, b}", "!!binary aGk=", "!!timestamp 2001-12-14", "2001-13-45", "!!float abc", "!!bool maybe", "!!timestamp x", "&a 1", "? [1, 2]\n  : x", "{a: [}"]))
        key = draw(st.sampled_from(["dir", "name_or_path"]))  # text fields: none of the junk is a usable text
        return Mutant(re.sub(rf"^  {key}: .*$", f"  {key}: {junk}", text, flags=re.M).encode(), must_fail=True, what=f"{kind} {junk}")
    return Mutant(text.encode(), overrides=draw(st.lists(bad_overrides(paths), min_size=1, max_size=4)), what=kind)


@st.composite
def bad_overrides(draw: st.DrawFn, paths: list[tuple]) -> str:
    key = ".".join(map(str, draw(st.sampled_from(paths)))) if draw(st.booleans()) else draw(st.sampled_from(["train", "x.y", "", ".", "a..b", "train.lr.x", "method.options", "output.dir", "method.name"]))
    value = draw(
        st.one_of(
            st.sampled_from([".nan", ".inf", "-.inf", "1" + "0" * 400, "1" + "0" * 5000, "-1", "0", "", "[", "{", "}", "[" * 200 + "]" * 200, "&a [*a]", "{a: 1, a: 2}",
                             "'\\0'", '"a\\0b"', "ia3", "prompt_tuning", "nope", "runs/{method}", "runs/{x}", "null", "~", "[1, 2]", "{}", "!!binary aGk=",
                             "2001-01-01", "2001-02-30", "!!int x", "!!omap [1]", "0x10", "1e999", "1_000", "yes", "\t", "caf\udce9", "\udcff", "\ud800", "'" + "x" * 300 + "'"]),
            st.text(max_size=15).filter(lambda v: "\0" not in v),
        )
    )
    form = draw(st.sampled_from(["{k}={v}", "{k}", "={v}", "{k}=={v}", "{k} = {v}"]))
    return form.format(k=key, v=value)


# ------------------------------------------------------------------ the property
def _walk(value: Any) -> list[Any]:
    if is_dataclass(value):
        return [x for f in fields(value) for x in _walk(getattr(value, f.name))]
    if isinstance(value, dict):
        return [x for item in (*value, *value.values()) for x in _walk(item)]
    if isinstance(value, (list, tuple)):
        return [x for item in value for x in _walk(item)]
    return [value]


def _assert_usable(recipe: Any) -> None:
    """What exit 0 promises about every value of the recipe."""
    for value in _walk(recipe.to_dict()) + _walk(recipe.method_options) + _walk(recipe.objective_options):
        if isinstance(value, float):
            assert math.isfinite(value), value
        if isinstance(value, int):
            assert abs(value) <= MAX_INT, value
        if isinstance(value, str):
            assert "\0" not in value
    assert recipe.output.dir.strip() and "{" not in recipe.output.dir.replace("{{", "")
    assert 0 <= recipe.train.seed < 2**32 and 0 < recipe.train.lr <= 1


def _run_validate(path: Path, overrides: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["validate", str(path), *overrides])
    return code, out.getvalue(), err.getvalue()


def check_mutant(mutant: Mutant, folder: Path) -> None:
    path = folder / "mutant.yaml"
    path.write_bytes(mutant.data)
    code, out, err = _run_validate(path, mutant.overrides)  # an exception escaping main fails the test here
    assert "Traceback" not in err + out, err
    if code == 2:
        first = err.splitlines()[0] if err else ""
        assert first.startswith("peftkit: error: "), err  # the problems follow on their own lines
        return
    assert code == 0, (code, err)
    assert not mutant.must_fail, f"{mutant.what}: accepted, but the mutation alone makes it invalid\n{out}"
    with contextlib.chdir(ROOT):
        _assert_usable(load_recipe(path, mutant.overrides))


SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, **SETTINGS)
@given(mutant=mutants())
def test_mutated_recipes_fail_cleanly_or_are_usable(mutant, folder):
    check_mutant(mutant, folder)


@pytest.mark.slow
@seed(20261203)
@settings(max_examples=1500, **{**SETTINGS, "derandomize": False})
@given(mutant=mutants())
def test_many_more_mutated_recipes_fail_cleanly_or_are_usable(mutant, folder):
    check_mutant(mutant, folder)


# ------------------------------------------------------------------ accepted numbers train
# The numbers a recipe accepts at and around its bounds, per key; sizes (rank, virtual tokens) stay small
# because their bounds are about memory, not about whether the arithmetic stays finite. The SFT recipes
# train here; PPO and reward runs need other runs' adapters, so their numbers rest on the bounds in
# PPOOptions.validate, and the trainer's finite checks turn anything that still diverges into an error.
TRAIN_NUMBERS = {
    "train.lr": st.one_of(st.sampled_from([1e-12, 1e-6, 1e-3, 0.3, 1.0, 1.5]), st.floats(1e-12, 1.0)),
    "train.weight_decay": st.sampled_from([0.0, 0.01, 0.5, 1.0, 2.0]),
    "train.max_grad_norm": st.sampled_from([None, 1e-300, 1e-6, 1.0, 1e30, 1e300]),
    "train.warmup_steps": st.sampled_from([0, 1, 2, 10**9]),
    "train.scheduler": st.sampled_from(["constant", "constant_with_warmup", "linear", "cosine"]),
    "train.seed": st.sampled_from([0, 1, 2**32 - 1, 2**32]),
    "train.gradient_accumulation_steps": st.sampled_from([1, 2]),
    "objective.options.lm_weight": st.sampled_from([0.0, 0.5, 1000.0, 1001.0]),
}
METHOD_NUMBERS = {
    "lora": {"alpha": st.sampled_from([1e-12, 1.0, 16.0, 65536.0, 65537.0]), "dropout": st.sampled_from([0.0, 0.5, 0.999]), "r": st.sampled_from([1, 4])},
    "ia3": {},
    "adapter": {"reduction_factor": st.sampled_from([0.01, 1.0, 16.0, 1e30])},
    "prompt_tuning": {"num_virtual_tokens": st.sampled_from([1, 4])},
    "p_tuning": {"num_virtual_tokens": st.sampled_from([1, 4])},
    "prefix_tuning": {"num_virtual_tokens": st.sampled_from([1, 4]), "init": st.sampled_from(["random", "activations"])},
}


@st.composite
def numeric_overrides(draw: st.DrawFn) -> tuple[str, list[str]]:
    method = draw(st.sampled_from(sorted(METHOD_NUMBERS)))
    chosen = draw(st.lists(st.sampled_from(sorted(TRAIN_NUMBERS)), min_size=1, max_size=5, unique=True))
    overrides = [f"{key}={draw(TRAIN_NUMBERS[key])!r}".replace("None", "null") for key in chosen]
    overrides += [f"method.options.{key}={draw(value)}" for key, value in METHOD_NUMBERS[method].items()]
    return f"sft-{method.replace('_', '-')}.yaml", overrides


def _tiny_run_overrides(folder: Path) -> list[str]:
    data = folder / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "what is {a} plus {a}?", "response": "{2 * a}"}}\n' for a in range(12)))
    return [f"data.train={data}", "data.eval=null", "data.eval_size=4", "data.max_length=32", "train.max_steps=2",
            "train.batch_size=4", "train.eval_batch_size=4", f"output.dir={folder / 'run'}", "output.save_every=0",
            "output.eval_every=0", "output.log_every=1", "output.plot=false"]


@pytest.mark.slow
@seed(9)
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=numeric_overrides())
def test_numbers_validation_accepts_train_to_a_finite_loss_and_adapter(case, tmp_path_factory):
    """Exit 0 of validate means the values train: two optimizer steps on a tiny model stay finite."""
    from safetensors.torch import load_file

    from peftkit.testing import tiny_llama, tiny_tokenizer
    from peftkit.training.trainer import Trainer

    name, overrides = case
    folder = tmp_path_factory.mktemp("train")
    with contextlib.chdir(ROOT):
        try:
            recipe = load_recipe(ROOT / "recipes" / name, overrides + _tiny_run_overrides(folder))
        except RecipeError:
            assume(False)  # refused: nothing to train
    torch.manual_seed(0)
    result = Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()
    assert result.eval_loss_after is not None and math.isfinite(result.eval_loss_after), (name, overrides)
    tensors = load_file(str(result.adapter_dir / "adapter.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values()), (name, overrides)

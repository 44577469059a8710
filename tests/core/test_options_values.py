"""Options refuse values no field can use (NaN/inf, integers past 64 bits, NUL characters) and the built-in
methods' and objectives' options refuse values past any meaning (issue 9)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from peftkit.errors import OptionsError
from peftkit.options import MAX_INT, build_options, value_problem
from peftkit_plugins.adapter.options import AdapterOptions
from peftkit_plugins.lora.options import LoraOptions
from peftkit_plugins.p_tuning.options import PTuningOptions
from peftkit_plugins.ppo.options import PPOOptions
from peftkit_plugins.prefix_tuning.options import PrefixTuningOptions
from peftkit_plugins.prompt_tuning.options import PromptTuningOptions
from peftkit_plugins.qlora.options import QLoraOptions
from peftkit_plugins.reward.options import RewardOptions
from peftkit_plugins.sft.options import SftOptions


@dataclass
class _Options:
    rate: float = 0.5
    count: int = 1
    name: str = "x"
    weights: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _problems(cls: type, **values) -> list[str]:
    with pytest.raises(OptionsError) as info:
        build_options(cls, values, owner="method 'm'")
    return info.value.problems


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_float_option_refuses_non_finite_values_naming_option_value_and_fix(value):
    assert _problems(_Options, rate=value) == [f"option 'rate' = {value!r} is not a finite number; give a finite value"]


def test_non_finite_values_inside_lists_and_mappings_are_found():
    assert _problems(_Options, weights=[1.0, math.nan]) == ["option 'weights' = [1.0, nan] holds nan, which is not a finite number; give a finite value"]
    assert "holds inf, which is not a finite number" in _problems(_Options, extra={"a": {"b": math.inf}})[0]


def test_integers_past_64_bits_are_refused_before_they_overflow():
    huge = 10**400
    problems = _problems(_Options, rate=huge, count=-huge)
    assert len(problems) == 2 and all(f"is too large; integers must be within +-{MAX_INT} (2**63 - 1)" in p for p in problems)
    assert build_options(_Options, {"rate": MAX_INT, "count": -MAX_INT}).rate == float(MAX_INT)


def test_an_integer_past_pythons_digit_limit_is_named_without_printing_it():
    assert _problems(_Options, count=10**5000) == [
        f"option 'count' = <an integer of about 5001 digits> is too large; integers must be within +-{MAX_INT} (2**63 - 1)"
    ]


def test_a_nul_character_is_refused():
    assert _problems(_Options, name="a\0b") == ["option 'name' = 'a\\x00b' contains a NUL character (\\0); remove it"]


def test_plain_values_have_no_problem():
    assert value_problem({"a": [1, 2.5, "x", None, True], 3: {"b": -(2**63 - 1)}}) is None


@pytest.mark.parametrize(
    "cls, values, problem",
    [
        (LoraOptions, {"r": 2**20}, "option 'r' = 1048576 is too large: must be <= 65536"),
        (LoraOptions, {"alpha": 1e12}, "option 'alpha' = 1000000000000.0 is too large: must be <= 65536"),
        (LoraOptions, {"dropout": 1.0}, "option 'dropout' = 1.0 must be in [0, 1)"),
        (QLoraOptions, {"r": 2**20}, "option 'r' = 1048576 is too large"),
        (AdapterOptions, {"bottleneck_size": 10**12}, "option 'bottleneck_size' = 1000000000000 is too large: must be <= 65536"),
        (PTuningOptions, {"num_virtual_tokens": 10**6}, "option 'num_virtual_tokens' = 1000000 is too large: must be <= 65536"),
        (PTuningOptions, {"encoder": "lstm", "encoder_num_layers": 1000}, "option 'encoder_num_layers' = 1000 is too large: must be <= 32"),
        (PTuningOptions, {"encoder_hidden_size": 10**6}, "option 'encoder_hidden_size' = 1000000 is too large"),
        (PromptTuningOptions, {"num_virtual_tokens": 10**6}, "option 'num_virtual_tokens' = 1000000 is too large"),
        (PrefixTuningOptions, {"num_virtual_tokens": 10**6}, "option 'num_virtual_tokens' = 1000000 is too large"),
        (PrefixTuningOptions, {"projection": True, "projection_hidden_size": 10**6}, "option 'projection_hidden_size' = 1000000 is too large"),
        (SftOptions, {"lm_weight": 1e9}, "option 'lm_weight' = 1000000000.0 is too large: must be <= 1000"),
        (RewardOptions, {"head_seed": -1}, "option 'head_seed' = -1 must be in [0, 4294967295]"),
        (RewardOptions, {"head_seed": 2**32}, "option 'head_seed' = 4294967296 must be in [0, 4294967295]"),
        (PPOOptions, {"reward_model": "r", "temperature": 1e-9}, "option 'temperature' = 1e-09 must be in [0.01, 100.0]"),
        (PPOOptions, {"reward_model": "r", "kl_coef": 1e9}, "option 'kl_coef' = 1000000000.0 is too large: must be <= 1000"),
        (PPOOptions, {"reward_model": "r", "max_new_tokens": 2**40}, "option 'max_new_tokens' = 1099511627776 is too large"),
        (PPOOptions, {"reward_model": "r", "ppo_epochs": 10**6}, "option 'ppo_epochs' = 1000000 is too large: must be <= 1000"),
        (PPOOptions, {"reward_model": "r", "gamma": math.nan}, "option 'gamma' = nan is not a finite number"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_builtin_options_refuse_values_past_any_meaning(cls, values, problem):
    problems = _problems(cls, **values)
    assert any(p.startswith(problem) for p in problems), problems

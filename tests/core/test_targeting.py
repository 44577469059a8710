"""Module targeting shared by every method."""

from __future__ import annotations

import pytest

from peftkit.errors import TargetError
from peftkit.targeting import find_targets, layer_index
from peftkit.testing import tiny_gpt2, tiny_llama


def names(model, spec, **kw):
    return [n for n, _ in find_targets(model, spec, **kw)]


def test_suffixes_match_at_dot_boundaries():
    found = names(tiny_llama(), ["q_proj", "v_proj"])
    assert found == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    with pytest.raises(TargetError, match="candidate module names: down_proj, gate_proj, k_proj"):
        find_targets(tiny_llama(), ["proj"])  # 'proj' is not a suffix at a dot boundary


def test_regex_is_a_full_match():
    assert names(tiny_llama(), r".*\.1\.mlp\.(up|down)_proj") == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(TargetError, match="matches no module"):
        find_targets(tiny_llama(), r"q_proj")  # a full match, not a search


def test_all_linear_excludes_the_output_head():
    llama = names(tiny_llama(), "all-linear")
    assert len(llama) == 2 * 7 and "lm_head" not in llama
    gpt2 = names(tiny_gpt2(), "all-linear")
    assert len(gpt2) == 2 * 4 and all("Conv1D" for _ in gpt2) and "lm_head" not in gpt2


def test_layer_restriction():
    assert names(tiny_llama(), ["q_proj"], layers=1) == ["model.layers.1.self_attn.q_proj"]
    assert names(tiny_llama(), ["q_proj"], layers=[0, 1]) == names(tiny_llama(), ["q_proj"])
    with pytest.raises(TargetError, match=r"in layers \[7\]"):
        find_targets(tiny_llama(), ["q_proj"], layers=[7])


def test_no_match_lists_candidates():
    with pytest.raises(TargetError) as info:
        find_targets(tiny_llama(), ["query"])
    text = str(info.value)
    assert "target_modules=['query'] matches no module of LlamaForCausalLM" in text
    assert "q_proj" in text and "down_proj" in text


def test_non_linear_match_is_refused_when_linear_only():
    with pytest.raises(TargetError, match="not Linear-like: model.layers.0.mlp"):
        find_targets(tiny_llama(), ["mlp"])


def test_bad_regex():
    with pytest.raises(TargetError, match="not a valid regular expression"):
        find_targets(tiny_llama(), "(")


def test_layer_index():
    assert layer_index("model.layers.12.mlp") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None

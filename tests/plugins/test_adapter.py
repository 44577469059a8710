"""Bottleneck adapters: conformance, exact start at the base, placement, formula, options, two adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkit
from peftkit.errors import MergeNotSupportedError, OptionsError, TargetError
from peftkit.testing import CHECKS, check_injector, sample_batch, tiny_family_model, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.adapter import BottleneckAdapterLayer

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
ATTENTION_OUT = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj"}
FFN_OUT = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj"}
BLOCK = {"llama": "model.layers", "gpt2": "transformer.h"}


def _tiny(architecture: str):
    """A 2-layer model of another architecture family, to check the default layout table."""
    return tiny_family_model(architecture)


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _layers(tuned) -> dict[str, BottleneckAdapterLayer]:
    return {n.removeprefix("base_model."): m for n, m in tuned.named_modules() if isinstance(m, BottleneckAdapterLayer)}


def _randomize(tuned, name: str = "default", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(tuned).values():
            for param in layer.adapter_parameters(name):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("adapter", model_factory=MODELS[model], checks=[check])


@pytest.mark.parametrize("model", MODELS)
def test_conformance_pfeiffer_gelu_fixed_bottleneck(model):
    check_injector(
        "adapter",
        model_factory=MODELS[model],
        checks=["only_adapter_parameters_train", "save_load_roundtrip"],
        placement="pfeiffer",
        nonlinearity="gelu",
        bottleneck_size=3,
    )


# ------------------------------------------------------------------ semantics
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("model", MODELS)
def test_starts_at_base_exactly(model, placement):
    batch = sample_batch()
    tuned = peftkit.wrap(MODELS[model](), "adapter", placement=placement, nonlinearity="tanh")
    assert torch.equal(_logits(tuned, batch), _logits(MODELS[model](), batch))


@pytest.mark.parametrize("model", MODELS)
def test_placement_picks_the_output_projections(model):
    houlsby = _layers(peftkit.wrap(MODELS[model](), "adapter"))
    expected = [f"{BLOCK[model]}.{i}.{suffix}" for i in range(2) for suffix in (ATTENTION_OUT[model], FFN_OUT[model])]
    assert list(houlsby) == expected
    pfeiffer = _layers(peftkit.wrap(MODELS[model](), "adapter", placement="pfeiffer"))
    assert list(pfeiffer) == [f"{BLOCK[model]}.{i}.{FFN_OUT[model]}" for i in range(2)]
    only_second = _layers(peftkit.wrap(MODELS[model](), "adapter", placement="pfeiffer", layers=[1]))
    assert list(only_second) == [f"{BLOCK[model]}.1.{FFN_OUT[model]}"]


@pytest.mark.parametrize("nonlinearity", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("model", MODELS)
def test_layer_computes_residual_bottleneck(model, nonlinearity):
    """y = h + W_up f(W_down h + b_down) + b_up with h the wrapped layer's output."""
    tuned = peftkit.wrap(MODELS[model](), "adapter", nonlinearity=nonlinearity, bottleneck_size=5)
    _randomize(tuned)
    activation = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[nonlinearity]
    for layer in _layers(tuned).values():
        x = torch.randn(2, 3, layer.base_layer.weight.shape[0 if model == "gpt2" else 1])
        down, up = layer.adapter_down["default"], layer.adapter_up["default"]
        assert down.weight.shape == (5, layer.features)
        with torch.no_grad():
            h = layer.base_layer(x)
            expected = h + activation(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
            assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "width"),
    [({}, 2), ({"reduction_factor": 8}, 4), ({"reduction_factor": 64}, 1), ({"bottleneck_size": 7}, 7)],
)
def test_bottleneck_width(options, width):
    layers = _layers(peftkit.wrap(tiny_llama(), "adapter", **options))  # hidden size 32
    assert {tuple(layer.adapter_down["default"].weight.shape) for layer in layers.values()} == {(width, 32)}


def test_merge_is_refused_with_the_reason():
    tuned = peftkit.wrap(tiny_llama(), "adapter")
    with pytest.raises(MergeNotSupportedError, match="'adapter'.*nonlinearity"):
        tuned.merge()
    with pytest.raises(MergeNotSupportedError, match="nonlinearity"):
        tuned.merge_and_unload()


OTHER_LAYOUTS = {
    "opt": ("model.decoder.layers", "self_attn.out_proj", "fc2"),
    "gpt_neox": ("gpt_neox.layers", "attention.dense", "mlp.dense_4h_to_h"),
    "falcon": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h"),
    "bloom": ("transformer.h", "self_attention.dense", "mlp.dense_4h_to_h"),
}


@pytest.mark.slow  # imports and builds four more transformers architectures
@pytest.mark.parametrize("architecture", OTHER_LAYOUTS)
def test_other_architectures_from_the_default_table(architecture):
    block, attention, feedforward = OTHER_LAYOUTS[architecture]
    batch = sample_batch()
    base = _logits(_tiny(architecture), batch)
    tuned = peftkit.wrap(_tiny(architecture), "adapter")
    assert list(_layers(tuned)) == [f"{block}.{i}.{suffix}" for i in range(2) for suffix in (attention, feedforward)]
    assert torch.equal(_logits(tuned, batch), base)
    train_steps(tuned, batch, steps=2)
    assert not torch.equal(_logits(tuned, batch), base)
    with tuned.disable_adapters():
        assert torch.equal(_logits(tuned, batch), base)


# ------------------------------------------------------------------ targets and options
def test_unknown_architecture_names_the_option_and_override_works():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_out = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.attn_out(x)))

    model = nn.Sequential(Block(), Block())
    with pytest.raises(TargetError, match="set option 'target_modules'"):
        peftkit.wrap(model, "adapter")
    tuned = peftkit.wrap(model, "adapter", target_modules={"attention": ["attn_out"], "feedforward": r".*\.fc2"})
    assert list(_layers(tuned)) == ["0.attn_out", "0.fc2", "1.attn_out", "1.fc2"]
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(tuned(x), tuned.unload()(x))


def test_target_override_on_known_model_and_pfeiffer_needs_only_feedforward():
    tuned = peftkit.wrap(tiny_llama(), "adapter", placement="pfeiffer", target_modules={"feedforward": ["up_proj"]})
    assert list(_layers(tuned)) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert {layer.features for layer in _layers(tuned).values()} == {64}


def test_options_validation_names_option_value_and_allowed():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "adapter", bottleneck=4, nonlinearity="swish", placement="parallel")
    message = str(info.value)
    assert "unknown option 'bottleneck'" in message and "did you mean 'bottleneck_size'" in message
    assert "'nonlinearity' = 'swish'" in message and "'relu' | 'gelu' | 'silu' | 'tanh'" in message
    assert "'placement' = 'parallel'" in message and "'houlsby' | 'pfeiffer'" in message
    assert len(info.value.problems) == 3


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"bottleneck_size": 4, "reduction_factor": 8}, "give only one"),
        ({"bottleneck_size": 0}, "'bottleneck_size' = 0 must be >= 1"),
        ({"reduction_factor": -2}, "'reduction_factor' = -2 must be > 0"),
        ({"target_modules": {"ffn": ["fc2"]}}, "unknown role(s) ['ffn']; allowed roles: attention, feedforward"),
        ({"target_modules": {"feedforward": ["fc2"]}}, "lacks role(s) ['attention'] needed by placement 'houlsby'"),
        ({"target_modules": {"attention": [], "feedforward": ["x"]}}, "empty list for role(s) ['attention']"),
        ({"target_modules": ["o_proj"]}, "'target_modules' = ['o_proj'] is not valid"),
    ],
)
def test_invalid_values(options, fragment):
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "adapter", **options)
    assert fragment in str(info.value)


# ------------------------------------------------------------------ two adapters
@pytest.mark.parametrize("model", MODELS)
def test_two_adapters_switch_and_save_second(model, tmp_path):
    batch = sample_batch()
    tuned = peftkit.wrap(MODELS[model](), "adapter")
    train_steps(tuned, batch)
    tuned.add_adapter("second", "adapter", bottleneck_size=4, nonlinearity="silu")
    layers = _layers(tuned)
    assert all(layer.adapter_names() == ["default", "second"] for layer in layers.values())
    first = _logits(tuned, batch)
    tuned.set_adapter("second")
    assert torch.equal(_logits(tuned, batch), _logits(MODELS[model](), batch))  # second starts at the base
    _randomize(tuned, "second", seed=3)
    second = _logits(tuned, batch)
    assert not torch.allclose(first, second, atol=1e-4)
    tuned.set_adapter("default")
    assert torch.equal(_logits(tuned, batch), first)

    tuned.save(tmp_path / "second", adapter_name="second")
    loaded = peftkit.load(MODELS[model](), tmp_path / "second", adapter_name="second")
    assert torch.equal(_logits(loaded, batch), second)
    assert {tuple(layer.adapter_down["second"].weight.shape) for layer in _layers(loaded).values()} == {(4, 32)}
    tuned.delete_adapter("default")
    assert torch.equal(_logits(tuned, batch), second)


def test_another_plugin_can_supply_the_wrapper(register_plugin):
    """The built-in wrapper answers trylast, so a plugin's wrapper for the same layer type wins."""

    class OtherAdapterLayer(BottleneckAdapterLayer):
        pass

    class Plugin:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer, options):
            return OtherAdapterLayer if method == "adapter" else None

    register_plugin(Plugin())
    tuned = peftkit.wrap(tiny_gpt2(), "adapter", placement="pfeiffer")
    assert [type(layer) for layer in _layers(tuned).values()] == [OtherAdapterLayer] * 2

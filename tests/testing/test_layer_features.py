"""``layer_features``: (in, out) of Linear, GPT-2's Conv1D, bitsandbytes 4-bit linears and wrapped layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit
from peftkit.injection import layer_shape
from peftkit.testing import layer_features, tiny_gpt2, tiny_llama


def test_linear():
    assert layer_features(nn.Linear(3, 5)) == (3, 5)


def test_conv1d_stores_its_weight_in_by_out():
    c_attn = tiny_gpt2().transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "Conv1D"
    in_features, out_features = layer_features(c_attn)
    assert (in_features, out_features) == tuple(c_attn.weight.shape)  # (in, out): the transpose of nn.Linear's
    x = torch.randn(2, in_features)
    assert c_attn(x).shape == (2, out_features)


def test_a_bitsandbytes_4bit_linear_gives_its_logical_sizes_not_its_packed_weight_shape():
    bnb = pytest.importorskip("bitsandbytes")
    from peftkit_plugins.qlora import quantize_model

    model = quantize_model(tiny_llama(), ["up_proj"])
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert tuple(layer.weight.shape) != (64, 32), "the weight is no longer packed; this test checks nothing"
    assert layer_features(layer) == (32, 64)  # hidden 32 -> intermediate 64


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_wrapped_layer_gives_the_sizes_of_the_layer_underneath(method):
    tuned = peftkit.wrap(tiny_gpt2(), method, target_modules=["c_fc"])
    wrapped = tuned.base_model.transformer.h[0].mlp.c_fc
    assert hasattr(wrapped, "base_layer")
    assert layer_features(wrapped) == tuple(wrapped.base_layer.weight.shape) == (32, 128)


def test_layer_shape_is_out_by_in_from_layer_features():
    assert layer_shape(nn.Linear(3, 5)) == [5, 3]
    assert layer_shape(tiny_gpt2().transformer.h[0].attn.c_attn) == [96, 32]
    assert layer_shape(nn.Embedding(7, 4)) == [7, 4]  # not Linear-like: its weight shape, as before


@pytest.mark.parametrize("layer", [nn.Embedding(7, 4), nn.Conv2d(3, 5, 1), nn.LayerNorm(4)])
def test_other_layers_are_a_type_error_naming_the_type(layer):
    with pytest.raises(TypeError, match=rf"{type(layer).__name__} is not a Linear-like layer"):
        layer_features(layer)


def test_a_layer_declaring_integer_sizes_is_linear_like():
    class Declared(nn.Module):  # a layer type a plugin teaches a method (tests/core/test_hookspecs.py does so for lora)
        in_features, out_features = 6, 9

    assert layer_features(Declared()) == (6, 9)
    undeclared = Declared()
    undeclared.in_features = "6"
    with pytest.raises(TypeError, match="Declared"):
        layer_features(undeclared)

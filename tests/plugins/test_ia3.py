"""(IA)^3: conformance, agreement with Hugging Face peft, key mapping, exact merge math, options, two adapters."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import OptionsError, TargetError
from peftkit.testing import CHECKS, check_injector, sample_batch, tiny_family_model, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.ia3 import IA3Layer, ia3_targets
from peftkit_plugins.ia3.options import IA3Options

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Our default targets and feed-forward modules per architecture, passed explicitly to both libraries.
PEFT_TARGETS = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["k_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bloom": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}
# Architectures whose peft defaults are ours (peft's OPT default is q_proj, k_proj, fc2).
SAME_DEFAULTS_AS_PEFT = ["llama", "gpt2", "gpt_neox", "falcon", "bloom"]


def _tiny(architecture: str):
    """A 2-layer model of another architecture family, to check the default layout table."""
    return tiny_family_model(architecture)


ALL_MODELS = {**MODELS, **{arch: functools.partial(_tiny, arch) for arch in ["opt", "gpt_neox", "falcon", "bloom"]}}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _randomize(tuned: peftkit.TunedModel, name: str = "default", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in tuned.named_modules():
            if isinstance(module, IA3Layer) and name in module.ia3_l:
                vector = module.ia3_l[name]
                vector.copy_(torch.rand(vector.shape, generator=gen) + 0.5)  # in [0.5, 1.5)


def _layers(tuned) -> dict[str, IA3Layer]:
    return {n.removeprefix("base_model."): m for n, m in tuned.named_modules() if isinstance(m, IA3Layer)}


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("ia3", model_factory=MODELS[model], checks=[check])


@pytest.mark.parametrize("model", MODELS)
def test_conformance_merge_with_layers_and_output_only(model):
    checks = ["merge", "save_load_roundtrip"]
    check_injector("ia3", model_factory=MODELS[model], checks=checks, layers=[1], feedforward_modules=[])


# ------------------------------------------------------------------ reference
def _peft_reference(model: str, ours: peftkit.TunedModel):
    peft = pytest.importorskip("peft")
    targets, feedforward = PEFT_TARGETS[model]
    reference = peft.get_peft_model(
        ALL_MODELS[model](),
        peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=(model == "gpt2")),
    )
    state = reference.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            peft_key = f"base_model.model.{key}.default"  # the live parameter name carries the adapter name
            assert peft_key in state, f"{peft_key} not in peft's model"
            state[peft_key].copy_(tensor)
    return reference.eval()


def _slow_unless_tiny_default(models):
    """The other architectures import and build more transformers code: slow-marked."""
    return [m if m in MODELS else pytest.param(m, marks=pytest.mark.slow) for m in models]


@pytest.mark.parametrize("model", _slow_unless_tiny_default(ALL_MODELS))
def test_matches_peft_reference(model):
    """Identical (random) IA3 vectors in peftkit and peft give logits within 1e-5 and the same greedy tokens."""
    targets, feedforward = PEFT_TARGETS[model]
    ours = peftkit.wrap(ALL_MODELS[model](), "ia3", target_modules=targets, feedforward_modules=feedforward)
    assert ours.adapter_state_dict().keys() == peftkit.wrap(ALL_MODELS[model](), "ia3").adapter_state_dict().keys()
    _randomize(ours)
    reference = _peft_reference(model, ours)
    batch = sample_batch(batch_size=3, seq_len=12)
    got, want = _logits(ours, batch), _logits(reference, batch)
    assert (got - want).abs().max() < 1e-5
    assert (got - _logits(ALL_MODELS[model](), batch)).abs().max() > 1e-3  # the vectors do change the output
    prompt = batch["input_ids"][:, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    kwargs["pad_token_id"] = 0
    assert torch.equal(ours.generate(input_ids=prompt, **kwargs), reference.generate(input_ids=prompt, **kwargs))


@pytest.mark.parametrize("model", _slow_unless_tiny_default(SAME_DEFAULTS_AS_PEFT))
def test_defaults_and_state_keys_match_peft(model):
    """Default targets equal peft's defaults, and peft's saved keys are ours with a ``base_model.model.`` prefix."""
    peft = pytest.importorskip("peft")
    ours = peftkit.wrap(ALL_MODELS[model](), "ia3")  # per-architecture defaults
    reference = peft.get_peft_model(ALL_MODELS[model](), peft.IA3Config(fan_in_fan_out=(model == "gpt2")))
    theirs = peft.get_peft_model_state_dict(reference)
    mine = {f"base_model.model.{k}": v for k, v in ours.adapter_state_dict().items()}
    assert mine.keys() == theirs.keys()
    assert all(mine[k].shape == theirs[k].shape for k in mine)
    # Same per-layer kind too: peft's is_feedforward against ours.
    peft_ff = {
        n.removeprefix("base_model.model."): m.is_feedforward
        for n, m in reference.named_modules()
        if hasattr(m, "is_feedforward")
    }
    ours_ff = {n: layer.feedforward["default"] for n, layer in _layers(ours).items()}
    assert ours_ff == peft_ff


# ------------------------------------------------------------------ semantics and merge math
@pytest.mark.parametrize("model", MODELS)
def test_starts_at_base_exactly(model):
    batch = sample_batch()
    tuned = peftkit.wrap(MODELS[model](), "ia3")
    assert torch.equal(_logits(tuned, batch), _logits(MODELS[model](), batch))


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("feedforward", [False, True])
def test_layer_formula_and_merged_weight(conv1d, feedforward):
    """Output scaling: l ⊙ (W x + b), rows of W and b scaled; input scaling: W (l ⊙ x) + b, columns of W scaled."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 3) if conv1d else nn.Linear(3, 5)  # in 3, out 5 either way
    nn.init.normal_(base.weight)
    nn.init.normal_(base.bias)
    weight_out_in = (base.weight.T if conv1d else base.weight).detach().clone()  # (5, 3)
    bias = base.bias.detach().clone()
    layer = IA3Layer(base, "a", IA3Options())
    layer.set_feedforward("a", feedforward)
    layer.set_active_adapters(["a"])
    with torch.no_grad():
        layer.ia3_l["a"].copy_(torch.rand(layer.ia3_l["a"].shape) + 0.5)
    scale = layer.ia3_l["a"].detach().flatten()
    x = torch.randn(2, 4, 3)
    if feedforward:
        expected_w, expected_b = weight_out_in * scale[None, :], bias
        expected = (x * scale) @ weight_out_in.T + bias
    else:
        expected_w, expected_b = weight_out_in * scale[:, None], bias * scale
        expected = scale * (x @ weight_out_in.T + bias)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)
        layer.merge("a")
        merged_w = base.weight.T if conv1d else base.weight
        assert torch.allclose(merged_w, expected_w, atol=1e-6)
        assert torch.allclose(base.bias, expected_b, atol=1e-6)
        assert torch.allclose(layer(x), expected, atol=1e-5)  # the merged adapter is skipped in forward
        layer.unmerge("a")
        assert torch.allclose(base.weight.T if conv1d else base.weight, weight_out_in, atol=1e-6)
        assert torch.equal(base.bias, bias) if feedforward else torch.allclose(base.bias, bias, atol=1e-6)


@pytest.mark.parametrize("model", MODELS)
def test_merge_with_zero_entries_restores_base_exactly(model):
    """Entries that are exactly zero (or not invertible) cannot be divided back: those slices come from a copy."""
    batch = sample_batch()
    fresh = MODELS[model]()
    tuned = peftkit.wrap(MODELS[model](), "ia3")
    _randomize(tuned)
    with torch.no_grad():
        for layer in _layers(tuned).values():
            layer.ia3_l["default"].view(-1)[:3] = 0.0  # switch a few channels off entirely
            layer.ia3_l["default"].view(-1)[3] = 1e-30
    expected = _logits(tuned, batch)
    tuned.merge()
    assert torch.allclose(_logits(tuned, batch), expected, atol=1e-5)
    # Training the vector while merged must not spoil unmerge (it uses the vector as merged).
    with torch.no_grad():
        for layer in _layers(tuned).values():
            layer.ia3_l["default"].add_(1.0)
    tuned.unmerge()
    base_state = fresh.state_dict()
    for name, layer in _layers(tuned).items():
        inner = layer.base_layer
        axis = layer._scaled_axis("default")
        w, w0 = inner.weight, base_state[f"{name}.weight"]
        assert torch.equal(w.index_select(axis, torch.arange(4)), w0.index_select(axis, torch.arange(4)))
        assert torch.allclose(w, w0, atol=1e-6, rtol=1e-5)
        if inner.bias is not None:
            assert torch.allclose(inner.bias, base_state[f"{name}.bias"], atol=1e-6)
    with tuned.disable_adapters():
        assert torch.allclose(_logits(tuned, batch), _logits(fresh, batch), atol=1e-5)


def test_merge_refused_on_quantized_weight():
    from peftkit.errors import MergeNotSupportedError

    base = nn.Linear(4, 4)
    layer = IA3Layer(base, "a", IA3Options())
    # What a packed 4-bit weight looks like to the wrapper.
    base.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(MergeNotSupportedError, match="quantized"):
        layer.merge("a")


# ------------------------------------------------------------------ targets and options
def test_feedforward_modules_select_input_scaling():
    model = tiny_llama()
    pairs = ia3_targets(model, IA3Options(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=[]))
    assert [ff for _, ff in pairs] == [False] * 6
    options = IA3Options(target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"], layers=[1])
    pairs = dict(ia3_targets(model, options))
    assert pairs == {"model.layers.1.self_attn.v_proj": False, "model.layers.1.mlp.down_proj": True}


def test_feedforward_modules_must_be_subset_of_targets():
    with pytest.raises(TargetError, match="feedforward_modules.*subset"):
        peftkit.wrap(tiny_llama(), "ia3", target_modules=["k_proj", "v_proj"], feedforward_modules=["down_proj"])


def test_unknown_architecture_names_the_option():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(TargetError, match="set option 'target_modules'"):
        peftkit.wrap(model, "ia3")
    tuned = peftkit.wrap(model, "ia3", target_modules=["0", "2"], feedforward_modules=["2"])
    assert {n: layer.feedforward["default"] for n, layer in _layers(tuned).items()} == {"0": False, "2": True}


def test_options_validation_names_option_value_and_allowed():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "ia3", target_module=["k_proj"], layers="first", feedforward_modules=3)
    message = str(info.value)
    assert "unknown option 'target_module'" in message and "did you mean 'target_modules'" in message
    assert "valid options: feedforward_modules, layers, target_modules" in message
    assert "'layers' = 'first'" in message and "int | list[int] | None" in message
    assert "'feedforward_modules' = 3" in message
    assert len(info.value.problems) == 3
    with pytest.raises(OptionsError, match="'target_modules' = \\[\\] is empty"):
        peftkit.wrap(tiny_llama(), "ia3", target_modules=[])


# ------------------------------------------------------------------ two adapters
@pytest.mark.parametrize("model", MODELS)
def test_two_adapters_switch_and_save_second(model, tmp_path):
    batch = sample_batch()
    tuned = peftkit.wrap(MODELS[model](), "ia3")
    train_steps(tuned, batch)
    tuned.add_adapter("second", "ia3", feedforward_modules=[])
    assert tuned.active_adapter == "default"
    first = _logits(tuned, batch)
    tuned.set_adapter("second")
    assert torch.equal(_logits(tuned, batch), _logits(MODELS[model](), batch))  # second is still all ones
    _randomize(tuned, "second", seed=3)
    second = _logits(tuned, batch)
    assert not torch.allclose(first, second, atol=1e-4)
    tuned.set_adapter("default")
    assert torch.equal(_logits(tuned, batch), first)
    assert {layer.feedforward["second"] for layer in _layers(tuned).values()} == {False}

    tuned.save(tmp_path / "second", adapter_name="second")
    loaded = peftkit.load(MODELS[model](), tmp_path / "second", adapter_name="second")
    assert torch.equal(_logits(loaded, batch), second)
    tuned.delete_adapter("default")
    assert tuned.active_adapter == "second"
    assert torch.equal(_logits(tuned, batch), second)


# ------------------------------------------------------------------ layer-wrapper hook
def test_another_plugin_can_supply_the_wrapper(register_plugin):
    """The built-in wrapper answers trylast; a plugin's wrapper wins and is told what it scales."""

    class LoggingIA3Layer(IA3Layer):
        calls: list[tuple[str, bool]] = []

        def set_feedforward(self, name, feedforward):
            LoggingIA3Layer.calls.append((name, feedforward))
            super().set_feedforward(name, feedforward)

    class Plugin:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer, options):
            return LoggingIA3Layer if method == "ia3" and isinstance(layer, nn.Linear) else None

    register_plugin(Plugin())
    tuned = peftkit.wrap(tiny_llama(), "ia3")
    assert {type(layer) for layer in _layers(tuned).values()} == {LoggingIA3Layer}
    assert LoggingIA3Layer.calls == [("default", False), ("default", False), ("default", True)] * 2

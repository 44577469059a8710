"""peftkit-bitfit passes peftkit's conformance suite, installed (`pip install .`) or straight from this folder.

Each test registers the plugin for itself with ``peftkit.testing.registered_plugin``: no entry point or
autoloading is involved, and no other installed plugin can interfere.
"""

from pathlib import Path

import pytest
import torch

import peftkit
import peftkit_bitfit
from peftkit.errors import TargetError
from peftkit.testing import CHECKS, assert_matches_reference, check_injector, registered_plugin, sample_batch, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def bitfit():
    """BitFit (and the built-ins) for one test; the previous plugin manager comes back after it."""
    with registered_plugin(peftkit_bitfit, name="bitfit") as pm:
        yield pm


def test_bitfit_is_registered(bitfit):
    assert "bitfit" in peftkit.available_methods()
    assert bitfit.injectors()["bitfit"].plugin == "bitfit"


def test_the_entry_point_names_this_package():
    """What makes `pip install` users see the method: the [project.entry-points.peftkit] table."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["peftkit"] == {"bitfit": peftkit_bitfit.__name__}


@pytest.mark.parametrize("check", CHECKS)
def test_conformance(check):
    check_injector("bitfit", model_factory=tiny_gpt2, checks=[check])


def test_matches_the_formula_on_a_plain_model():
    """The reference test: y = W x + b + delta, written out by adding delta to a copy's biases."""
    batch = sample_batch(batch_size=2, seq_len=8)
    tuned = peftkit.wrap(tiny_gpt2(), "bitfit")
    reference = tiny_gpt2()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in tuned.base_model.named_modules():
            if isinstance(module, peftkit_bitfit.BitFitLayer):
                delta = torch.randn(module.delta["default"].shape, generator=generator) * 0.1
                module.delta["default"].copy_(delta)
                reference.get_submodule(name).bias.add_(delta)
    assert_matches_reference(tuned, reference, batch)


def test_another_plugin_can_take_over_a_layer_type_whatever_the_registration_order():
    """The wrapper hook is trylast (as peftkit's own methods'): a plugin teaching BitFit a layer type comes first."""

    class LoudBitFitLayer(peftkit_bitfit.BitFitLayer):
        pass

    class TeachesBitFit:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer, options):
            return LoudBitFitLayer if method == "bitfit" and type(layer).__name__ == "Conv1D" else None

    # bitfit registered last: without trylast, pluggy would ask it first and it would answer for Conv1D too
    with registered_plugin(TeachesBitFit(), name="teacher") as pm:
        pm.register(peftkit_bitfit, name="bitfit")
        tuned = peftkit.wrap(tiny_gpt2(), "bitfit")
    wrappers = {type(m) for m in tuned.modules() if isinstance(m, peftkit_bitfit.BitFitLayer)}
    assert wrappers == {LoudBitFitLayer}  # GPT-2's linears are all Conv1D but the (bias-free) head


def test_model_without_biases_is_a_clear_error():
    with pytest.raises(TargetError, match="has a bias"):
        peftkit.wrap(tiny_llama(), "bitfit")

"""peftkit-bitfit passes peftkit's conformance suite (run with `pytest` after `pip install .`)."""

import pytest

import peftkit
from peftkit.errors import TargetError
from peftkit.testing import CHECKS, check_injector, tiny_gpt2, tiny_llama


def test_bitfit_is_discovered():
    assert "bitfit" in peftkit.available_methods()


@pytest.mark.parametrize("check", CHECKS)
def test_conformance(check):
    check_injector("bitfit", model_factory=tiny_gpt2, checks=[check])


def test_model_without_biases_is_a_clear_error():
    with pytest.raises(TargetError, match="has a bias"):
        peftkit.wrap(tiny_llama(), "bitfit")

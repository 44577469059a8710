"""The finiteness checks of a run: what they let through and what they stop, with which message."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftkit.errors import TrainingError
from peftkit.training.finite_guard import FiniteGuard


def _guard(tmp_path: Path, **train) -> FiniteGuard:
    return FiniteGuard(tmp_path / "checkpoint", SimpleNamespace(lr=1e-3, max_grad_norm=None, **train))


def test_huge_but_finite_parameters_pass_even_when_their_norm_overflows(tmp_path):
    params = [("a", torch.full((4, 4), 1e30)), ("b", torch.ones(3))]  # the float32 norm of "a" is inf
    assert not torch.isfinite(torch.linalg.vector_norm(params[0][1]))
    _guard(tmp_path).parameters(params, step=3)


def test_nan_or_inf_parameters_are_named(tmp_path):
    params = [(f"layer{i}.lora_B", torch.zeros(2)) for i in range(5)]
    for i in range(5):
        params[i][1][0] = float("nan") if i % 2 else float("inf")
    with pytest.raises(TrainingError) as info:
        _guard(tmp_path).parameters(params, step=7)
    message = str(info.value)
    assert "update of step 7: layer0.lora_B, layer1.lora_B, layer2.lora_B and 2 more" in message
    assert "set train.max_grad_norm (e.g. 1.0)" in message and "no checkpoint was written yet" in message


def test_the_message_says_the_last_checkpoint_is_intact_when_there_is_one(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(b"state")
    with pytest.raises(TrainingError, match=rf"last good checkpoint at {tmp_path / 'checkpoint'} is intact"):
        _guard(tmp_path).eval_loss(float("inf"), step=4)


def test_a_non_finite_loss_before_training_points_at_the_model_not_the_learning_rate(tmp_path):
    with pytest.raises(TrainingError, match="before any training step, so the learning rate is not the cause") as info:
        _guard(tmp_path).eval_loss(float("nan"), step=0)
    assert "model.dtype: float32" in str(info.value)
    _guard(tmp_path).eval_loss(None, step=0)  # no held-out data
    _guard(tmp_path).eval_loss(2.5, step=0)

"""The KL coefficient beta: fixed, or adapted to a target KL (Ziegler et al., 2019, https://arxiv.org/abs/1909.08593).

Adaptive rule, after each rollout of ``n`` episodes with measured KL ``KL``::

    e     = clip(KL / KL_target - 1, -0.2, 0.2)
    beta <- beta * (1 + K_beta * e),   K_beta = n / horizon
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KLController"]


@dataclass
class KLController:
    """Holds beta; :meth:`update` adapts it when ``target`` is set, else leaves it fixed."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adapt beta to the KL of the last rollout of ``n_steps`` episodes; returns the new beta."""
        if self.target is not None:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])

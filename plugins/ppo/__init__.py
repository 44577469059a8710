"""PPO objective (placeholder while being built)."""

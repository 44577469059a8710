"""Reward-model objective (placeholder while being built)."""

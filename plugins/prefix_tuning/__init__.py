"""Built-in plugin `prefix_tuning` (in progress: registers nothing yet)."""

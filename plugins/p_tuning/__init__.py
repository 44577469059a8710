"""Built-in plugin `p_tuning` (in progress: registers nothing yet)."""

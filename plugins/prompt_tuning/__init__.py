"""Built-in plugin `prompt_tuning` (in progress: registers nothing yet)."""

"""Built-in plugin `sft` (in progress: registers nothing yet)."""

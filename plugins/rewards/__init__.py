"""Built-in plugin ``rewards``: reward functions for GRPO (work in progress; registers nothing yet)."""

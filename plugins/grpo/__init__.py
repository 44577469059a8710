"""Built-in plugin ``grpo``: group-relative policy optimisation (work in progress; registers nothing yet)."""

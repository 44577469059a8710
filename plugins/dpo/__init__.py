"""Built-in plugin ``dpo``: direct preference optimisation (work in progress; registers nothing yet)."""

"""Built-in plugin ``classify``: GPT-1 style classification (work in progress; registers nothing yet)."""

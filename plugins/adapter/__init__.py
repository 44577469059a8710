"""Built-in plugin `adapter` (in progress: registers nothing yet)."""

"""Built-in plugin `ia3` (in progress: registers nothing yet)."""

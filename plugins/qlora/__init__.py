"""Built-in plugin `qlora` (in progress: registers nothing yet)."""

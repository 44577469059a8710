"""peftkit's built-in methods, one package per method.

Each subpackage is an ordinary peftkit plugin, declared under the ``peftkit``
entry-point group in ``pyproject.toml`` exactly as a third-party package would
declare it. The core never imports this package.
"""

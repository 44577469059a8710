"""The training stack: recipes, the loop, checkpoints, data, losses and base-model loading.

It builds on the adapter core (:mod:`peftkit`) and the core never imports it.
Nothing is imported eagerly here: ``import peftkit`` stays free of
``accelerate`` and ``datasets``.
"""

"""Comparing a tuned model with a reference implementation, and reference computations that need no ``generate()``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

__all__ = ["assert_matches_reference", "greedy_by_full_forward"]


def _output_tensor(model: nn.Module, output: Any, role: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"assert_matches_reference: the {role} model ({type(model).__name__}) returned {type(output).__name__}, "
            "which is neither a tensor nor an output with a .logits tensor; wrap the model in a module whose "
            "forward returns the tensor to compare"
        )
    return logits


def assert_matches_reference(
    tuned: nn.Module,
    reference: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    atol: float = 1e-5,
    rtol: float = 0.0,
) -> None:
    """Assert that ``tuned`` and ``reference`` give the same output on ``batch``, within ``atol + rtol * |reference|``.

    The reference test of a method: load identical adapter weights into a peftkit
    model and into an independent implementation (e.g. Hugging Face ``peft``'s
    ``get_peft_model``, or a plain ``nn.Module`` written from the paper's formula),
    then compare. Both models run in eval mode (no dropout) without gradients,
    called as ``model(**batch)``; their ``.logits`` are compared, or the output
    itself when a model returns a tensor. Each model's train/eval mode is restored
    afterwards, also when the check fails.

    :param tuned: the model under test (typically a :class:`peftkit.TunedModel`).
    :param reference: the model it must agree with (a ``peft`` model or any ``nn.Module``).
    :param batch: keyword arguments for both forwards, e.g. ``{"input_ids": ..., "attention_mask": ...}``.
    :param atol: absolute tolerance.
    :param rtol: relative tolerance, times the reference's absolute value.
    :raises AssertionError: naming the largest absolute difference, where it is, and the tolerance;
        also when the two outputs differ in shape.
    :raises TypeError: if a model returns neither a tensor nor an output with ``.logits``.
    """
    modes = [(model, model.training) for model in (tuned, reference)]
    try:
        tuned.eval()
        reference.eval()
        with torch.no_grad():
            got = _output_tensor(tuned, tuned(**batch), "tuned")
            want = _output_tensor(reference, reference(**batch), "reference")
    finally:
        for model, training in modes:
            model.train(training)
    if got.shape != want.shape:
        raise AssertionError(
            f"the tuned model's output has shape {tuple(got.shape)}, the reference's {tuple(want.shape)}; "
            "both must be called on the same batch and produce the same kind of output"
        )
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    difference = (got - want).abs()
    allowed = atol + rtol * want.abs()
    # NaN differences count as failures (a NaN never matches), and rank above every finite one.
    bad = ~(difference <= allowed)
    if not bool(bad.any()):
        return
    ranked = torch.where(torch.isnan(difference), torch.full_like(difference, float("inf")), difference)
    flat = int(torch.argmax(ranked))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), difference.shape))
    tolerance = f"atol={atol:g}" + (f" + rtol={rtol:g} * |reference|" if rtol else "")
    raise AssertionError(
        f"the tuned model differs from the reference by up to {float(difference.view(-1)[flat]):.6g} "
        f"at index {where} of the output of shape {tuple(got.shape)} (tuned {float(got.view(-1)[flat]):.6g}, "
        f"reference {float(want.view(-1)[flat]):.6g}); {int(bad.sum())} of {bad.numel()} values are outside "
        f"the tolerance {tolerance}"
    )


@torch.no_grad()
def greedy_by_full_forward(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, suppress: Sequence[int] = ()
) -> torch.Tensor:
    """Greedy continuation of unpadded ``input_ids`` (``(B, T)``), re-running the whole sequence for every token.

    No cache and no ``generate()``: the reference for a model whose forward is
    trusted but whose generation path is not (e.g. ``peft``'s prompt-learning
    generation under transformers >= 5.24, which renamed ``past_key_values``).

    :param suppress: token ids never chosen (what ``generate(min_new_tokens=...)`` does to the EOS token).
    :returns: ``(B, T + max_new_tokens)`` token ids, the prompt first.
    """
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1].clone()
        logits[:, list(suppress)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids

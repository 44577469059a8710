"""The conformance suite every injector runs against itself, built-in or third-party.

Each check is a plain function ``check(method, model_factory, options)`` that
raises ``AssertionError`` with a message saying what broke. Run them all with
:func:`check_injector`, or one per pytest test::

    @pytest.mark.parametrize("check", peftkit.testing.CHECKS)
    def test_conformance(check):
        peftkit.testing.check_injector("mymethod", checks=[check], r=4)
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch
from torch import nn

import peftkit
from peftkit.errors import MergeNotSupportedError
from peftkit.registry import is_adapter_layer
from peftkit.testing.models import sample_batch, tiny_llama

__all__ = ["CHECKS", "check_injector", "train_steps", "MERGE_TOLERANCE"]

MERGE_TOLERANCE = 1e-5
ModelFactory = Callable[..., nn.Module]


def _vocab(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def train_steps(tuned: peftkit.TunedModel, batch: dict[str, torch.Tensor], steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the language-modelling loss; returns the losses."""
    tuned.train()
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = tuned(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tuned.eval()
    return losses


def _adapter_param_ids(tuned: peftkit.TunedModel) -> set[int]:
    ids = set()
    for module in tuned.modules():
        if module is not tuned and is_adapter_layer(module):
            for name in module.adapter_names():
                ids.update(id(p) for p in module.adapter_parameters(name))
    return ids


def check_only_adapter_parameters_train(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """Only adapter parameters require and get gradients, and change after optimizer steps; base stays bit-identical."""
    model = model_factory()
    batch = sample_batch(vocab_size=_vocab(model))
    tuned = peftkit.wrap(model, method, **options)
    adapter_ids = _adapter_param_ids(tuned)
    trainable = dict(tuned.named_trainable_parameters())
    assert trainable, f"{method}: wrap() left no trainable parameter"
    stray = [n for n, p in trainable.items() if id(p) not in adapter_ids]
    assert not stray, f"{method}: parameters outside the adapter require grad: {stray[:5]}"
    frozen = {n: p.detach().clone() for n, p in tuned.named_parameters() if id(p) not in adapter_ids}
    before = {n: p.detach().clone() for n, p in trainable.items()}

    tuned.train()
    loss = tuned(**batch).loss
    loss.backward()
    no_grad = [n for n, p in trainable.items() if p.grad is None]
    assert not no_grad, f"{method}: adapter parameters got no gradient: {no_grad[:5]}"
    leaked = [n for n, p in tuned.named_parameters() if id(p) not in adapter_ids and p.grad is not None]
    assert not leaked, f"{method}: frozen parameters got gradients: {leaked[:5]}"
    tuned.zero_grad(set_to_none=True)

    train_steps(tuned, batch, steps=3)
    unchanged = [n for n, p in trainable.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"{method}: adapter parameters did not change after 3 optimizer steps: {unchanged[:5]}"
    changed = [n for n, p in tuned.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])]
    assert not changed, f"{method}: frozen base parameters changed: {changed[:5]}"


def check_disable_gives_base_output(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """Inside ``disable_adapters()`` the outputs equal the untouched base model's exactly."""
    reference = model_factory()
    batch = sample_batch(vocab_size=_vocab(reference))
    expected = _logits(reference, batch)
    tuned = peftkit.wrap(model_factory(), method, **options)
    train_steps(tuned, batch)
    with tuned.disable_adapters():
        got = _logits(tuned, batch)
    assert torch.equal(got, expected), f"{method}: disabled output differs from base by {(got - expected).abs().max():.3g}"
    adapted = _logits(tuned, batch)
    assert not torch.equal(adapted, expected), f"{method}: the trained adapter has no effect on the output"


def check_save_load_roundtrip(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """save -> load onto a fresh base gives bit-identical tensors and outputs, inference and training forms."""
    tuned = peftkit.wrap(model_factory(), method, **options)
    batch = sample_batch(vocab_size=_vocab(tuned.base_model))
    train_steps(tuned, batch)
    expected = _logits(tuned, batch)
    for training in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            tuned.save(tmp + "/adapter", training=training)
            loaded = peftkit.load(model_factory(), tmp + "/adapter", is_trainable=training)
        got = _logits(loaded, batch)
        assert torch.equal(got, expected), (
            f"{method}: outputs after save/load (training={training}) differ by {(got - expected).abs().max():.3g}"
        )
        if training:
            assert loaded.trainable_parameters(), f"{method}: load(is_trainable=True) left nothing trainable"
            original = tuned.adapter_state_dict(training=True)
            again = loaded.adapter_state_dict(training=True)
            assert original.keys() == again.keys(), f"{method}: training-state keys differ after load"
            bad = [k for k in original if not torch.equal(original[k], again[k])]
            assert not bad, f"{method}: training-state tensors differ after load: {bad[:5]}"
        else:
            assert not loaded.trainable_parameters(), f"{method}: load(is_trainable=False) left parameters trainable"


def check_merge(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """merge / unmerge / merge_and_unload equal the unmerged outputs within 1e-5, or merge is refused clearly."""
    tuned = peftkit.wrap(model_factory(), method, **options)
    batch = sample_batch(vocab_size=_vocab(tuned.base_model))
    train_steps(tuned, batch)
    expected = _logits(tuned, batch)
    injector = peftkit.plugin_manager().get_injector(method)
    if not injector.supports_merge:
        try:
            tuned.merge()
        except MergeNotSupportedError as exc:
            assert method in str(exc), f"{method}: merge refusal does not name the method: {exc}"
            return
        raise AssertionError(f"{method}: supports_merge is False but merge() did not raise MergeNotSupportedError")
    tuned.merge()
    merged = _logits(tuned, batch)
    assert torch.allclose(merged, expected, atol=MERGE_TOLERANCE, rtol=0), (
        f"{method}: merged output differs by {(merged - expected).abs().max():.3g}"
    )
    tuned.unmerge()
    unmerged = _logits(tuned, batch)
    assert torch.allclose(unmerged, expected, atol=MERGE_TOLERANCE, rtol=0), (
        f"{method}: output after unmerge differs by {(unmerged - expected).abs().max():.3g}"
    )
    plain = tuned.merge_and_unload()
    residue = [n for n, m in plain.named_modules() if is_adapter_layer(m)]
    assert not residue, f"{method}: merge_and_unload left adapter modules: {residue[:5]}"
    final = _logits(plain, batch)
    assert torch.allclose(final, expected, atol=MERGE_TOLERANCE, rtol=0), (
        f"{method}: merge_and_unload output differs by {(final - expected).abs().max():.3g}"
    )


def check_generate(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """Greedy ``generate()`` works, returns the prompt plus new tokens, and is deterministic."""
    tuned = peftkit.wrap(model_factory(), method, **options)
    batch = sample_batch(vocab_size=_vocab(tuned.base_model))
    train_steps(tuned, batch)
    prompt = batch["input_ids"][:, :5]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    out = tuned.generate(input_ids=prompt, **kwargs)
    assert out.shape == (prompt.shape[0], prompt.shape[1] + 4), f"{method}: generate returned shape {tuple(out.shape)}"
    assert torch.equal(out[:, : prompt.shape[1]], prompt), f"{method}: generate did not return the prompt first"
    again = tuned.generate(input_ids=prompt, **kwargs)
    assert torch.equal(out, again), f"{method}: greedy generation is not deterministic"


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
        ),
    }


def check_unwrap_leaves_no_residue(method: str, model_factory: ModelFactory, options: dict[str, Any]) -> None:
    """wrap -> unload, three times, leaves the model exactly as it was (modules, tensors, flags, hooks, outputs)."""
    model = model_factory()
    batch = sample_batch(vocab_size=_vocab(model))
    expected = _logits(model, batch)
    before = _snapshot(model)
    for _ in range(3):
        tuned = peftkit.wrap(model, method, **options)
        train_steps(tuned, batch, steps=1)
        model = tuned.unload()
    after = _snapshot(model)
    assert after["modules"] == before["modules"], f"{method}: module tree changed after unload"
    assert after["state"].keys() == before["state"].keys(), f"{method}: state_dict keys changed after unload"
    bad = [k for k in before["state"] if not torch.equal(before["state"][k], after["state"][k])]
    assert not bad, f"{method}: base tensors changed after unload: {bad[:5]}"
    assert after["requires_grad"] == before["requires_grad"], f"{method}: requires_grad flags not restored"
    assert after["hooks"] == before["hooks"], f"{method}: hooks left behind ({after['hooks']} vs {before['hooks']})"
    assert torch.equal(_logits(model, batch), expected), f"{method}: outputs changed after unload"


CHECKS: dict[str, Callable[[str, ModelFactory, dict[str, Any]], None]] = {
    "only_adapter_parameters_train": check_only_adapter_parameters_train,
    "disable_gives_base_output": check_disable_gives_base_output,
    "save_load_roundtrip": check_save_load_roundtrip,
    "merge": check_merge,
    "generate": check_generate,
    "unwrap_leaves_no_residue": check_unwrap_leaves_no_residue,
}


def check_injector(
    method: str,
    *,
    model_factory: ModelFactory = tiny_llama,
    checks: list[str] | None = None,
    **options: Any,
) -> None:
    """Run the conformance checks for ``method`` with ``options`` on models from ``model_factory``.

    :param method: a registered method name.
    :param model_factory: builds a fresh, identical base model on each call.
    :param checks: names from :data:`CHECKS` (default: all).
    :raises AssertionError: from the first failing check, naming what broke.
    """
    for name in checks or list(CHECKS):
        if name not in CHECKS:
            raise KeyError(f"unknown conformance check {name!r}; available: {', '.join(CHECKS)}")
        CHECKS[name](method, model_factory, dict(options))

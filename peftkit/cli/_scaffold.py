"""``peftkit new-method``: the templates of a new plugin package, and the function that writes them.

The templates are :class:`string.Template` strings (``$name``, ``$Class``, ...), so the
Python code inside them keeps its ``{}`` as written and no package data is needed.
A generated package is deliberately plain (a LoRA-like low-rank adapter, or a
next-token LM objective) so that it passes its own tests before the author changes
anything; ``TODO(you)`` comments say where the author's own math goes.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from peftkit.errors import PeftkitError

__all__ = ["KINDS", "check_name", "default_directory", "write_plugin"]

KINDS = ("method", "objective")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_MAX_NAME = 64  # becomes a module, a distribution and a folder name

# ====================================================================== shared
_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "$summary"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["peftkit>=$peftkit_version"]

[project.optional-dependencies]
test = ["pytest>=7"]  # 7: pythonpath in [tool.pytest.ini_options]

# This table is what makes peftkit find the $kind: <name> = "<module holding the hookimpls>".
[project.entry-points.peftkit]
$name = "$package"

[tool.setuptools]
packages = ["$package"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]  # the tests also run from a checkout that is not pip-installed
'''

# ====================================================================== method
_METHOD_INIT = '''\
"""$Title for peftkit: TODO(you): one line on what the method does (Authors, year, https://arxiv.org/abs/XXXX.XXXXX).

TODO(you): replace this paragraph with your method's paper and formula. As generated, this
is a plain low-rank additive adapter (LoRA's update, Hu et al., 2021), so the package passes
its tests before you change anything. For each target layer with frozen weight ``W``
(out x in) it learns ``A`` (r x in) and ``B`` (out x r)::

    h = W x + (alpha / r) * B A x          # <- your method's formula

``B`` starts at zero, so training starts exactly at the base model, and the update merges
exactly into ``W`` (``W + (alpha / r) B A``).

Where things are: the math in :mod:`.layer` (``forward`` and ``delta_weight``), the options
in :mod:`.options`. This module only describes the method and registers it with peftkit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peftkit
from peftkit.injection import InjectionContext
from torch import nn

from $package.layer import ${Class}Layer, is_supported_layer
from $package.options import ${Class}Options

__all__ = ["${Class}Injector", "${Class}Layer", "${Class}Options"]


class ${Class}Injector:
    """The ``$name`` method: what ``peftkit.wrap(model, "$name", **options)`` runs."""

    name = "$name"
    description = "$name: low-rank updates B·A on Linear/Conv1D layers (TODO(you): your one-line summary); exact merge"
    options = ${Class}Options
    supports_merge = True
    # What recipes with train.lr: auto use; methods differ by more than 10x. TODO(you): measure it
    # with `peftkit tune-lr $name` (1e-3 is what LoRA's low-rank updates train well with).
    recommended_lr = 1e-3

    def inject(self, context: InjectionContext, options: ${Class}Options) -> None:
        # "all-linear" also selects GPT-2's Conv1D and quantized linears; peftkit_layer_wrapper
        # below decides which of them this method can wrap (the others are a clear TargetError).
        for name, _ in context.find_targets(options.target_modules, layers=options.layers):
            context.wrap(name, options)  # re-uses this method's wrapper if the layer already has one


@peftkit.hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(${Class}Injector())


# trylast, as the built-ins do: another plugin can teach "$name" more layer types
# (e.g. bitsandbytes' Linear4bit) by answering this hook before this default.
@peftkit.hookimpl(trylast=True)
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method == "$name" and is_supported_layer(layer):
        return ${Class}Layer
    return None
'''

_METHOD_OPTIONS = '''\
"""Options of the ``$name`` method.

peftkit checks what users pass against this dataclass (unknown keys, types) and then
calls :meth:`${Class}Options.validate` for ranges, reporting every problem at once.
Keep the fields JSON-friendly: they are saved in ``adapter_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_ALPHA", "MAX_RANK", "${Class}Options"]

#: Upper bounds, so that an edited adapter_config.json cannot ask for terabytes: a rank past the
#: width of any model's layers adds nothing but memory.
MAX_RANK = 65536
MAX_ALPHA = 65536.0


@dataclass
class ${Class}Options:
    """``$name`` options (TODO(you): add your method's own, each with a default).

    Attributes:
        r: rank of the update ``B A`` (1..MAX_RANK).
        alpha: scaling numerator (0 < alpha <= MAX_ALPHA): the update is multiplied by ``alpha / r``.
        target_modules: module-name suffixes (``["q_proj", "v_proj"]``), a full-match regex, or
            ``"all-linear"`` (every Linear-like layer but the output head).
        layers: restrict to these block indices (``None``: every block).
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: str | list[str] = "all-linear"
    layers: int | list[int] | None = None

    def validate(self) -> list[str]:
        """Range problems, one sentence each, naming the option, its value and what is allowed."""
        problems = []
        if not 1 <= self.r <= MAX_RANK:
            problems.append(f"option 'r' = {self.r!r} must be in 1..{MAX_RANK}")
        if not 0 < self.alpha <= MAX_ALPHA:
            problems.append(f"option 'alpha' = {self.alpha!r} must be > 0 and <= {MAX_ALPHA:g}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("option 'target_modules' = [] is empty; name at least one module or use 'all-linear'")
        return problems

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
'''

_METHOD_LAYER = '''\
"""``${Class}Layer``: a Linear or Conv1D layer plus one low-rank update per adapter name.

As generated, the update is LoRA's (Hu et al., 2021): the base weight ``W`` (out x in)
stays frozen and each adapter learns ``A`` (r x in) and ``B`` (out x r)::

    h = W x + (alpha / r) * B A x

TODO(you): put your method's math in ``forward`` and ``delta_weight``, keeping the two
equal (the conformance suite checks merged against unmerged outputs). LoHa, for example,
learns two pairs and multiplies them elementwise, ``delta = (B1 A1) * (B2 A2)`` (out x in):
add ``A2``/``B2`` beside ``A``/``B`` in ``add_adapter``, ``adapter_parameters`` and
``adapter_state_dict``, and add ``F.linear(x, delta)`` in ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peftkit.injection import copy_adapter_tensors, layer_features
from peftkit.targeting import innermost_base
from torch import nn

from $package.options import ${Class}Options

__all__ = ["${Class}Layer", "is_supported_layer"]


def is_supported_layer(layer: nn.Module) -> bool:
    """``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's projections; weight stored in x out)."""
    return isinstance(layer, nn.Linear) or _is_conv1d(layer)


def _is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # by name: no need to import transformers here


class ${Class}Layer(nn.Module):
    """Wraps ``base_layer`` (kept, unchanged, as an attribute) and adds the active adapters' updates.

    Several adapters may live in one wrapper: for a second adapter on this layer peftkit calls
    :meth:`add_adapter` on it instead of wrapping again (it recognises the wrapper by
    ``peftkit_method``). A new adapter is inactive until peftkit calls :meth:`set_active_adapters`.
    """

    peftkit_method = "$name"

    def __init__(self, base_layer: nn.Module, adapter_name: str, options: ${Class}Options) -> None:
        super().__init__()
        self.base_layer = base_layer  # possibly another method's wrapper: innermost_base() finds the weight
        self.in_features, self.out_features = layer_features(base_layer)
        self.A = nn.ParameterDict()  # adapter name -> (r, in)
        self.B = nn.ParameterDict()  # adapter name -> (out, r)
        self.scaling: dict[str, float] = {}
        self._active: list[str] = []
        self._merged: set[str] = set()
        self.add_adapter(adapter_name, options)

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        for name in self._active:
            if name in self._merged:
                continue  # already inside the base weight
            a, b = self.A[name], self.B[name]  # (r, in), (out, r)
            # TODO(you): your method's update goes here; it must equal x @ delta_weight(name).T.
            h = F.linear(x.to(a.dtype), a)  # (B, T, r)
            out = out + (F.linear(h, b) * self.scaling[name]).to(out.dtype)  # (B, T, out)
        return out

    # ----------------------------------------------------------- adapters
    def add_adapter(self, name: str, options: ${Class}Options) -> None:
        """Create adapter ``name``'s tensors on the base weight's device."""
        weight = innermost_base(self.base_layer).weight
        # The base's dtype when it is a float (fp16/bf16 bases keep fp16/bf16 adapters);
        # float32 when the base stores integers (quantized weights).
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        a = torch.empty(options.r, self.in_features, device=weight.device, dtype=dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default init
        b = torch.zeros(self.out_features, options.r, device=weight.device, dtype=dtype)  # zero: starts at the base
        self.A[name] = nn.Parameter(a)
        self.B[name] = nn.Parameter(b)
        self.scaling[name] = options.scaling

    def adapter_names(self) -> list[str]:
        return list(self.A.keys())

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = [n for n in names if n in self.A]  # names of adapters on other layers are not ours

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.A[name]
        yield self.B[name]

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        # No training-only tensors here, so both forms are the same.
        return {"A": self.A[name], "B": self.B[name]}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        copy_adapter_tensors(self.adapter_state_dict(name), state)  # strict: names missing keys and wrong shapes

    def delete_adapter(self, name: str) -> None:
        # Never touches the base weight: merge_and_unload merges first, then deletes.
        del self.A[name]
        del self.B[name]
        self.scaling.pop(name)
        self._merged.discard(name)
        self._active = [n for n in self._active if n != name]

    # -------------------------------------------------------------- merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B A`` in the base weight's layout: (out, in), or (in, out) for Conv1D.

        TODO(you): your method's update as one dense matrix (LoHa: ``(B1 A1) * (B2 A2)``).
        """
        a, b = self.A[name], self.B[name]
        dtype = torch.promote_types(a.dtype, torch.float32)  # at least float32: a half-precision product loses digits
        delta = (b.to(dtype) @ a.to(dtype)) * self.scaling[name]  # (out, in)
        return delta.T if _is_conv1d(innermost_base(self.base_layer)) else delta

    def merge(self, name: str) -> None:
        if name in self._merged:
            return
        weight = innermost_base(self.base_layer).weight
        with torch.no_grad():
            weight.add_(self.delta_weight(name).to(weight.dtype))
        self._merged.add(name)

    def unmerge(self, name: str) -> None:
        if name not in self._merged:
            return
        weight = innermost_base(self.base_layer).weight
        with torch.no_grad():
            weight.sub_(self.delta_weight(name).to(weight.dtype))
        self._merged.discard(name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names()}"
'''

_METHOD_TESTS = '''\
"""Tests of the ``$name`` method: peftkit's conformance suite, a hand-written reference, option checks.

Each test registers this package with ``peftkit.testing.registered_plugin``, so they pass
whether or not it is pip-installed, and other installed plugins never interfere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import peftkit
import pytest
import torch
from peftkit.errors import OptionsError
from peftkit.testing import (
    CHECKS,
    assert_matches_reference,
    check_injector,
    registered_plugin,
    sample_batch,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

import $package
from $package.layer import ${Class}Layer
from $package.options import MAX_RANK, ${Class}Options

MODELS = pytest.mark.parametrize("model_factory", [tiny_llama, tiny_gpt2], ids=["llama-linear", "gpt2-conv1d"])


@pytest.fixture(autouse=True)
def plugin():
    with registered_plugin($package, name="$name") as pm:
        yield pm


def test_registered_with_its_hooks(plugin):
    assert "$name" in plugin.injectors()
    assert "$name" in peftkit.available_methods()


@MODELS
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(check: str, model_factory: Callable[[], nn.Module]):
    check_injector("$name", model_factory=model_factory, checks=[check], r=4)


# --------------------------------------------------------------- reference
def _add_update(a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[..., torch.Tensor]:
    """A forward hook adding ``scale * B A x`` to a layer's output: the formula, written independently."""

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]  # (B, T, in)
        return output + scale * (x @ a.T @ b.T)  # (B, T, out)

    return hook


@MODELS
def test_matches_a_hand_written_reference(model_factory: Callable[[], nn.Module]):
    # TODO(you): when you change the math, write the reference from your paper's formula here.
    tuned = peftkit.wrap(model_factory(), "$name", r=4, alpha=8.0)
    reference = model_factory()  # the same seed: the same base weights
    torch.manual_seed(0)
    hooked = 0
    for name, layer in tuned.base_model.named_modules():
        if isinstance(layer, ${Class}Layer):
            adapter = tuned.active_adapter
            with torch.no_grad():
                layer.B[adapter].normal_(std=0.1)  # B starts at zero: give the update something to show
            a, b = layer.A[adapter].detach(), layer.B[adapter].detach()
            reference.get_submodule(name).register_forward_hook(_add_update(a, b, scale=8.0 / 4))
            hooked += 1
    assert hooked > 0, "wrap() wrapped no layer"
    assert_matches_reference(tuned, reference, sample_batch(), atol=1e-5)


# ----------------------------------------------------------------- options
def test_defaults_are_valid():
    assert ${Class}Options().validate() == []


@pytest.mark.parametrize(
    ("options", "named"),
    [({"r": 0}, "'r'"), ({"r": MAX_RANK + 1}, "'r'"), ({"alpha": 0.0}, "'alpha'"), ({"target_modules": []}, "'target_modules'")],
)
def test_bad_options_are_one_error_naming_the_option(options: dict[str, Any], named: str):
    model = tiny_llama()
    with pytest.raises(OptionsError, match=named):
        peftkit.wrap(model, "$name", **options)
    assert not any(isinstance(m, ${Class}Layer) for m in model.modules()), "a refused wrap left layers behind"
'''

# The last section of both kinds' README (filled with the same placeholders).
_PUBLISH = '''\
## Publish

Keep the distribution name `$dist` and the `[project.entry-points.peftkit]` table, then:

```bash
python -m build && twine upload dist/*
```

Users `pip install $dist`; `peftkit plugins` lists it with its version and hooks.
'''

_METHOD_README = '''\
# $dist

A [peftkit](https://pypi.org/project/peftkit/) plugin adding the `$name` PEFT method.

Generated by `peftkit new-method $name`. As generated, `$name` is a plain low-rank adapter
(LoRA's update, `h = W x + (alpha / r) B A x`) on `nn.Linear` and GPT-2's `Conv1D` layers, so it
passes its tests before you change anything. Lines to change are marked `TODO(you)`.

## What to edit first

1. `$package/layer.py`: your math, in `forward` and `delta_weight` (keep them equal: merging is
   checked against the unmerged output). New tensors go in `add_adapter`, `adapter_parameters`
   and `adapter_state_dict`.
2. `$package/options.py`: your options, with range checks and upper bounds in `validate()`.
3. `$package/__init__.py`: the docstring (paper link, formula), `description`, and
   `recommended_lr`: methods differ by more than 10x, so measure it with `peftkit tune-lr $name`
   (from a peftkit checkout, once the package is installed).
4. `tests/test_$name.py`: the hand-written reference, from your paper's formula.

## Test

```bash
pip install -e ".[test]"
pytest
```

The tests register the package with `peftkit.testing.registered_plugin`, so `pytest` also works
in a checkout that is not installed, and other installed plugins never interfere. They run
peftkit's conformance suite (only adapter parameters train, disabled adapters give the base output
exactly, save/load is bit-exact, merge is exact, `generate()` works, unloading leaves no residue)
on a Llama-style and a GPT-2-style tiny model, plus a reference test and option checks.

## Use

```bash
peftkit methods                                      # lists $name with this package's version
peftkit train recipes/sft-lora.yaml method.name=$name
```

```python
import peftkit
tuned = peftkit.wrap(model, "$name", r=8)
```

''' + _PUBLISH

# =================================================================== objective
_OBJECTIVE_INIT = '''\
"""$Title for peftkit: TODO(you): one line on what the objective trains for (Authors, year, link).

TODO(you): replace this paragraph with your objective and its loss. As generated, it is
plain next-token language modelling on a text field of each record::

    L = mean over target tokens t of  -log p(x_t | x_<t)        # <- your loss

Records become examples in ``prepare_data``, examples become batches in ``collate``, and
``loss`` returns an ``ObjectiveLoss``; peftkit's trainer does the rest (optimizer,
schedule, evaluation, checkpoints, saving the adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import peftkit
import torch
import torch.nn.functional as F
from peftkit.registry import ObjectiveLoss
from peftkit.training.data import DataError, RecordError, require_string
from torch import nn

from $package.options import ${Class}Options

__all__ = ["IGNORE_INDEX", "${Class}Objective", "${Class}Options"]

IGNORE_INDEX = -100  # label of positions that are not targets (padding): skipped by the loss


class ${Class}Objective:
    """The ``$name`` objective: what a recipe with ``objective.name: $name`` trains with."""

    name = "$name"
    description = "$name: next-token loss on each record's text (TODO(you): your one-line summary)"
    options = ${Class}Options

    def prepare_data(
        self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: ${Class}Options, max_length: int
    ) -> list[dict[str, Any]]:
        """Tokenize each record's text, end it with the EOS token, cut it to ``max_length``.

        :raises RecordError: for a record without a string ``options.text_key`` field.
        :raises DataError: when no record is left to train on.
        """
        examples = []
        for index, record in enumerate(records):
            if options.text_key not in record:
                raise RecordError(index, f"has no field {options.text_key!r} (objective.options.text_key); it has {sorted(record)}")
            text = require_string(record[options.text_key], f"field {options.text_key!r}", index)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = ids[:max_length]
            if len(ids) >= 2:  # position 0 is never predicted: one token teaches nothing
                examples.append({"input_ids": ids})
        if records and not examples:
            raise DataError(f"none of {len(records)} records has a text of 2 tokens or more; check objective.options.text_key")
        return examples

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example; padding is masked out of attention and loss."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(e["input_ids"]) for e in examples)
        input_ids, attention_mask, labels = [], [], []
        for e in examples:
            ids, padding = list(e["input_ids"]), length - len(e["input_ids"])
            input_ids.append(ids + [pad] * padding)
            attention_mask.append([1] * len(ids) + [0] * padding)
            labels.append(ids + [IGNORE_INDEX] * padding)
        tensors = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return {k: torch.tensor(v, dtype=torch.long) for k, v in tensors.items()}  # each (B, T)

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: ${Class}Options) -> ObjectiveLoss:
        """Mean cross-entropy of each target token given the ones before it."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        # TODO(you): your loss goes here. Position t predicts token t + 1, hence the shift.
        logits, targets = logits[:, :-1], batch["labels"][:, 1:]  # (B, T-1, V), (B, T-1)
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
            label_smoothing=options.label_smoothing,
        )
        count = int((targets != IGNORE_INDEX).sum())
        if count == 0:
            raise DataError("$name: a batch has no target token (every label is padding); check data.max_length")
        loss = total / count
        return ObjectiveLoss(loss, count, {"token_loss": float(loss.detach())})


@peftkit.hookimpl
def peftkit_register_objectives(register: Callable[[Any], None]) -> None:
    register(${Class}Objective())
'''

_OBJECTIVE_OPTIONS = '''\
"""Options of the ``$name`` objective.

peftkit checks a recipe's ``objective.options`` against this dataclass (unknown keys, types)
and then calls :meth:`${Class}Options.validate` for ranges, reporting every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["${Class}Options"]


@dataclass
class ${Class}Options:
    """``$name`` options (TODO(you): add your objective's own, each with a default).

    Attributes:
        text_key: the record field holding the text to learn.
        label_smoothing: mass moved from each target token to the whole vocabulary (0 <= x < 1; 0: off).
    """

    text_key: str = "text"
    label_smoothing: float = 0.0

    def validate(self) -> list[str]:
        """Range problems, one sentence each, naming the option, its value and what is allowed."""
        problems = []
        if not self.text_key.strip():
            problems.append(f"option 'text_key' = {self.text_key!r} is empty; name the record field holding the text")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"option 'label_smoothing' = {self.label_smoothing!r} must be in [0, 1)")
        return problems
'''

_OBJECTIVE_TESTS = '''\
"""Tests of the ``$name`` objective: data preparation, a reference loss, and training through peftkit's Trainer.

Each test registers this package with ``peftkit.testing.registered_plugin``, so they pass
whether or not it is pip-installed, and other installed plugins never interfere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import peftkit
import pytest
import torch
from peftkit.testing import registered_plugin, tiny_llama, tiny_tokenizer
from peftkit.training.data import DataError
from peftkit.training.recipe import RecipeError, recipe_from_dict
from peftkit.training.trainer import Trainer

import $package
from $package import IGNORE_INDEX, ${Class}Objective
from $package.options import ${Class}Options

TEXTS = [
    "the sky is blue",
    "what is two plus three? five",
    "hello, my name is paris",
    "the cat and the dog love the sun",
    "one two three four five six",
    "red green blue: a color",
    "tell me about the moon at night",
    "yes, thanks",
]


@pytest.fixture(autouse=True)
def plugin():
    with registered_plugin($package, name="$name") as pm:
        yield pm


def _batch(texts: list[str]) -> dict[str, torch.Tensor]:
    objective, tokenizer = ${Class}Objective(), tiny_tokenizer()
    examples = objective.prepare_data([{"text": t} for t in texts], tokenizer, ${Class}Options(), max_length=32)
    return objective.collate(examples, tokenizer)


def test_registered_with_its_hook(plugin):
    assert "$name" in plugin.objectives()


def test_padding_is_neither_attended_to_nor_a_target():
    batch = _batch(["the sky is blue", "yes"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape
    padding = batch["attention_mask"] == 0
    assert padding.any(), "two texts of different lengths must need padding"
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][~padding], batch["input_ids"][~padding])


def test_loss_equals_the_models_own_language_modelling_loss():
    # TODO(you): when you change the loss, compare it with your paper's formula here.
    torch.manual_seed(0)
    model, batch = tiny_llama(), _batch(TEXTS[:4])
    result = ${Class}Objective().loss(model, batch, ${Class}Options())
    with torch.no_grad():
        expected = model(**batch).loss  # transformers' own shifted cross-entropy, padding ignored
    torch.testing.assert_close(result.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert result.num_targets == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_a_record_without_text_is_an_error_naming_it():
    with pytest.raises(DataError, match="record 1.*'text'"):
        ${Class}Objective().prepare_data([{"text": "hi"}, {"prompt": "hi"}], tiny_tokenizer(), ${Class}Options(), 32)


def _recipe(tmp_path: Path, **options: object):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\\n" for t in TEXTS * 4))
    return recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 4}},
            "objective": {"name": "$name", "options": options},
            "data": {"train": str(data), "eval_size": 8, "max_length": 16},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2},
            "output": {"dir": str(tmp_path / "out")},
        }
    )


def test_trains_through_the_trainer_and_saves_a_loadable_adapter(tmp_path):
    result = Trainer(_recipe(tmp_path), model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()
    assert result.steps == 2
    assert result.train_loss is not None and math.isfinite(result.train_loss)
    assert result.eval_loss_after < result.eval_loss_before, "two steps on the training texts did not lower the held-out loss"
    loaded = peftkit.load(tiny_llama(), result.adapter_dir)
    assert loaded.active_adapter is not None


def test_bad_options_are_a_recipe_error_naming_them(tmp_path):
    with pytest.raises(RecipeError, match="label_smoothing") as caught:
        _recipe(tmp_path, label_smoothing=1.5, text_key="")
    assert "text_key" in str(caught.value)  # every problem at once
'''

_OBJECTIVE_README = '''\
# $dist

A [peftkit](https://pypi.org/project/peftkit/) plugin adding the `$name` training objective.

Generated by `peftkit new-method $name --kind objective`. As generated, `$name` is plain
next-token language modelling on each record's `text` field, so it passes its tests before you
change anything. Lines to change are marked `TODO(you)`.

## What to edit first

1. `$package/__init__.py`: the docstring (paper, loss formula), `description`, and the three
   steps: `prepare_data` (records -> token ids), `collate` (examples -> tensors), `loss`
   (returns `ObjectiveLoss(loss, num_targets, metrics)`). Optional steps (`setup_model`,
   `save_extras`, `eval_metrics`, `run`) are documented on `peftkit.registry.Objective`.
2. `$package/options.py`: your options, with range checks in `validate()`.
3. `tests/test_$name.py`: the reference loss, from your paper's formula.

## Test

```bash
pip install -e ".[test]"
pytest
```

The tests register the package with `peftkit.testing.registered_plugin`, so `pytest` also works
in a checkout that is not installed, and other installed plugins never interfere. They check the
batches, compare the loss with transformers' own, and train two steps through peftkit's trainer.

## Use

```bash
peftkit methods                                          # lists $name under objectives
peftkit train recipes/sft-lora.yaml objective.name=$name data.train=texts.jsonl data.eval=null  # {"text": ...} records
```

''' + _PUBLISH

_FILES = {
    "method": {
        "pyproject.toml": _PYPROJECT,
        "README.md": _METHOD_README,
        "$package/__init__.py": _METHOD_INIT,
        "$package/options.py": _METHOD_OPTIONS,
        "$package/layer.py": _METHOD_LAYER,
        "tests/test_$name.py": _METHOD_TESTS,
    },
    "objective": {
        "pyproject.toml": _PYPROJECT,
        "README.md": _OBJECTIVE_README,
        "$package/__init__.py": _OBJECTIVE_INIT,
        "$package/options.py": _OBJECTIVE_OPTIONS,
        "tests/test_$name.py": _OBJECTIVE_TESTS,
    },
}

_SUMMARIES = {
    "method": "The $name PEFT method for peftkit (TODO(you): one line on what it does)",
    "objective": "The $name training objective for peftkit (TODO(you): one line on what it trains for)",
}


# ===================================================================== writing
def check_name(name: str, kind: str) -> None:
    """Refuse a ``name`` that cannot be a module and a method/objective name, or that a built-in already has.

    :raises PeftkitError: naming the value and a name that would do.
    """
    if not (_NAME.fullmatch(name) and len(name) <= _MAX_NAME and not keyword.iskeyword(name)):
        suggestion = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        if not _NAME.fullmatch(suggestion) or keyword.iskeyword(suggestion):
            suggestion = "loha_demo"
        raise PeftkitError(
            f"new-method: NAME {name!r} is not usable: it becomes the {kind} name and the module peftkit_<NAME>, "
            f"so use lowercase letters, digits and '_', starting with a letter, at most {_MAX_NAME} characters "
            f"(e.g. {suggestion[:_MAX_NAME]!r})"
        )
    taken = _builtin_names()
    if name in taken:
        raise PeftkitError(
            f"new-method: NAME {name!r} is already taken by peftkit's built-in {taken[name]}, which would win over "
            f"yours; pick another name (prefix it with your project's, e.g. 'myproject_{name}')"
        )


def _builtin_names() -> dict[str, str]:
    """Names a new plugin must not take: built-in methods, objectives and plugin names -> what has them."""
    from peftkit.plugins import create_plugin_manager

    pm = create_plugin_manager(autoload=False, only=[])
    taken = {str(name): "plugin" for name, _ in pm.list_name_plugin()}
    taken.update({name: "objective" for name in pm.objectives()})
    taken.update({name: "method" for name in pm.injectors()})
    return taken


def default_directory(name: str) -> Path:
    """``./peftkit-<name>`` (``_`` written ``-``, as distribution names are)."""
    return Path(f"peftkit-{name.replace('_', '-')}")


def _check_directory(directory: Path) -> None:
    if directory.is_dir():
        entries = sorted(p.name for p in directory.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise PeftkitError(
                f"new-method: --dir {str(directory)!r} exists and is not empty (it holds {shown}); "
                "new-method never overwrites files: give a new or empty folder with --dir"
            )
    elif directory.exists():
        raise PeftkitError(f"new-method: --dir {str(directory)!r} is a file, not a folder; give a new or empty folder with --dir")


def write_plugin(name: str, directory: Path | None = None, *, kind: str = "method") -> tuple[Path, list[Path]]:
    """Write a complete plugin package for the ``kind`` named ``name`` into ``directory``.

    :param name: the method or objective name, also the entry-point name and ``peftkit_<name>``'s suffix.
    :param directory: a new or empty folder; default :func:`default_directory`.
    :param kind: ``"method"`` or ``"objective"``.
    :returns: the folder and the files written in it.
    :raises PeftkitError: for an unusable name, an unknown kind, or a folder that exists and is not empty.
    """
    if kind not in KINDS:
        raise PeftkitError(f"new-method: --kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
    check_name(name, kind)
    directory = directory if directory is not None else default_directory(name)
    _check_directory(directory)
    from peftkit._version import __version__

    values = {
        "name": name,
        "Class": "".join(part.capitalize() for part in name.split("_")),
        "Title": " ".join(part.capitalize() for part in name.split("_") if part),
        "package": f"peftkit_{name}",
        "dist": f"peftkit-{name.replace('_', '-')}",
        "kind": kind,
        "peftkit_version": __version__,
    }
    values["summary"] = Template(_SUMMARIES[kind]).substitute(values)
    written = []
    for relative, template in _FILES[kind].items():
        path = directory / Template(relative).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as fh:  # "x": never overwrite, even if a file appeared meanwhile
            fh.write(Template(template).substitute(values))
        written.append(path)
    return directory, written

"""Every hook is documented and exercised by a test; each hook does what its docstring says."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import hookspecs
from peftkit.errors import PluginError, TargetError
from peftkit.testing import tiny_llama

HOOKS = [name for name in hookspecs.__all__ if name.startswith("peftkit_")]
TESTS = Path(__file__).resolve().parents[1]


def test_hook_list_matches_module():
    defined = {n for n, f in vars(hookspecs).items() if n.startswith("peftkit_") and inspect.isfunction(f)}
    assert defined == set(HOOKS), "every hook must be listed in hookspecs.__all__"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert len(doc.split()) >= 15, f"{hook} needs a docstring saying what it does, its arguments and return"
    params = inspect.signature(getattr(hookspecs, hook)).parameters
    for param in params:
        assert param in doc, f"{hook}'s docstring does not describe its argument {param!r}"
    assert ":returns:" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_tested(hook):
    this = Path(__file__).resolve()
    used = [p for p in TESTS.rglob("test_*.py") if p.resolve() != this and hook in p.read_text()]
    used += [this] if f"def test_{hook}" in this.read_text() else []
    assert used, f"no test exercises {hook}"


# ---------------------------------------------------------------- the hooks


def test_peftkit_register_objectives(register_plugin):
    @dataclass
    class Opts:
        weight: float = 1.0

    class Objective:
        name = "test_objective"
        description = "an objective registered by a test"
        options = Opts

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            register(Objective())

    register_plugin(Plugin(), name="objective-plugin")
    pm = peftkit.plugin_manager()
    assert pm.get_objective("test_objective").description.startswith("an objective")
    assert pm.objectives()["test_objective"].plugin == "objective-plugin"


def test_peftkit_register_rewards(register_plugin):
    class Longest:
        name = "test_longest"
        description = "a reward registered by a test: the completion's length"

        def __call__(self, prompts, completions, records):
            return [float(len(c)) for c in completions]

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_rewards(self, register):
            register(Longest())

    register_plugin(Plugin(), name="reward-plugin")
    pm = peftkit.plugin_manager()
    assert pm.rewards()["test_longest"].plugin == "reward-plugin"
    assert pm.get_reward("test_longest")(["p", "p"], ["ab", "abcd"], [{}, {}]) == [2.0, 4.0]


class ScaledLinear(nn.Module):
    """A linear layer type LoRA does not know: ``y = s * (x @ W.T)``."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.s = 2.0

    def forward(self, x):
        return self.s * (x @ self.weight.T)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ScaledLinear(4, 3)

    def forward(self, x):
        return self.proj(x)


def test_peftkit_layer_wrapper_teaches_lora_a_new_layer_type(register_plugin):
    toy = Toy()
    with pytest.raises(TargetError, match="cannot wrap proj of type ScaledLinear"):
        peftkit.wrap(toy, "lora", target_modules=["proj"])
    assert isinstance(toy.proj, ScaledLinear), "a failed wrap must leave the model as it was"

    lora_layer = peftkit.plugin_manager().hook.peftkit_layer_wrapper(method="lora", layer=nn.Linear(2, 2), options=None)

    class TeachScaledLinear:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer):
            if method == "lora" and isinstance(layer, ScaledLinear):
                return lora_layer  # the LoRA wrapper works on anything with in/out features and weight

    register_plugin(TeachScaledLinear(), name="teach-scaled")
    tuned = peftkit.wrap(toy, "lora", target_modules=["proj"], r=2)
    assert type(tuned.base_model.proj).__name__ == "LoraLayer"
    x = torch.randn(5, 4)
    with tuned.disable_adapters():
        assert torch.equal(tuned(x), 2.0 * (x @ toy.proj.base_layer.weight.T))


def test_peftkit_layer_wrapper_first_result_overrides_builtin(register_plugin):
    calls = []

    class Custom(nn.Module):
        peftkit_method = "lora"

        def __init__(self, base, adapter_name, options):
            super().__init__()
            self.base_layer = base
            calls.append(adapter_name)
            self.names = [adapter_name]
            self.delta = nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(base.out_features))})

        def forward(self, x):
            return self.base_layer(x) + self.delta[self.names[0]]

        def adapter_names(self):
            return list(self.delta)

        def set_active_adapters(self, names):
            pass

        def adapter_parameters(self, name):
            yield self.delta[name]

        def adapter_state_dict(self, name, *, training=False):
            return {"delta": self.delta[name]}

        def load_adapter_state_dict(self, name, state):
            self.delta[name].data.copy_(state["delta"])

        def delete_adapter(self, name):
            del self.delta[name]

        def merge(self, name):
            raise NotImplementedError

        def unmerge(self, name):
            raise NotImplementedError

    class Override:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer):
            return Custom if method == "lora" and isinstance(layer, nn.Linear) else None

    register_plugin(Override(), name="override")
    tuned = peftkit.wrap(tiny_llama(), "lora", target_modules=["q_proj"])
    assert len(calls) == 2 and all(isinstance(m, Custom) for n, m in tuned.named_modules() if n.endswith("q_proj"))


def test_peftkit_after_inject(register_plugin):
    seen = []

    class Recorder:
        @peftkit.hookimpl
        def peftkit_after_inject(self, model, adapter_name, method):
            seen.append((type(model).__name__, adapter_name, method, adapter_name in model.adapters))

    register_plugin(Recorder(), name="recorder")
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    tuned.add_adapter("second", "lora", r=2)
    assert seen == [("TunedModel", "default", "lora", True), ("TunedModel", "second", "lora", True)]


def test_peftkit_model_load_kwargs_merges_and_detects_conflicts(register_plugin):
    class A:
        @peftkit.hookimpl
        def peftkit_model_load_kwargs(self, method, options):
            return {"torch_dtype": "float32"} if method == "m" else None

    class B:
        @peftkit.hookimpl
        def peftkit_model_load_kwargs(self, method):
            return {"low_cpu_mem_usage": True}

    register_plugin(A(), name="a")
    register_plugin(B(), name="b")
    pm = peftkit.plugin_manager()
    assert pm.model_load_kwargs("m", None) == {"torch_dtype": "float32", "low_cpu_mem_usage": True}
    assert pm.model_load_kwargs("other", None) == {"low_cpu_mem_usage": True}

    class C:
        @peftkit.hookimpl
        def peftkit_model_load_kwargs(self):
            return {"low_cpu_mem_usage": False}

    register_plugin(C(), name="c")
    with pytest.raises(PluginError, match="'b' and 'c'|'c' and 'b'"):
        pm.model_load_kwargs("m", None)


def test_peftkit_register_commands(register_plugin, capsys):
    from peftkit.cli import main

    class Hello:
        @peftkit.hookimpl
        def peftkit_register_commands(self, subparsers):
            parser = subparsers.add_parser("hello", help="say hello")
            parser.add_argument("--name", default="world")
            parser.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)

    register_plugin(Hello(), name="hello-plugin")
    assert main(["hello", "--name", "peftkit"]) == 0
    assert capsys.readouterr().out == "hello peftkit\n"

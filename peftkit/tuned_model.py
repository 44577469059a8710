"""``TunedModel``: a frozen base model plus named adapters, and the operations on them.

The base model is modified in place (weight-side methods wrap its layers,
input-side methods hook its forward); ``TunedModel`` keeps the bookkeeping:
which adapters exist, which one is active, which are merged, and how to save,
load, merge, disable and remove them. It never names a method: everything
method-specific happens in the injectors and in the modules they insert, which
satisfy :class:`peftkit.registry.AdapterLayer`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from peftkit.adapter_io import add_adapter_with_state, load_adapter, save_adapter
from peftkit.errors import AdapterError, MergeNotSupportedError, UnknownMethodError
from peftkit.injection import InjectionContext, replace_module
from peftkit.modules_to_save import check_modules_to_save, inject_modules_to_save
from peftkit.options import build_options, options_to_dict
from peftkit.plugins import PluginManager, plugin_manager
from peftkit.registry import is_adapter_layer

__all__ = ["TunedModel", "AdapterInfo"]

_ATTACHED = "attached"


@dataclass
class AdapterInfo:
    """What ``TunedModel`` knows about one adapter."""

    method: str
    options: Any
    targets: dict[str, list[int]] = field(default_factory=dict)
    trainable: bool = True
    modules_to_save: list[str] = field(default_factory=list)


def _normalize_path(path: str) -> str:
    """Module path relative to the base model, without adapter wrappers' ``base_layer`` hops."""
    parts = [p for p in path.split(".") if p != "base_layer"]
    return ".".join(parts)


def _forward_with_signature_of(base_model: nn.Module) -> Callable[..., Any]:
    """A function calling ``TunedModel.forward``, whose signature is ``base_model.forward``'s (plus ``self``)."""

    def forward(self: "TunedModel", *args: Any, **kwargs: Any) -> Any:
        return type(self).forward(self, *args, **kwargs)

    try:
        signature = inspect.signature(base_model.forward)
    except (TypeError, ValueError):  # a forward inspect cannot read: keep (*args, **kwargs)
        return forward
    own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    forward.__signature__ = signature.replace(parameters=[own, *signature.parameters.values()])  # type: ignore[attr-defined]
    forward.__doc__ = TunedModel.forward.__doc__
    return forward


class TunedModel(nn.Module):
    """A frozen base model with named adapters.

    Call it like the base model; everything the base model has (``config``,
    ``device``, ...) is reachable on it. Create one with :func:`peftkit.wrap`
    or :func:`peftkit.load`.
    """

    def __init__(self, base_model: nn.Module, *, plugin_manager: PluginManager | None = None):
        super().__init__()
        self.base_model = base_model
        self.attached = nn.ModuleDict()
        self._pm = plugin_manager
        self._adapters: dict[str, AdapterInfo] = {}
        self._active: str | None = None
        self._merged: list[str] = []
        self._disabled = False
        # Restore exactly what the user had when the adapters are unloaded.
        self._original_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.train(base_model.training)  # keep the mode the user's model was in
        # transformers.Trainer keeps only the dataset columns named by ``model.forward``'s
        # parameters: this instance's forward shows the base model's signature.
        self.forward = types.MethodType(_forward_with_signature_of(base_model), self)

    # ------------------------------------------------------------ delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "attached"}:
                raise
            return getattr(self._modules["base_model"], name)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """Run the base model with the active adapter; takes exactly the base model's arguments.

        ``labels`` is named (and passed on only when given) so that
        ``transformers.Trainer``, which looks for label arguments in the class's
        ``forward``, finds it; ``inspect.signature(tuned.forward)`` is the base model's.
        """
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate with the active adapter (see the base model's ``generate``)."""
        return self.base_model.generate(*args, **kwargs)

    @property
    def plugin_manager(self) -> PluginManager:
        return self._pm if self._pm is not None else plugin_manager()

    # ------------------------------------------- Hugging Face conventions
    # The names transformers, TRL and peft users reach for; each is one of the methods below under another name.
    def get_base_model(self) -> nn.Module:
        """The wrapped base model (``self.base_model``), as ``peft.PeftModel.get_base_model`` returns it."""
        return self.base_model

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (``[]`` without adapters): peft's list-valued name."""
        return [] if self._active is None else [self._active]

    def disable_adapter(self) -> contextlib.AbstractContextManager[None]:
        """peft's name for :meth:`disable_adapters` (a context manager running the bare base model)."""
        return self.disable_adapters()

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        training: bool = False,
        is_main_process: bool = True,
    ) -> None:
        """Write adapter ``adapter_name`` (default: the active one) into ``save_directory``, keeping its other files.

        The conventional name for :meth:`save`. ``save_directory`` may already hold
        other files (a tokenizer, ``transformers.Trainer`` checkpoints): they stay, and
        ``adapter_config.json`` + ``adapter.safetensors`` are written beside them.
        A missing directory, or one holding only an adapter, is replaced atomically as
        :meth:`save` does; in a shared directory the two files are replaced one after
        the other (a crash in between leaves a checksum mismatch that loading reports).

        :param training: also keep training-only tensors (a resumable checkpoint).
        :param is_main_process: ``False`` writes nothing (the other ranks of a distributed run).
        """
        if is_main_process:
            from peftkit._hf_compat import save_beside_other_files

            save_beside_other_files(lambda path: self.save(path, adapter_name=adapter_name, training=training), save_directory)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | os.PathLike,
        *,
        adapter_name: str | None = None,
        is_trainable: bool = False,
    ) -> "TunedModel":
        """Load the adapter directory ``path`` onto ``model``: the conventional name for :func:`peftkit.load`."""
        from peftkit.api import load

        return load(model, path, adapter_name=adapter_name, is_trainable=is_trainable)

    # ------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, str]:
        """Adapter name -> method name, in creation order."""
        return {name: info.method for name, info in self._adapters.items()}

    def adapter_info(self, name: str) -> AdapterInfo:
        """The method, options and fingerprint of adapter ``name``."""
        self._check_name(name)
        return self._adapters[name]

    @property
    def active_adapter(self) -> str | None:
        """The adapter that takes part in ``forward`` (``None`` if there is none)."""
        return self._active

    def _check_name(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterError(
                f"no adapter named {name!r}; this model has: {', '.join(self._adapters) or '(none)'}"
            )

    def _adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        for path, module in self.named_modules():
            if path and is_adapter_layer(module):
                yield path, module

    def _layers_of(self, name: str) -> list[tuple[str, nn.Module]]:
        return [(p, m) for p, m in self._adapter_layers() if name in m.adapter_names()]

    def _injector(self, method: Any) -> tuple[Any, Any]:
        """Resolve a method name or options object to ``(injector, options_or_None)``."""
        if isinstance(method, str):
            return self.plugin_manager.get_injector(method), None
        if hasattr(method, "__dataclass_fields__"):
            return self.plugin_manager.injector_for_options(method), method
        raise UnknownMethodError(
            f"method must be a method name or a method options object, got {type(method).__name__}: {method!r}"
        )

    def add_adapter(
        self, name: str, method: Any, *, trainable: bool = True, modules_to_save: list[str] | None = None, **options: Any
    ) -> "TunedModel":
        """Inject a new adapter called ``name``.

        All or nothing: if injection or a ``peftkit_after_inject`` hook fails,
        the model is left exactly as it was (modules, adapters, active adapter,
        ``requires_grad`` flags, train/eval modes).

        :param name: adapter name, unique in this model.
        :param method: a registered method name or a method options object.
        :param trainable: whether the adapter's parameters require grad.
        :param modules_to_save: modules the adapter also trains as full copies, with any method
            (``["lm_head"]``; see :mod:`peftkit.modules_to_save`): saved with it, off under ``disable_adapters()``.
        :param options: the method's options (validated; unknown ones are an error).
        :returns: ``self``. The first adapter becomes active; later ones do not.
        :raises OptionsError, UnknownMethodError, TargetError, AdapterError:
        """
        injector, opts = self._prepare(name, method, options)
        with self._all_or_nothing(name):
            self._inject(name, injector, opts, trainable, modules_to_save)
            self.plugin_manager.call_hook("peftkit_after_inject", model=self, adapter_name=name, method=injector.name)
        return self

    def _prepare(self, name: str, method: Any, options: dict[str, Any], *, owner: str | None = None) -> tuple[Any, Any]:
        """Check that adapter ``name`` can be added and build its options; changes nothing."""
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterError(f"adapter name must be a non-empty string without '.', got {name!r}")
        if name in self._adapters:
            raise AdapterError(f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name")
        if self._merged:
            raise AdapterError(f"adapter(s) {self._merged} are merged; unmerge() before adding adapter {name!r}")
        injector, given = self._injector(method)
        if given is not None and options:
            raise AdapterError(f"pass either an options object or keyword options for {injector.name!r}, not both")
        # An object built by hand is re-validated like keyword options.
        values = options_to_dict(given) if given is not None else options
        return injector, build_options(injector.options, values, owner=owner or f"method {injector.name!r}")

    def _inject(self, name: str, injector: Any, opts: Any, trainable: bool, modules_to_save: list[str] | None = None) -> None:
        context = InjectionContext(self, name, injector.name, self.plugin_manager)
        injector.inject(context, opts)
        if not self._layers_of(name):
            raise AdapterError(f"method {injector.name!r} injected no adapter module for adapter {name!r} (a bug in its plugin)")
        saved = check_modules_to_save(modules_to_save)
        inject_modules_to_save(context, saved)
        self._adapters[name] = AdapterInfo(injector.name, opts, dict(context.targets), trainable, saved)
        self.train(self.training)  # new modules start in training mode; match the model
        if self._active is None:
            self._active = name
        self._apply_state()

    def _snapshot(self) -> Callable[[str], None]:
        """Capture the bookkeeping, ``requires_grad`` flags and modes; the result restores them and drops adapter ``name``."""
        adapters, active, merged, disabled = dict(self._adapters), self._active, list(self._merged), self._disabled
        flags = [(p, p.requires_grad) for p in self.parameters()]
        modes = [(m, m.training) for m in self.modules()]

        def restore(name: str) -> None:
            self._remove_adapter_modules(name)
            self._adapters, self._active, self._merged, self._disabled = adapters, active, merged, disabled
            self._apply_state()  # shared layers' active adapters
            for param, flag in flags:
                param.requires_grad_(flag)
            for module, mode in modes:
                module.training = mode

        return restore

    @contextlib.contextmanager
    def _all_or_nothing(self, name: str) -> Iterator[None]:
        """Undo whatever the block did if it raises anything (``KeyboardInterrupt`` too); ``name`` is the new adapter."""
        restore = self._snapshot()
        try:
            yield
        except BaseException:
            restore(name)
            raise

    def set_adapter(self, name: str) -> None:
        """Make adapter ``name`` the active one."""
        self._check_name(name)
        if self._merged and self._merged != [name]:
            raise AdapterError(f"adapter(s) {self._merged} are merged; unmerge() before switching to {name!r}")
        self._active = name
        self._apply_state()

    def set_trainable(self, name: str, trainable: bool = True) -> None:
        """Freeze (``False``) or unfreeze adapter ``name``'s parameters."""
        self._check_name(name)
        self._adapters[name].trainable = trainable
        self._apply_state()

    def _apply_state(self) -> None:
        active = [] if (self._disabled or self._active is None) else [self._active]
        for _, layer in self._adapter_layers():
            layer.set_active_adapters([a for a in active if a in layer.adapter_names()])
        for name, info in self._adapters.items():
            for _, layer in self._layers_of(name):
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(info.trainable)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare base model inside the ``with`` block (exactly its outputs)."""
        if self._merged:
            raise AdapterError(f"adapter(s) {self._merged} are merged into the base weights; unmerge() before disable_adapters()")
        previous = self._disabled
        self._disabled = True
        self._apply_state()
        try:
            yield
        finally:
            self._disabled = previous
            self._apply_state()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and every module it inserted."""
        self._check_name(name)
        if name in self._merged:
            raise AdapterError(f"adapter {name!r} is merged; unmerge() before deleting it")
        self._remove_adapter_modules(name)
        del self._adapters[name]
        if self._active == name:
            self._active = next(iter(self._adapters), None)
        self._apply_state()

    def _remove_adapter_modules(self, name: str) -> None:
        for path, layer in list(self._adapter_layers()):
            if name not in layer.adapter_names():
                continue
            layer.delete_adapter(name)
            if layer.adapter_names():
                continue
            if path.startswith(_ATTACHED + "."):
                del self.attached[path.split(".", 2)[1]]
            else:
                base = getattr(layer, "base_layer", None)
                if isinstance(base, nn.Module):
                    replace_module(self, path, base)
        if name in self.attached:
            del self.attached[name]

    # ---------------------------------------------------------------- merge
    def _check_mergeable(self, name: str) -> Any:
        injector = self.plugin_manager.get_injector(self._adapters[name].method)
        if not getattr(injector, "supports_merge", False):
            reason = getattr(injector, "merge_refusal", "") or "it has no weights to fold into the base model"
            raise MergeNotSupportedError(f"method {injector.name!r} (adapter {name!r}) cannot be merged: {reason}")
        return injector

    def merge(self) -> None:
        """Fold the active adapter into the base weights (forward then skips it)."""
        name = self._active
        if name is None:
            raise AdapterError("there is no active adapter to merge")
        if name in self._merged:
            return
        self._check_mergeable(name)
        done = []
        try:
            for _, layer in self._layers_of(name):
                layer.merge(name)
                done.append(layer)
        except BaseException:  # all or nothing: a layer that refuses leaves no layer merged
            for layer in reversed(done):
                layer.unmerge(name)
            raise
        self._merged.append(name)

    def unmerge(self) -> None:
        """Undo :meth:`merge` (within floating-point rounding)."""
        while self._merged:
            name = self._merged.pop()
            for _, layer in self._layers_of(name):
                layer.unmerge(name)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter, remove every adapter module, and return the plain base model."""
        if self._active is not None and self._active not in self._merged:
            self.merge()
        # The merged weights stay in the base layers; deleting an adapter from a
        # layer never touches base weights, so the modules can simply go.
        self._merged = []
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model as it was given."""
        if self._merged:
            raise AdapterError(f"adapter(s) {self._merged} are merged; call merge_and_unload() or unmerge() first")
        for name in list(self._adapters):
            self._remove_adapter_modules(name)
        self._adapters.clear()
        self._active = None
        base = self.base_model
        for n, p in base.named_parameters():
            # A method may have replaced a parameter by one that cannot require
            # grad (a quantized integer weight); it stays frozen.
            if p.is_floating_point() or p.is_complex():
                p.requires_grad_(self._original_requires_grad.get(n, p.requires_grad))
        return base

    # ---------------------------------------------------------- parameters
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for every parameter that requires grad."""
        for n, p in self.named_parameters():
            if p.requires_grad:
                yield n, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad (pass these to the optimizer)."""
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_summary(self) -> str:
        """``"trainable params: T || all params: N || trainable%: P"`` as a string."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        pct = 100.0 * trainable / total if total else 0.0
        return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"

    # ------------------------------------------------------------ save/load
    def adapter_state_dict(self, name: str | None = None, *, training: bool = False) -> dict[str, torch.Tensor]:
        """The tensors of adapter ``name`` (default: the active one), keyed as in the saved file."""
        name = name or self._active
        if name is None:
            raise AdapterError("this model has no adapter to save")
        self._check_name(name)
        state: dict[str, torch.Tensor] = {}
        for prefix, layer in self._keyed_layers_of(name):
            for key, tensor in layer.adapter_state_dict(name, training=training).items():
                state[prefix + key] = tensor
        return state

    def _keyed_layers_of(self, name: str) -> list[tuple[str, nn.Module]]:
        """``(key prefix in the saved file, layer)`` for every layer holding adapter ``name``."""
        return [
            (f"{_ATTACHED if path.startswith(_ATTACHED + '.') else _normalize_path(path.removeprefix('base_model.'))}.", layer)
            for path, layer in self._layers_of(name)
        ]

    def save(self, path: str | os.PathLike, *, adapter_name: str | None = None, training: bool = False) -> None:
        """Write adapter ``adapter_name`` (default: the active one) to directory ``path``, atomically.

        :param training: also keep training-only tensors (a resumable checkpoint).
        :raises AdapterError: if a tensor holds NaN/inf (nothing is written; a previous copy stays).
        :raises SaveError: if writing fails (disk full, ...); a previous copy stays.
        """
        save_adapter(self, path, adapter_name or self._active, training=training)

    def load_adapter(self, path: str | os.PathLike, adapter_name: str | None = None, *, is_trainable: bool = False) -> str:
        """Load an adapter directory into this model under ``adapter_name`` (default ``"default"``).

        Checked as :meth:`add_adapter_with_state` says, after the directory's
        checksum and base-model fingerprint; all or nothing.

        :returns: the adapter name.
        :raises AdapterFormatError: for a missing/corrupt/damaged directory or one made for another model.
        :raises UnknownMethodError: if the adapter's method is not installed.
        """
        return load_adapter(self, path, adapter_name or "default", trainable=is_trainable)

    def add_adapter_with_state(
        self,
        name: str,
        method: str,
        options: dict[str, Any],
        tensors: dict[str, torch.Tensor],
        *,
        trainable: bool = False,
        source: Any = "<tensors>",
        modules_to_save: list[str] | None = None,
    ) -> None:
        """Inject adapter ``name`` and fill it with saved ``tensors`` (keyed as :meth:`adapter_state_dict` gives them).

        Checked before anything is allocated: every tensor is finite, every
        option is a finite number, and the tensor shapes the options would
        create match ``tensors`` (an edited ``r = 10**12`` is refused, not
        allocated); while filling, every tensor's dtype is the kind of number
        the layer holds. All or nothing: on any failure the model is as before.

        :param source: what the tensors came from (the adapter directory), for error messages.
        :param modules_to_save: modules saved in full with the adapter (see :meth:`add_adapter`).
        :raises AdapterFormatError: non-finite values; tensors missing, extra, or of the wrong shape or dtype.
        :raises OptionsError: options the method refuses (naming ``source``'s adapter_config.json).
        """
        add_adapter_with_state(self, name, method, options, tensors, trainable=trainable, source=source, modules_to_save=modules_to_save)

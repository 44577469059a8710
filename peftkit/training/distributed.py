"""``train.distributed: fsdp``: the trained model sharded across processes with torch FSDP2 (``fully_shard``).

Nothing here is a distributed engine of its own: torch's FSDP2 shards, gathers
and reduces, and DTensor's ``full_tensor``/``distribute_tensor`` gather and
re-cut what a checkpoint holds. This module only says *what* is sharded and *what* is
gathered, for the loop in :mod:`peftkit.training.trainer`:

* :func:`shard` applies ``fully_shard`` to every decoder layer of the base
  model (a layer's frozen base weights and its adapter tensors, mixed
  ``requires_grad`` and dtypes, in one unit: FSDP2 shards per parameter, so
  nothing is flattened together), then to the whole step module (embeddings,
  head, norms and input-side adapters such as soft prompts).
* :func:`full_adapter` gathers the *trainable* parameters only (each DTensor's
  ``full_tensor()``, collective on every rank) and, on the main process, puts
  them in place of the shards while the adapter is written; the frozen base is
  never gathered.
* :func:`full_optimizer_state` / :func:`load_full_optimizer_state`: the
  optimizer state as one full (unsharded) ``state_dict``, which holds the
  adapter's moments only (the base has none), so a checkpoint is one file
  whatever the number of processes, re-cut into shards on resume.

Launch with ``torchrun --nproc_per_node N -m peftkit train RECIPE`` (or
``accelerate launch``); the process group is the one ``accelerate`` starts
(``gloo`` on CPU, ``nccl`` on CUDA).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from torch import nn

from peftkit.errors import TrainingError

__all__ = [
    "launched_world_size",
    "decoder_layers",
    "fsdp_refusal",
    "shard",
    "is_sharded",
    "full_adapter",
    "gradient_sync",
    "unsharded",
    "full_optimizer_state",
    "load_full_optimizer_state",
    "local",
]


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started: ``WORLD_SIZE``, 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the transformers model inside ``model``: the classes its ``_no_split_modules``
    names, else the children of its largest ``nn.ModuleList`` (GPT-2's ``h``, Llama's ``layers``)."""
    hf_model = getattr(model, "base_model", model) if hasattr(model, "adapters") else model
    names = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [module for module in hf_model.modules() if type(module).__name__ in names]
    if layers:
        return layers
    lists = [module for module in hf_model.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def fsdp_refusal(load_kwargs: dict[str, Any], model: nn.Module | None = None) -> str | None:
    """Why ``train.distributed: fsdp`` cannot shard this base (``None``: it can).

    A quantized base (bitsandbytes 4-/8-bit, e.g. ``qlora``) is refused: its
    packed parameters carry a quantization state beside the tensor that
    FSDP2's per-parameter DTensor sharding does not split or gather, and
    peftkit does not test that path.
    """
    quantized = "quantization_config" in load_kwargs or any(load_kwargs.get(k) for k in ("load_in_4bit", "load_in_8bit"))
    if model is not None:
        quantized = quantized or bool(getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None))
    if quantized:
        return (
            "train.distributed = 'fsdp' cannot shard a quantized base model (bitsandbytes 4-/8-bit weights, as the "
            "qlora method loads them, keep a quantization state that torch FSDP2 does not shard); use "
            "train.distributed: ddp (each process holds the whole 4-bit base, which is what QLoRA saves memory "
            "for) or a method on an unquantized base (e.g. lora)"
        )
    return None


def shard(step_module: nn.Module, tuned: nn.Module, device: torch.device) -> None:
    """Apply ``fully_shard`` to every decoder layer of ``tuned``'s base, then to ``step_module`` (the root).

    Every process must call it, in the process group ``accelerate`` started;
    the shards live on ``device`` (the accelerator's: ``cuda:<local rank>``, or
    the CPU, also with ``train.cpu: true`` on a GPU machine).

    :raises TrainingError: if the base model has no repeated layers to shard by.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(tuned)
    if not layers:
        raise TrainingError(
            f"train.distributed = 'fsdp': {type(tuned).__name__} has no decoder layers to shard by (no "
            "_no_split_modules and no nn.ModuleList); use train.distributed: ddp"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(step_module, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether :func:`shard` was applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _trainable_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """``(module, attribute, parameter)`` for every trainable parameter, each shared one once."""
    seen: set[int] = set()
    slots = []
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                slots.append((module, attr, param))
    return slots


@contextlib.contextmanager
def full_adapter(model: nn.Module, *, main_process: bool) -> Iterator[None]:
    """Inside this block the main process's ``model`` (the root :func:`shard` was given) holds the full
    (gathered) trainable parameters.

    Collective: every process enters it. Only the trainable parameters (the
    adapter and any saved module such as a reward head) are gathered, with
    ``DTensor.full_tensor()``; the frozen base stays sharded. On the other
    processes nothing changes. Outside FSDP (no DTensor parameter) it does nothing.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    # A unit left gathered by a forward without backward (the root after an evaluation) goes back to its
    # shards first: FSDP2's state-dict hook would otherwise put them back in place of the gathered tensors.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    slots = [slot for slot in _trainable_slots(model) if isinstance(slot[2], DTensor)]
    full = [param.detach().full_tensor() for _, _, param in slots]  # every rank takes part in each gather
    if not main_process or not slots:
        yield
        return
    try:
        for (module, attr, _), tensor in zip(slots, full):
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=True)
        yield
    finally:
        for module, attr, param in slots:
            module._parameters[attr] = param


def gradient_sync(module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """FSDP2's counterpart of DDP's ``no_sync``: with ``enabled=False`` gradients accumulate locally (no
    reduce-scatter) until a micro-batch with ``enabled=True``."""

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    return context()


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """The root unit's own parameters gathered, for code that calls the model inside it directly (an
    objective's ``eval_metrics`` on the adapter model); decoder layers gather themselves in their forward.
    Collective: every process enters it. Does nothing outside FSDP."""
    if not is_sharded(root):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its state dict numbers them."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded (DTensor) state tensor gathered in full, on the CPU.

    Collective: every process calls it (each state tensor is one ``full_tensor()``
    gather, in the optimizer's own order). The state is the adapter's AdamW
    moments only: the frozen base has none, so nothing of it is gathered.
    """
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    gathered = {
        index: {key: value.full_tensor().cpu() if isinstance(value, DTensor) else value for key, value in state["state"][index].items()}
        for index in sorted(state["state"])
    }
    return {"state": gathered, "param_groups": state["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`full_optimizer_state` returned: each full state tensor is cut into this process's
    shard exactly as its parameter is (``distribute_tensor`` with the parameter's mesh and placements).
    Collective: every process calls it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _optimizer_parameters(optimizer)
    state = {"state": {int(k): dict(v) for k, v in state["state"].items()}, "param_groups": state["param_groups"]}
    for index in sorted(state["state"]):
        param = params[index]
        if not isinstance(param, DTensor):
            continue
        for key, value in state["state"][index].items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                state["state"][index][key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    optimizer.load_state_dict(state)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) parameter; any other tensor as it is."""
    if not torch.distributed.is_available():  # a torch build without distributed support has no DTensor
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

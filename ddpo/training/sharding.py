"""Tensors of a sharded (FSDP2) run between their sharded and their full forms.

Under FSDP2 every parameter of the trained denoiser is a ``DTensor``: each process stores one slice of dim 0 (its
shard) and the full tensor exists only while a forward or backward gathers it. What leaves a run (checkpoints,
``final/``, ``weights_sha256``) is defined on the full tensors, so that it does not depend on how the run was
distributed; what comes back from a checkpoint is sliced again. Plain tensors (a DDP or one-process run) pass
through every function here unchanged, so callers need no second code path.

Every function that gathers is a collective: all processes call it, with the same names in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a larger tensor held across processes)."""
    return isinstance(tensor, DTensor)


def iter_full_tensors(named: dict[str, torch.Tensor], names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for each of ``names``, in that order, on the CPU, detached, gathered one at a time when
    asked for (a sharded tensor is all-gathered; a plain one is taken as it is): a collective when any is sharded,
    so every process must go through all of them."""
    for name in names:
        tensor = named[name].detach()
        if is_sharded(tensor):
            tensor = tensor.full_tensor()
        yield name, tensor.cpu()


def full_tensors(named: dict[str, torch.Tensor], names: Iterable[str], keep: bool) -> dict[str, torch.Tensor]:
    """The full tensors of ``named[name]`` for each of ``names`` (:func:`iter_full_tensors`). ``keep``: whether this
    process keeps them (the main process writing a checkpoint); the others take part in the gathers and get an empty
    dict, so no process but the one that writes ever holds more than one full tensor. A collective when any tensor is
    sharded."""
    return {name: tensor for name, tensor in iter_full_tensors(named, names) if keep}


def copy_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor ``full`` (e.g. read from a checkpoint, the same on every process) into ``target``: all of
    it into a plain tensor, this process's slice of it into a sharded one (cut locally, as the shard was cut: no
    communication). Casts to ``target``'s dtype and device."""
    with torch.no_grad():
        if is_sharded(target):
            local = full.to(target.to_local().device, target.dtype)
            target.copy_(distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=None))
        else:
            target.copy_(full.to(target.device, target.dtype))


def reshard(model: torch.nn.Module) -> None:
    """Let every FSDP2 unit of ``model`` drop the full parameters it still holds gathered from its last call (the root
    unit keeps them after a forward by default, and so does every unit after a forward without gradients when
    ``reshard_after_forward`` is false), so that its next call gathers the shards afresh and named_parameters() gives
    the shards. Needed after parameters were changed in place outside an optimiser step (an old policy swapped in or
    out, a checkpoint restored): a kept gathered copy would be stale. No communication; nothing to do without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def held_shares(model: torch.nn.Module) -> dict[str, float]:
    """What this process holds of ``model``'s parameters (resharded first: :func:`reshard`), measured from their
    storages: ``param_bytes`` (every
    parameter's storage on this process, shared storages counted once), ``full_bytes`` (the same parameters' full
    size, numel x element size) and the least and largest share of one parameter that this process holds
    (``min_share``, ``max_share``: 1.0 for a replicated parameter, about 1/N for one sharded over N processes)."""
    reshard(model)
    seen: set[int] = set()
    held = full = 0
    shares = []
    for param in model.parameters():
        local = param.to_local() if is_sharded(param) else param
        storage = local.untyped_storage()
        size = param.numel() * param.element_size()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            held += storage.nbytes()
        full += size
        shares.append(storage.nbytes() / size)
    return {"param_bytes": held, "full_bytes": full, "min_share": min(shares), "max_share": max(shares)}


def base_class(model: torch.nn.Module) -> type[torch.nn.Module]:
    """The class ``model`` had before ``fully_shard`` (which gives a sharded module a subclass of its own)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def unsharded_copy(model: torch.nn.Module, full_params: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain (unsharded) module of ``model``'s diffusers class and config holding ``full_params`` (every parameter,
    full, e.g. from :func:`full_tensors`) and ``model``'s buffers (which FSDP2 does not shard): what
    ``save_pretrained`` writes for a sharded full fine-tuning. Built on the meta device, so no weights are
    initialised only to be replaced."""
    with torch.device("meta"):
        plain = base_class(model).from_config(model.config)
    buffers = dict(model.named_buffers())
    persistent = {name: value for name, value in plain.state_dict(keep_vars=True).items() if name in buffers}
    plain.load_state_dict({**full_params, **{name: buffers[name] for name in persistent}}, assign=True)
    for name, value in buffers.items():
        if name not in persistent:  # a non-persistent buffer is not in a state dict: registered again
            owner, _, attr = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(attr, value.detach().clone(), persistent=False)
    return plain.requires_grad_(False)


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's ``AcceleratedOptimizer`` wrapper (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimiser state of a sharded ``model`` with full tensors, keyed by parameter name, on the main process (the
    others get an empty dict): ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` with
    ``full_state_dict=True, cpu_offload=True``. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, _torch_optimizer(optimizer), options=options)


def load_full_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load :func:`full_optimizer_state`'s ``state`` (read by every process) into the optimiser of a sharded
    ``model``, each process keeping its slice (``set_optimizer_state_dict`` with ``full_state_dict=True``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state_dict=state, options=options)


def shard_metrics(accelerator, model: torch.nn.Module) -> dict[str, list]:
    """An epoch's measured sharding of ``model``, one entry per process in process order (:func:`held_shares`):
    ``param_bytes`` (the parameter storage it holds) and ``param_share`` (``[least, largest]`` share of one
    parameter it holds). A collective."""
    from accelerate.utils import gather_object

    held = held_shares(model)
    return {
        "param_bytes": gather_object([held["param_bytes"]]),
        "param_share": gather_object([[round(held["min_share"], 4), round(held["max_share"], 4)]]),
    }

"""torch.distributed.checkpoint.state_dict's API over libdsd, for real nn.Modules and
torch.optim optimizers.

Each call registers the model and optimizers with dsd (_torch_adapter: tensors by DLPack, no
copy), calls the C function, and converts the result back: state dicts whose tensors share
memory with the model's, as PyTorch's do. Loads copy into the model's and optimizer's tensors
in place.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

from . import _capi, _dist, _tree
from ._torch_adapter import Context, Model, Optim, module_paths


@dataclasses.dataclass
class StateDictOptions:
    """PyTorch's StateDictOptions: same fields, same defaults (plus dsd's bucket_bytes)."""

    full_state_dict: bool = False
    cpu_offload: bool = False
    ignore_frozen_params: bool = False
    keep_submodule_prefixes: bool = True
    strict: bool = True
    broadcast_from_rank0: bool = False
    flatten_optimizer_state_dict: bool = False
    dsd_fqn_modifiers: str = "_fqn_modifiers"
    bucket_bytes: int = 0


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _incompatible(keys: _capi.KeyLists) -> _IncompatibleKeys:
    return _IncompatibleKeys(keys.missing, keys.unexpected)


# ---------------------------------------------------------------------------------------------
# The communicator the functions run over

use_communicator = _dist.use_communicator


def _communicator() -> _dist.Communicator | None:
    """The communicator the state-dict functions run over: the innermost use_communicator()'s,
    else the process communicator (dsd._dist.process_communicator: built once from the
    launcher's environment, shared with dsd.save/load) once torch.distributed runs with more
    than one rank; None in a single process."""
    return _dist.communicator_for(None)


def _context() -> Context:
    return Context(_communicator())


# ---------------------------------------------------------------------------------------------
# Argument forms PyTorch accepts

def _optimizers(optimizers) -> tuple:
    import torch

    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    return tuple(optimizers)


def _submodule_paths(model, submodules) -> list[str]:
    if not submodules:
        return []
    warnings.warn(
        "Getting submodules only model/optim state_dict is deprecated and will be removed in 2.5. "
        "This feature can be achieved by manually filtering out the state_dict returned from "
        "get_state_dict.", FutureWarning, stacklevel=3)
    paths = module_paths(model)
    return [paths[id(m)] for m in submodules]


def _expand_module_keyed(model, state_dict):
    """The deprecated form {submodule: its state dict} -> one FQN-keyed dict."""
    import torch

    if not state_dict or not isinstance(next(iter(state_dict.keys())), torch.nn.Module):
        return state_dict
    warnings.warn(
        "Passing model_state_dict as a ``Dict[nn.Module, Dict[str, Any]]``is deprecated and will be "
        "removed in 2.5. If you need this feature, please preprocess the model_state_dict to achieve "
        "the same functionality.", FutureWarning, stacklevel=3)
    m = Model(model, StateDictOptions().dsd_fqn_modifiers, _context())
    paths = module_paths(model)
    out = {}
    for sub, sub_sd in state_dict.items():
        prefix = m.canonical(paths[id(sub)] + ".x")[:-1]
        out.update({prefix + k: v for k, v in sub_sd.items()})
    return out


def _registered(model, optimizers, options: StateDictOptions):
    ctx = _context()
    m = Model(model, options.dsd_fqn_modifiers, ctx)
    opts = [] if optimizers is None else [Optim(o, ctx) for o in _optimizers(optimizers)]
    return ctx, m, opts


# ---------------------------------------------------------------------------------------------
# The public functions, mirroring torch.distributed.checkpoint.state_dict.

def get_model_state_dict(model, *, submodules=None, options: StateDictOptions | None = None) -> dict[str, Any]:
    """PyTorch's get_model_state_dict: the model's state dict (FQN keys; DTensors for sharded
    parameters, sharing memory with the model), shaped by `options`."""
    options = options or StateDictOptions()
    ctx, m, _ = _registered(model, None, options)
    subs = _submodule_paths(model, submodules)
    return ctx.take_python(_capi.get_model_state_dict(m.ptr, subs, options))


def get_optimizer_state_dict(model, optimizers, *, submodules=None,
                             options: StateDictOptions | None = None) -> dict[str, Any]:
    """PyTorch's get_optimizer_state_dict: the optimizers' state dict in FQN form
    ({"state": {fqn: ...}, "param_groups": [...]}), shaped by `options`."""
    options = options or StateDictOptions()
    _submodule_paths(model, submodules)
    ctx, m, opts = _registered(model, optimizers, options)
    return ctx.take_python(_capi.get_optimizer_state_dict(m.ptr, [o.ptr for o in opts], options))


def get_state_dict(model, optimizers, *, submodules=None,
                   options: StateDictOptions | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """PyTorch's get_state_dict: (model state dict, optimizer state dict) in one call, over the
    process communicator under torchrun (no comm argument), as dsd.save then uses it."""
    options = options or StateDictOptions()
    _submodule_paths(model, submodules)
    ctx, m, opts = _registered(model, optimizers, options)
    msd, osd = _capi.get_state_dict(m.ptr, [o.ptr for o in opts], options)
    return ctx.take_python(msd), ctx.take_python(osd)


def set_model_state_dict(model, model_state_dict, *, options: StateDictOptions | None = None) -> _IncompatibleKeys:
    """PyTorch's set_model_state_dict: loads `model_state_dict` into the model in place;
    (missing_keys, unexpected_keys). Raises for either under options.strict."""
    options = options or StateDictOptions()
    model_state_dict = _expand_module_keyed(model, model_state_dict)
    ctx, m, _ = _registered(model, None, options)
    sd = ctx.to_dsd(model_state_dict)
    try:
        keys = _capi.set_model_state_dict(m.ptr, sd, options)
    finally:
        _capi.release(sd)
    m.apply_assigned()
    m.apply_extra_state(model_state_dict)
    return _incompatible(keys)


def set_optimizer_state_dict(model, optimizers, optim_state_dict, *,
                             options: StateDictOptions | None = None) -> None:
    """PyTorch's set_optimizer_state_dict: loads `optim_state_dict` into the optimizers
    (creating their lazy state without a step)."""
    options = options or StateDictOptions()
    ctx, m, opts = _registered(model, optimizers, options)
    sd = ctx.to_dsd(optim_state_dict)
    try:
        _capi.set_optimizer_state_dict(m.ptr, [o.ptr for o in opts], sd, options)
    finally:
        _capi.release(sd)
    for o in opts:
        o.sync_back()


def set_state_dict(model, optimizers, *, model_state_dict, optim_state_dict,
                   options: StateDictOptions | None = None) -> _IncompatibleKeys:
    """PyTorch's set_state_dict: both loads in one call; the model's (missing_keys,
    unexpected_keys)."""
    options = options or StateDictOptions()
    model_state_dict = _expand_module_keyed(model, model_state_dict)
    ctx, m, opts = _registered(model, optimizers, options)
    msd = ctx.to_dsd(model_state_dict)
    osd = ctx.to_dsd(optim_state_dict)
    try:
        keys = _capi.set_state_dict(m.ptr, [o.ptr for o in opts], msd, osd, options)
    finally:
        _capi.release(msd)
        _capi.release(osd)
    for o in opts:
        o.sync_back()
    m.apply_assigned()
    m.apply_extra_state(model_state_dict)
    return _incompatible(keys)


def _remap(fn, state_dict: dict, names: list[str]) -> dict:
    sd = _tree.to_dsd(state_dict)
    try:
        out = fn(sd, list(names))
    finally:
        _capi.release(sd)
    return _tree.take_python(out)


def optim_state_dict_to_fqn(positional: dict, names: list[str]) -> dict:
    """PyTorch's optim.state_dict() (ids) -> FQN form, given the FQN of each parameter id."""
    return _remap(_capi.optim_state_dict_to_fqn, positional, names)


def optim_state_dict_to_positional(fqn_form: dict, names: list[str]) -> dict:
    """FQN form -> PyTorch's optim.state_dict() form (ids), given the FQN of each parameter id."""
    return _remap(_capi.optim_state_dict_to_positional, fqn_form, names)

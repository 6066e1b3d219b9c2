"""torch.nn.Module and torch.optim.Optimizer registered with dsd (dsd_model, dsd_optim).

A _Model mirrors a module from model.state_dict(keep_vars=True) (tensors by DLPack, no copy;
wrapper modules and FQN modifiers declared); an _Optim mirrors an optimizer's param groups
and per-parameter state, by reference, and creates lazily-made state on dsd's request without
a numerical trace. A _Context is what one public call shares: its communicator, the meshes
met and one handle per tensor. The public functions over them are in _state_dict_api.py.
"""
from __future__ import annotations

import warnings

from . import _capi, _dist, _tensor, _tree
from ._capi import CData

_EXTRA_STATE = "_extra_state"


def tensor_handle(value, ctx: "_dist.MeshCache | None" = None) -> int:
    """A new handle for a tensor; for a DTensor, its local shard with its layout."""
    if _dist.is_dtensor(value):
        local, layout = _dist.from_dtensor(value, cache=ctx)
        try:
            return _capi.tensor_new_dist(local.bits, layout.bits)
        finally:
            local.release()
            layout.release()
    return _tensor.handle_from_tensor(value)


class Context:
    """What one call shares: the communicator (None: a single process), the meshes met
    (torch <-> dsd), so sharded values come back as DTensors on the very meshes they came
    from, and one handle per tensor: dsd tells parameters apart by their memory, and tensors
    with no elements (empty shards) have none, so the model and the optimizer must name them
    by one handle."""

    def __init__(self, comm: "_dist.Communicator | None"):
        self.comm = comm
        self.meshes = _dist.MeshCache(comm)
        self._handles: dict[int, tuple[object, int]] = {}

    @property
    def comm_ptr(self) -> CData | None:
        return None if self.comm is None else self.comm.ptr

    def handle(self, tensor) -> int:
        """The handle of `tensor` for this call (made once, released with the context)."""
        hit = self._handles.get(id(tensor))
        if hit is None:
            hit = (tensor, tensor_handle(tensor, self.meshes))
            self._handles[id(tensor)] = hit
        return hit[1]

    def to_dsd(self, obj) -> CData:
        """A dsd tree of `obj` whose DTensors use this call's meshes."""
        return _tree.to_dsd(obj, ctx=self.meshes)

    def to_python(self, sd: CData):
        """The Python tree of `sd`, DTensors back on this call's meshes."""
        return _tree.to_python(sd, self.meshes)

    def take_python(self, sd: CData):
        """to_python(), then releases `sd`."""
        return _tree.take_python(sd, self.meshes)

    def __del__(self):
        for _, bits in self._handles.values():
            try:
                _tensor.release(bits)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass


def module_paths(model) -> dict[int, str]:
    """id(submodule) -> its raw path in `model`."""
    paths: dict[int, str] = {}
    for name, module in model.named_modules():
        paths.setdefault(id(module), name)
    return paths


def _declare_wrappers(model, ptr: CData, fqn_modifiers: str) -> None:
    import torch

    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    compiled = getattr(getattr(torch, "_dynamo", None), "eval_frame", None)
    compiled = getattr(compiled, "OptimizedModule", None)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    except ImportError:  # pragma: no cover - CPU builds have it
        fsdp1 = None
    for name, module in model.named_modules():
        kind = None
        if ddp is not None and isinstance(module, ddp):
            kind = "ddp"
        elif compiled is not None and isinstance(module, compiled):
            kind = "compile"
        elif fsdp1 is not None and isinstance(module, fsdp1):
            kind = "fsdp"
        if kind is not None:
            _capi.model_declare_wrapper(ptr, name, kind)
        modifiers = getattr(module, fqn_modifiers, None)
        if callable(modifiers):
            for segment, child in modifiers().items():
                _capi.model_add_fqn_modifier(ptr, name, segment, child)


def _is_meta(value) -> bool:
    return value.is_meta or (_dist.is_dtensor(value) and value.to_local().is_meta)


class Model:
    """A dsd_model mirroring an nn.Module, built from model.state_dict(keep_vars=True): the
    keys the module itself reports (wrapper prefixes, state_dict hooks applied), values by
    reference."""

    def __init__(self, model, fqn_modifiers: str, ctx: Context):
        import torch

        self.module = model
        self.ctx = ctx
        self.ptr = _capi.model_new(ctx.comm_ptr, type(model).__name__)
        _declare_wrappers(model, self.ptr, fqn_modifiers)
        params = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
        self.extra_state_keys: list[str] = []
        self.meta_keys: list[str] = []
        for key, value in model.state_dict(keep_vars=True).items():
            if key == _EXTRA_STATE or key.endswith("." + _EXTRA_STATE):
                holder = _tree.to_dsd([value])
                try:
                    _capi.model_add_extra_state(self.ptr, key, holder, 0)
                finally:
                    _capi.release(holder)
                self.extra_state_keys.append(key)
            elif isinstance(value, torch.Tensor):
                if _is_meta(value):
                    self.meta_keys.append(key)
                p = params.get(id(value))
                if p is not None:
                    _capi.model_add_parameter(self.ptr, key, ctx.handle(value), p.requires_grad)
                else:
                    _capi.model_add_buffer(self.ptr, key, ctx.handle(value), True)
            else:
                raise ValueError(f"Unexpected value type {type(value)} for '{key}' in model.state_dict()")

    def canonical(self, raw: str) -> str:
        return _capi.model_canonical_fqn(self.ptr, raw)

    def apply_assigned(self) -> None:
        """Meta-device parameters and buffers got new tensors from the load (PyTorch's
        load_state_dict(assign=True)): put them into the module."""
        if not self.meta_keys:
            return
        import torch

        entries = self.ctx.take_python(_capi.model_entries(self.ptr))
        for key in self.meta_keys:
            path, _, name = key.rpartition(".")
            module = self.module.get_submodule(path) if path else self.module
            value = entries[key]
            if _is_meta(value):
                continue  # not in the loaded state dict
            if name in module._parameters:
                old = module._parameters[name]
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
            else:
                module._buffers[name] = value

    def apply_extra_state(self, loaded: dict) -> None:
        """set_extra_state on every module whose extra state the loaded dict carried."""
        modules = dict(self.module.named_modules())
        for key in self.extra_state_keys:
            fqn = self.canonical(key)
            if fqn not in loaded:
                continue
            path = key[: -len(_EXTRA_STATE)].rstrip(".")
            modules[path].set_extra_state(loaded[fqn])


# ---------------------------------------------------------------------------------------------
# Optimizers

def _fresh_state(optim, group, p) -> dict | None:
    """The state a fresh optimizer of a known class creates for `p` on its first step, built
    directly: no step is taken, so step counters stay 0 and nothing else moves."""
    import torch
    from torch.optim.optimizer import _get_scalar_dtype

    zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
    if isinstance(optim, (torch.optim.Adam, torch.optim.AdamW)):
        if group.get("capturable") or group.get("fused"):
            step = torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
        else:
            step = torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
        state = {"step": step, "exp_avg": zeros(), "exp_avg_sq": zeros()}
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = zeros()
        return state
    if isinstance(optim, torch.optim.SGD):
        # PyTorch's first step clones the gradient; a zero buffer gives the same update
        # (dampening aside), which is also what PyTorch's own state initialization creates.
        return {"momentum_buffer": zeros()} if group.get("momentum", 0) != 0 else {}
    if isinstance(optim, torch.optim.RMSprop):
        if group.get("capturable"):
            step = torch.zeros((), dtype=_get_scalar_dtype(), device=p.device)
        else:
            step = torch.zeros((), dtype=_get_scalar_dtype())
        state = {"step": step, "square_avg": zeros()}
        if group.get("momentum", 0) > 0:
            state["momentum_buffer"] = zeros()
        if group.get("centered"):
            state["grad_avg"] = zeros()
        return state
    return None


def _materialize_by_step(optim, params) -> None:
    """For optimizer classes dsd does not know: one step over just `params` with zero gradients,
    zero learning rate and zero weight decay, other parameters' gradients hidden, then every new
    `step` counter reset to 0. Gradients and hyperparameters are restored."""
    import torch

    wanted = {id(p) for p in params}
    saved_grads = {}
    saved_hyper = []
    for group in optim.param_groups:
        saved_hyper.append({k: group[k] for k in ("lr", "weight_decay") if k in group})
        for k in ("lr", "weight_decay"):
            if k in group:
                group[k] = torch.tensor(0.0) if isinstance(group[k], torch.Tensor) else 0.0
        for p in group["params"]:
            saved_grads[id(p)] = (p, p.grad)
            p.grad = torch.zeros_like(p) if id(p) in wanted else None
    try:
        with torch.no_grad():
            optim.step()
    finally:
        for p, g in saved_grads.values():
            p.grad = g
        for group, hyper in zip(optim.param_groups, saved_hyper):
            group.update(hyper)
    for p in params:
        state = optim.state.get(p, {})
        if "step" in state:
            if isinstance(state["step"], torch.Tensor):
                state["step"].zero_()
            else:
                state["step"] = 0


class Optim:
    """A dsd_optim mirroring a torch.optim.Optimizer: groups and state by reference."""

    def __init__(self, optim, ctx: Context):
        self.optim = optim
        self.ctx = ctx
        self.ptr = _capi.optim_new()
        self.params = []
        for group in optim.param_groups:
            options = _tree.to_dsd({k: v for k, v in group.items() if k != "params"})
            try:
                _capi.optim_add_param_group(self.ptr, options, [ctx.handle(p) for p in group["params"]])
            finally:
                _capi.release(options)
            self.params.extend(group["params"])
        for p in self.params:
            if p in optim.state:
                self._register_state(p, optim.state[p])
        self._callback = _capi.optim_set_materialize(self.ptr, self._materialize)

    def _register_state(self, p, state: dict) -> None:
        sd = self.ctx.to_dsd(state)
        try:
            _capi.optim_set_param_state(self.ptr, self.ctx.handle(p), sd)
        finally:
            _capi.release(sd)

    def _materialize(self, pids: list[int]) -> bool:
        try:
            missing = [self.params[i] for i in pids]
            group_of = {id(p): g for g in self.optim.param_groups for p in g["params"]}
            unknown = []
            for p in missing:
                state = _fresh_state(self.optim, group_of[id(p)], p)
                if state is None:
                    unknown.append(p)
                elif state:
                    self.optim.state[p] = state
            if unknown:
                _materialize_by_step(self.optim, unknown)
            for p in missing:
                if self.optim.state.get(p):
                    self._register_state(p, self.optim.state[p])
            return True
        except Exception as exc:  # noqa: BLE001 - reported as DSD_E_CALLBACK by dsd
            warnings.warn(f"dsd: materializing optimizer state failed: {exc!r}", stacklevel=1)
            return False

    def sync_back(self) -> None:
        """Writes what a load put in the registry into the torch optimizer: hyperparameters,
        and state entries (tensors loaded in place already share memory)."""
        for i, group in enumerate(self.optim.param_groups):
            hyper = self.ctx.take_python(_capi.optim_get_param_group(self.ptr, i))
            params = group["params"]
            group.clear()
            group["params"] = params
            group.update(hyper)
        for p in self.params:
            state = _capi.optim_get_param_state(self.ptr, self.ctx.handle(p))
            if state is None:
                self.optim.state.pop(p, None)
            else:
                self.optim.state[p] = self.ctx.take_python(state)

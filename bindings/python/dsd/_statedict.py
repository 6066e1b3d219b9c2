"""torch.distributed.checkpoint.state_dict's API over libdsd, for real nn.Modules and
torch.optim optimizers.

Each call registers the model and optimizers with dsd (tensors by DLPack: no copy), calls the
C function, and converts the result back: state dicts whose tensors share memory with the
model's, as PyTorch's do. Loads copy into the model's and optimizer's tensors in place.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

from . import _dist, _state_dict, _tensor
from ._errors import call
from ._lib import ffi, lib

_EXTRA_STATE = "_extra_state"


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


def _c_options(options: StateDictOptions | None, keep):
    o = ffi.new("dsd_options*")
    lib.dsd_options_init(o)
    options = options or StateDictOptions()
    for f in ("full_state_dict", "cpu_offload", "ignore_frozen_params", "keep_submodule_prefixes",
              "strict", "broadcast_from_rank0", "flatten_optimizer_state_dict", "bucket_bytes"):
        setattr(o, f, getattr(options, f))
    name = ffi.new("char[]", options.dsd_fqn_modifiers.encode())
    keep.append(name)
    o.dsd_fqn_modifiers = name
    return o


def _tensor_handle(value, ctx=None) -> int:
    """A handle for a tensor; for a DTensor, its local shard with its layout."""
    if _dist.is_dtensor(value):
        local, layout = _dist.from_dtensor(value, cache=ctx)
        try:
            out = ffi.new("dsd_tensor*")
            call(lib.dsd_tensor_new_dist, ffi.new("dsd_tensor*", {"bits": local.bits})[0], layout.handle, out)
            return out[0].bits
        finally:
            local.release()
            layout.release()
    return _tensor.handle_from_tensor(value)


def _with_handle(value, fn, ctx=None):
    """Calls fn(handle) with a handle of `value`. Within one call (`ctx`) a tensor always gets
    the same handle: dsd tells parameters apart by their memory, and tensors with no elements
    (empty shards) have none, so the model and the optimizer must name them by one handle."""
    if ctx is not None:
        return fn(ffi.new("dsd_tensor*", {"bits": ctx.handle(value)})[0])
    bits = _tensor_handle(value)
    try:
        return fn(ffi.new("dsd_tensor*", {"bits": bits})[0])
    finally:
        _tensor.release(bits)


def _module_paths(model) -> dict[int, str]:
    paths: dict[int, str] = {}
    for name, module in model.named_modules():
        paths.setdefault(id(module), name)
    return paths


def _declare_wrappers(model, ptr, fqn_modifiers: str) -> None:
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
            kind = lib.DSD_WRAPPER_DDP
        elif compiled is not None and isinstance(module, compiled):
            kind = lib.DSD_WRAPPER_COMPILE
        elif fsdp1 is not None and isinstance(module, fsdp1):
            kind = lib.DSD_WRAPPER_FSDP
        if kind is not None:
            call(lib.dsd_model_declare_wrapper, ptr, name.encode(), kind)
        modifiers = getattr(module, fqn_modifiers, None)
        if callable(modifiers):
            for segment, child in modifiers().items():
                call(lib.dsd_model_add_fqn_modifier, ptr, name.encode(), segment.encode(), child.encode())


class _Model:
    """A dsd_model mirroring an nn.Module, built from model.state_dict(keep_vars=True): the
    keys the module itself reports (wrapper prefixes, state_dict hooks applied), values by
    reference."""

    def __init__(self, model, options: StateDictOptions, ctx: "_Context"):
        import torch

        self.module = model
        self.ctx = ctx
        out = ffi.new("dsd_model**")
        comm = ctx.comm.ptr if ctx.comm is not None else ffi.NULL
        call(lib.dsd_model_new, comm, type(model).__name__.encode(), out)
        self.ptr = ffi.gc(out[0], lib.dsd_model_free)
        _declare_wrappers(model, self.ptr, options.dsd_fqn_modifiers)
        params = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
        self.extra_state_keys: list[str] = []
        self.meta_keys: list[str] = []
        for key, value in model.state_dict(keep_vars=True).items():
            raw = key.encode()
            if key == _EXTRA_STATE or key.endswith("." + _EXTRA_STATE):
                holder = _state_dict.to_dsd([value])
                try:
                    call(lib.dsd_model_add_extra_state, self.ptr, raw, holder, 0)
                finally:
                    lib.dsd_state_dict_free(holder)
                self.extra_state_keys.append(key)
            elif isinstance(value, torch.Tensor):
                p = params.get(id(value))
                if value.is_meta or (_dist.is_dtensor(value) and value.to_local().is_meta):
                    self.meta_keys.append(key)
                if p is not None:
                    _with_handle(value, lambda h, r=raw, g=p.requires_grad:
                                 call(lib.dsd_model_add_parameter, self.ptr, r, h, g), ctx)
                else:
                    _with_handle(value, lambda h, r=raw: call(lib.dsd_model_add_buffer, self.ptr, r, h, True), ctx)
            else:
                raise ValueError(f"Unexpected value type {type(value)} for '{key}' in model.state_dict()")

    def canonical(self, raw: str) -> str:
        out = ffi.new("char[]", 4096)
        n = ffi.new("size_t*")
        call(lib.dsd_model_canonical_fqn, self.ptr, raw.encode(), out, 4096, n)
        return ffi.string(out).decode()

    def apply_assigned(self) -> None:
        """Meta-device parameters and buffers got new tensors from the load (PyTorch's
        load_state_dict(assign=True)): put them into the module."""
        if not self.meta_keys:
            return
        import torch

        out = ffi.new("dsd_state_dict**")
        call(lib.dsd_model_entries, self.ptr, out)
        try:
            entries = _state_dict.to_python(out[0], self.ctx.meshes)
        finally:
            lib.dsd_state_dict_free(out[0])
        for key in self.meta_keys:
            path, _, name = key.rpartition(".")
            module = self.module.get_submodule(path) if path else self.module
            value = entries[key]
            if value.is_meta or (_dist.is_dtensor(value) and value.to_local().is_meta):
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


class _Optim:
    """A dsd_optim mirroring a torch.optim.Optimizer: groups and state by reference."""

    def __init__(self, optim, ctx: "_Context"):
        self.optim = optim
        self.ctx = ctx
        out = ffi.new("dsd_optim**")
        call(lib.dsd_optim_new, out)
        self.ptr = ffi.gc(out[0], lib.dsd_optim_free)
        self.params = []
        for group in optim.param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            opts = _state_dict.to_dsd(options)
            bits = [ctx.handle(p) for p in group["params"]]
            try:
                handles = ffi.new("dsd_tensor[]", [{"bits": b} for b in bits])
                call(lib.dsd_optim_add_param_group, self.ptr, opts, handles, len(bits))
            finally:
                lib.dsd_state_dict_free(opts)
            self.params.extend(group["params"])
        for p in self.params:
            if p in optim.state:
                self._register_state(p, optim.state[p])
        self._callback = ffi.callback("dsd_materialize_fn", self._materialize)
        call(lib.dsd_optim_set_materialize, self.ptr, self._callback, ffi.NULL)

    def _register_state(self, p, state: dict) -> None:
        sd = _state_dict.to_dsd(state, ctx=self.ctx.meshes)
        try:
            _with_handle(p, lambda h: call(lib.dsd_optim_set_param_state, self.ptr, h, sd), self.ctx)
        finally:
            lib.dsd_state_dict_free(sd)

    def _materialize(self, user_data, optim_ptr, handles, pids, n) -> int:
        try:
            missing = [self.params[pids[i]] for i in range(n)]
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
            return lib.DSD_OK
        except Exception as exc:  # noqa: BLE001 - reported as DSD_E_CALLBACK by dsd
            warnings.warn(f"dsd: materializing optimizer state failed: {exc!r}", stacklevel=1)
            return lib.DSD_E_CALLBACK

    def sync_back(self) -> None:
        """Writes what a load put in the registry into the torch optimizer: hyperparameters,
        and state entries (tensors loaded in place already share memory)."""
        n = ffi.new("size_t*")
        call(lib.dsd_optim_num_param_groups, self.ptr, n)
        for i, group in enumerate(self.optim.param_groups):
            out = ffi.new("dsd_state_dict**")
            call(lib.dsd_optim_get_param_group, self.ptr, i, out)
            try:
                hyper = _state_dict.to_python(out[0], self.ctx.meshes)
            finally:
                lib.dsd_state_dict_free(out[0])
            params = group["params"]
            group.clear()
            group["params"] = params
            group.update(hyper)
        for p in self.params:
            out = ffi.new("dsd_state_dict**")
            err = ffi.new("dsd_error**")

            def get(h):
                return lib.dsd_optim_get_param_state(self.ptr, h, out, err)

            status = _with_handle(p, get, self.ctx)
            if status == lib.DSD_E_NOT_FOUND:
                lib.dsd_error_free(err[0])
                self.optim.state.pop(p, None)
                continue
            if status != lib.DSD_OK:
                from ._errors import _ErrorSlot  # noqa: PLC0415

                slot = _ErrorSlot()
                slot.ptr = err
                slot.check(status)
            try:
                self.optim.state[p] = _state_dict.to_python(out[0], self.ctx.meshes)
            finally:
                lib.dsd_state_dict_free(out[0])


def _optimizers(optimizers) -> tuple:
    import torch

    if isinstance(optimizers, torch.optim.Optimizer):
        return (optimizers,)
    return tuple(optimizers)


def _submodule_paths(model, submodules) -> list[bytes]:
    if not submodules:
        return []
    warnings.warn(
        "Getting submodules only model/optim state_dict is deprecated and will be removed in 2.5. "
        "This feature can be achieved by manually filtering out the state_dict returned from "
        "get_state_dict.", FutureWarning, stacklevel=3)
    paths = _module_paths(model)
    return [paths[id(m)].encode() for m in submodules]


_COMM = {}


def _communicator():
    """The communicator the state-dict functions run over: one built from the launcher's
    environment (torchrun, dsdrun, mpirun, srun) once torch.distributed runs with more than one
    rank, shared by every later call; None in a single process. $DSD_TIMEOUT_S sets its
    collective timeout (default 30 minutes, as PyTorch's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    key = (dist.get_rank(), dist.get_world_size())
    if key not in _COMM:
        import datetime
        import os

        timeout = os.environ.get("DSD_TIMEOUT_S")
        if timeout:
            _COMM[key] = _dist.Communicator.from_env(timeout=datetime.timedelta(seconds=float(timeout)))
        else:
            _COMM[key] = _dist.Communicator.from_env()
    return _COMM[key]


class _Context:
    """What one call shares: the communicator, and the meshes met (torch <-> dsd), so sharded
    values come back as DTensors on the very meshes they came from."""

    def __init__(self):
        self.comm = _communicator()
        self.meshes = _dist.MeshCache(self.comm)
        self._handles: dict[int, tuple[object, int]] = {}

    def handle(self, tensor) -> int:
        """The handle of `tensor` for this call (made once, released with the context)."""
        hit = self._handles.get(id(tensor))
        if hit is None:
            hit = (tensor, _tensor_handle(tensor, self.meshes))
            self._handles[id(tensor)] = hit
        return hit[1]

    def __del__(self):
        for _, bits in self._handles.values():
            try:
                _tensor.release(bits)
            except Exception:  # noqa: BLE001 - never raise from a finalizer
                pass


def _expand_module_keyed(model, state_dict):
    """The deprecated form {submodule: its state dict} -> one FQN-keyed dict."""
    import torch

    if not state_dict or not isinstance(next(iter(state_dict.keys())), torch.nn.Module):
        return state_dict
    warnings.warn(
        "Passing model_state_dict as a ``Dict[nn.Module, Dict[str, Any]]``is deprecated and will be "
        "removed in 2.5. If you need this feature, please preprocess the model_state_dict to achieve "
        "the same functionality.", FutureWarning, stacklevel=3)
    m = _Model(model, StateDictOptions(), _Context())
    paths = _module_paths(model)
    out = {}
    for sub, sub_sd in state_dict.items():
        prefix = m.canonical(paths[id(sub)] + ".x")[:-1]
        out.update({prefix + k: v for k, v in sub_sd.items()})
    return out


def _to_python(ptr, ctx=None, free=True):
    try:
        return _state_dict.to_python(ptr, ctx.meshes if ctx is not None else None)
    finally:
        if free:
            lib.dsd_state_dict_free(ptr)


# ---------------------------------------------------------------------------------------------
# The public functions, mirroring torch.distributed.checkpoint.state_dict.

def get_model_state_dict(model, *, submodules=None, options: StateDictOptions | None = None) -> dict[str, Any]:
    options = options or StateDictOptions()
    keep = []
    ctx = _Context()
    m = _Model(model, options, ctx)
    subs = _submodule_paths(model, submodules)
    keep.append([ffi.new("char[]", s) for s in subs])
    sub_arr = ffi.new("char*[]", keep[-1]) if subs else ffi.NULL
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_get_model_state_dict_submodules, m.ptr, sub_arr, len(subs), _c_options(options, keep), out)
    return _to_python(out[0], ctx)


def get_optimizer_state_dict(model, optimizers, *, submodules=None,
                             options: StateDictOptions | None = None) -> dict[str, Any]:
    options = options or StateDictOptions()
    keep = []
    _submodule_paths(model, submodules)
    ctx = _Context()
    m = _Model(model, options, ctx)
    opts = [_Optim(o, ctx) for o in _optimizers(optimizers)]
    arr = ffi.new("dsd_optim*[]", [o.ptr for o in opts])
    out = ffi.new("dsd_state_dict**")
    call(lib.dsd_get_optimizer_state_dict, m.ptr, arr, len(opts), _c_options(options, keep), out)
    return _to_python(out[0], ctx)


def get_state_dict(model, optimizers, *, submodules=None,
                   options: StateDictOptions | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    options = options or StateDictOptions()
    keep = []
    _submodule_paths(model, submodules)
    ctx = _Context()
    m = _Model(model, options, ctx)
    opts = [_Optim(o, ctx) for o in _optimizers(optimizers)]
    arr = ffi.new("dsd_optim*[]", [o.ptr for o in opts])
    msd = ffi.new("dsd_state_dict**")
    osd = ffi.new("dsd_state_dict**")
    call(lib.dsd_get_state_dict, m.ptr, arr, len(opts), _c_options(options, keep), msd, osd)
    return _to_python(msd[0], ctx), _to_python(osd[0], ctx)


def _keys(ptr) -> _IncompatibleKeys:
    if ptr == ffi.NULL:
        return _IncompatibleKeys([], [])
    try:
        nm = ffi.new("size_t*")
        nu = ffi.new("size_t*")
        call(lib.dsd_incompatible_keys_count, ptr, nm, nu)
        s = ffi.new("char**")
        missing, unexpected = [], []
        for i in range(nm[0]):
            call(lib.dsd_incompatible_keys_missing, ptr, i, s)
            missing.append(ffi.string(s[0]).decode())
        for i in range(nu[0]):
            call(lib.dsd_incompatible_keys_unexpected, ptr, i, s)
            unexpected.append(ffi.string(s[0]).decode())
        return _IncompatibleKeys(missing, unexpected)
    finally:
        lib.dsd_incompatible_keys_free(ptr)


def _from_python(obj, ctx):
    return _state_dict.to_dsd(obj, ctx=ctx.meshes)


def set_model_state_dict(model, model_state_dict, *, options: StateDictOptions | None = None) -> _IncompatibleKeys:
    options = options or StateDictOptions()
    model_state_dict = _expand_module_keyed(model, model_state_dict)
    keep = []
    ctx = _Context()
    m = _Model(model, options, ctx)
    sd = _from_python(model_state_dict, ctx)
    out = ffi.new("dsd_incompatible_keys**")
    try:
        call(lib.dsd_set_model_state_dict, m.ptr, sd, _c_options(options, keep), out)
    finally:
        lib.dsd_state_dict_free(sd)
    keys = _keys(out[0])
    m.apply_assigned()
    m.apply_extra_state(model_state_dict)
    return keys


def set_optimizer_state_dict(model, optimizers, optim_state_dict, *,
                             options: StateDictOptions | None = None) -> None:
    options = options or StateDictOptions()
    keep = []
    ctx = _Context()
    m = _Model(model, options, ctx)
    opts = [_Optim(o, ctx) for o in _optimizers(optimizers)]
    arr = ffi.new("dsd_optim*[]", [o.ptr for o in opts])
    sd = _from_python(optim_state_dict, ctx)
    try:
        call(lib.dsd_set_optimizer_state_dict, m.ptr, arr, len(opts), sd, _c_options(options, keep))
    finally:
        lib.dsd_state_dict_free(sd)
    for o in opts:
        o.sync_back()


def set_state_dict(model, optimizers, *, model_state_dict, optim_state_dict,
                   options: StateDictOptions | None = None) -> _IncompatibleKeys:
    options = options or StateDictOptions()
    model_state_dict = _expand_module_keyed(model, model_state_dict)
    keep = []
    ctx = _Context()
    m = _Model(model, options, ctx)
    opts = [_Optim(o, ctx) for o in _optimizers(optimizers)]
    arr = ffi.new("dsd_optim*[]", [o.ptr for o in opts])
    msd = _from_python(model_state_dict, ctx)
    osd = _from_python(optim_state_dict, ctx)
    out = ffi.new("dsd_incompatible_keys**")
    try:
        call(lib.dsd_set_state_dict, m.ptr, arr, len(opts), msd, osd, _c_options(options, keep), out)
    finally:
        lib.dsd_state_dict_free(msd)
        lib.dsd_state_dict_free(osd)
    for o in opts:
        o.sync_back()
    keys = _keys(out[0])
    m.apply_assigned()
    m.apply_extra_state(model_state_dict)
    return keys


def _names_array(names: Iterable[str], keep):
    encoded = [ffi.new("char[]", n.encode()) for n in names]
    keep.append(encoded)
    return ffi.new("char*[]", encoded), len(encoded)


def _remap(fn, state_dict: dict, names: list[str]) -> dict:
    keep = []
    arr, n = _names_array(names, keep)
    sd = _state_dict.to_dsd(state_dict)
    out = ffi.new("dsd_state_dict**")
    try:
        call(fn, sd, arr, n, out)
    finally:
        lib.dsd_state_dict_free(sd)
    return _to_python(out[0])


def optim_state_dict_to_fqn(positional: dict, names: list[str]) -> dict:
    """PyTorch's optim.state_dict() (ids) -> FQN form, given the FQN of each parameter id."""
    return _remap(lib.dsd_optim_state_dict_to_fqn, positional, names)


def optim_state_dict_to_positional(fqn_form: dict, names: list[str]) -> dict:
    """FQN form -> PyTorch's optim.state_dict() form (ids), given the FQN of each parameter id."""
    return _remap(lib.dsd_optim_state_dict_to_positional, fqn_form, names)

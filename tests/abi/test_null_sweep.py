"""NULL for every pointer argument of every function the header declares, one argument at a
time with all others valid: each call must return DSD_E_INVALID_ARGUMENT with a message
"<argument> is NULL", never crash. New functions are covered as they are declared; a new
argument type needs a factory below (the test fails until it has one)."""
from __future__ import annotations

import os

import tempfile

import cffi
import pytest
import torch

from header_info import functions, read_decls

ffi = cffi.FFI()
ffi.cdef(read_decls())
lib = ffi.dlopen(os.environ["DSD_LIBRARY"])

# Arguments NULL may stand for, by function (or "*" for all): documented as optional.
OPTIONAL = {
    "*": {"err", "user_data", "release", "out_why", "strides", "out_is_tuple", "options", "out_keys"},
    "dsd_model_new": {"comm", "class_name"},
    "dsd_optim_set_param_state": {"state"},
    # Checkpoints: comm NULL is a single process, options NULL the defaults.
    "dsd_checkpoint_save": {"comm"},
    "dsd_checkpoint_load": {"comm"},
    "dsd_async_checkpointer_new": {"comm"},
    "dsd_checkpoint_manager_new": {"comm"},
    # NULL is the default CUDA stream; a mesh's ranks default to 0, 1, 2, ...
    "dsd_comm_new_nccl": {"cuda_stream"},
    "dsd_mesh_new": {"ranks"},
}

# Arrays passed in (`items, count`): the factories give one valid element.
STRING_ARRAYS = {"keys", "names", "submodules"}


def _ok(status, err):
    assert status == lib.DSD_OK, ffi.string(lib.dsd_error_message(err[0])).decode()


class Factory:
    def __init__(self):
        self.keep = []
        err = ffi.new("dsd_error**")
        data = ffi.new("float[4]", [1, 2, 3, 4])
        shape = ffi.new("int64_t[1]", [4])
        t = ffi.new("dsd_tensor*")
        _ok(lib.dsd_tensor_from_blob(data, lib.DSD_DTYPE_F32, shape, 1, ffi.NULL,
                                     {"type": lib.DSD_DEVICE_CPU, "index": 0}, False, ffi.NULL, ffi.NULL,
                                     t, err), err)
        self.keep += [data, shape]
        self.tensor = t[0]

    def state_dict(self):
        out = ffi.new("dsd_state_dict**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_state_dict_new(out, err), err)
        sd = ffi.gc(out[0], lib.dsd_state_dict_release)
        _ok(lib.dsd_state_dict_set_int(sd, b"k", 1, err), err)
        self.keep.append(sd)
        return sd

    def model(self):
        out = ffi.new("dsd_model**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_model_new(ffi.NULL, ffi.NULL, out, err), err)
        m = ffi.gc(out[0], lib.dsd_model_free)
        _ok(lib.dsd_model_add_parameter(m, b"w", self.tensor, True, err), err)
        self.keep.append(m)
        return m

    def optim(self):
        out = ffi.new("dsd_optim**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_optim_new(out, err), err)
        o = ffi.gc(out[0], lib.dsd_optim_free)
        params = ffi.new("dsd_tensor[1]", [self.tensor])
        _ok(lib.dsd_optim_add_param_group(o, ffi.NULL, params, 1, err), err)
        _ok(lib.dsd_optim_set_param_state(o, self.tensor, self.state_dict(), err), err)
        self.keep.append(o)
        return o

    def incompatible_keys(self):
        err = ffi.new("dsd_error**")
        sd = ffi.new("dsd_state_dict**")
        _ok(lib.dsd_state_dict_new(sd, err), err)
        _ok(lib.dsd_state_dict_set_tensor(sd[0], b"x", self.tensor, err), err)
        opts = ffi.new("dsd_state_dict_options*")
        lib.dsd_state_dict_options_init(opts)
        opts.strict = False
        out = ffi.new("dsd_incompatible_keys**")
        _ok(lib.dsd_set_model_state_dict(self.model(), sd[0], opts, out, err), err)
        lib.dsd_state_dict_release(sd[0])
        keys = ffi.gc(out[0], lib.dsd_incompatible_keys_free)
        self.keep.append(keys)
        return keys

    def comm(self):
        out = ffi.new("dsd_comm**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_comm_new_local(out, err), err)
        comm = ffi.gc(out[0], lib.dsd_comm_release)
        self.keep.append(comm)
        return comm

    def mesh(self):
        out = ffi.new("dsd_mesh**")
        err = ffi.new("dsd_error**")
        shape = ffi.new("int64_t[1]", [1])
        _ok(lib.dsd_mesh_new(self.comm(), shape, 1, ffi.NULL, 0, lib.DSD_DEVICE_CPU, out, err), err)
        mesh = ffi.gc(out[0], lib.dsd_mesh_release)
        self.keep.append(mesh)
        return mesh

    def layout(self):
        """Shard(0) of a [4] tensor on a one-rank mesh: the local chunk matches self.tensor."""
        out = ffi.new("dsd_layout*")
        err = ffi.new("dsd_error**")
        shape = ffi.new("int64_t[1]", [4])
        placement = ffi.new("dsd_placement[1]", [{"kind": lib.DSD_PLACEMENT_SHARD, "dim": 0}])
        _ok(lib.dsd_layout_new_placements(self.mesh(), shape, 1, placement, 1, out, err), err)
        return out[0]

    def dlpack(self, versioned):
        cap = torch.arange(4.0).__dlpack__(max_version=(1, 0)) if versioned else torch.arange(4.0).__dlpack__()
        import ctypes
        api = ctypes.pythonapi
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
        name = b"dltensor_versioned" if versioned else b"dltensor"
        ptr = api.PyCapsule_GetPointer(cap, name)
        self.keep.append(b"used_" + name)
        api.PyCapsule_SetName(cap, self.keep[-1])  # we own it now
        self.keep.append(cap)
        return ffi.cast("struct DLManagedTensorVersioned*" if versioned else "struct DLManagedTensor*", ptr)

    def checkpoint_dir(self):
        """A directory holding a saved one-tensor checkpoint."""
        tmp = tempfile.TemporaryDirectory()
        self.keep.append(tmp)
        sd = self.state_dict()
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_state_dict_set_tensor(sd, b"w", self.tensor, err), err)
        path = (tmp.name + "/ck").encode()
        _ok(lib.dsd_checkpoint_save(ffi.NULL, sd, path, ffi.NULL, err), err)
        return sd, tmp.name, path

    def checkpointer(self):
        out = ffi.new("dsd_async_checkpointer**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_async_checkpointer_new(ffi.NULL, out, err), err)
        checkpointer = ffi.gc(out[0], lib.dsd_async_checkpointer_free)
        self.keep.append(checkpointer)
        return checkpointer

    def future(self):
        sd, tmp, _ = self.checkpoint_dir()
        out = ffi.new("dsd_future**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_checkpoint_save_async(self.checkpointer(), sd, (tmp + "/async").encode(), ffi.NULL, out,
                                          err), err)
        _ok(lib.dsd_future_wait(out[0], -1, err), err)
        return ffi.gc(out[0], lib.dsd_future_free)

    def manager(self):
        tmp = tempfile.TemporaryDirectory()
        self.keep.append(tmp)
        out = ffi.new("dsd_checkpoint_manager**")
        err = ffi.new("dsd_error**")
        _ok(lib.dsd_checkpoint_manager_new(ffi.NULL, tmp.name.encode(), 1, out, err), err)
        return ffi.gc(out[0], lib.dsd_checkpoint_manager_free)

    def options(self, struct):
        o = ffi.new(struct + "*")
        getattr(lib, struct + "_init")(o)
        self.keep.append(o)
        return o

    def value(self, name, ctype):
        if ctype.startswith("const dsd_") and ctype.endswith("_options*"):
            return self.options(ctype[len("const "):-1])
        if ctype == "dsd_format":
            return lib.DSD_FORMAT_TORCH
        if ctype == "dsd_key_list":
            return lib.DSD_KEYS_MISSING
        if ctype in ("dsd_future*", "const dsd_future*"):
            return self.future()
        if ctype == "dsd_async_checkpointer*":
            return self.checkpointer()
        if ctype in ("dsd_checkpoint_manager*", "const dsd_checkpoint_manager*"):
            return self.manager()
        if ctype == "const char**" and name in STRING_ARRAYS:
            b = ffi.new("char[]", b"w")
            arr = ffi.new("char*[1]", [b])
            self.keep += [b, arr]
            return arr
        if ctype == "const char**":
            return ffi.new("const char**")  # a borrowed string handed out
        if ctype in ("dsd_state_dict*", "const dsd_state_dict*"):
            return self.state_dict()
        if ctype in ("dsd_model*", "const dsd_model*"):
            return self.model()
        if ctype in ("dsd_optim*", "const dsd_optim*"):
            return self.optim()
        if ctype == "dsd_optim**":  # dsd_optim* const* optims
            arr = ffi.new("dsd_optim*[1]", [self.optim()])
            self.keep.append(arr)
            return arr
        if ctype == "const dsd_tensor*":
            arr = ffi.new("dsd_tensor[1]", [self.tensor])
            self.keep.append(arr)
            return arr
        if ctype in ("dsd_incompatible_keys*", "const dsd_incompatible_keys*"):
            return self.incompatible_keys()
        if ctype in ("dsd_comm*", "const dsd_comm*"):
            return self.comm()
        if ctype in ("dsd_mesh*", "const dsd_mesh*"):
            return self.mesh()
        if ctype == "const dsd_placement*":
            p = ffi.new("dsd_placement[1]", [{"kind": lib.DSD_PLACEMENT_SHARD, "dim": 0}])
            self.keep.append(p)
            return p
        if ctype == "dsd_placement*":
            return ffi.new("dsd_placement[8]")
        if ctype == "struct DLManagedTensorVersioned*":
            return self.dlpack(True)
        if ctype == "struct DLManagedTensor*":
            return self.dlpack(False)
        if ctype in ("const char*", "char*"):
            b = ffi.new("char[]", b"abc")
            self.keep.append(b)
            return b
        if ctype in ("void*", "const void*"):
            b = ffi.new("char[64]")
            self.keep.append(b)
            return b
        if ctype == "const int64_t*":
            b = ffi.new("int64_t[1]", [4])
            self.keep.append(b)
            return b
        if ctype == "const int32_t*":
            b = ffi.new("int32_t[1]", [0])
            self.keep.append(b)
            return b
        if ctype == "int64_t*":
            return ffi.new("int64_t[8]")
        if ctype.endswith("*"):
            return ffi.new(ctype.replace("const ", ""))
        if ctype == "dsd_tensor":
            return self.tensor
        if ctype == "dsd_layout":
            return self.layout()
        if ctype == "dsd_device":
            return {"type": lib.DSD_DEVICE_CPU, "index": 0}
        if ctype == "dsd_device_type":
            return lib.DSD_DEVICE_CPU
        if ctype == "dsd_dtype":
            return lib.DSD_DTYPE_F32
        if ctype == "dsd_wrapper_kind":
            return lib.DSD_WRAPPER_DDP
        if ctype in ("size_t", "int32_t", "int64_t", "uint32_t", "uint64_t"):
            return {"capacity": 8, "len": 3, "ndim": 1, "rank": 0}.get(name, 0 if name == "index" else 1)
        if ctype == "bool":
            return False
        if ctype == "double":
            return 1.0
        if ctype == "fnptr" or ctype.endswith("_fn"):
            return ffi.NULL  # callbacks are optional
        raise NotImplementedError(f"no factory for {ctype} {name}: add one to test_null_sweep.py")


def cases():
    for fn, (ret, params) in sorted(functions().items()):
        if ret != "dsd_status" or not params or params[-1][0] != "err":
            continue  # not a fallible call (dsd_error_code reads a status)
        optional = OPTIONAL["*"] | OPTIONAL.get(fn, set())
        for i, (name, ctype) in enumerate(params):
            if (ctype.endswith("*") or ctype == "fnptr") and name not in optional:
                yield pytest.param(fn, i, id=f"{fn}:{name}")


@pytest.mark.parametrize("fn,null_index", list(cases()))
def test_null_argument_is_an_error(fn, null_index):
    _, params = functions()[fn]
    f = Factory()
    args = [ffi.NULL if i == null_index else f.value(n, t) for i, (n, t) in enumerate(params)]
    err = args[-1]
    status = getattr(lib, fn)(*args)
    name = params[null_index][0]
    assert status == lib.DSD_E_INVALID_ARGUMENT, f"{fn} with {name}=NULL returned {status}"
    message = ffi.string(lib.dsd_error_message(err[0])).decode()
    assert f"{name} is NULL" in message, message
    lib.dsd_error_free(err[0])

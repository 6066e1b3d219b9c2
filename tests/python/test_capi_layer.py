"""The Python package reaches libdsd through one typed layer, dsd/_capi.py, which follows the
header: no other module calls `lib.dsd_*` or builds cffi objects, every `lib.` name the
package uses is declared in capi/include/dsd/dsd_decls.h, and every C call passes as many
arguments as the header's prototype has (err included, through _capi._call)."""
from __future__ import annotations

import ast
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
PACKAGE = os.path.join(REPO, "bindings", "python", "dsd")
sys.path.insert(0, os.path.join(REPO, "tests", "abi"))

from header_info import functions, read_decls  # noqa: E402

LAYER = "_capi.py"
LOADER = "_lib.py"  # creates ffi and lib; calls nothing


def sources() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
                out[name] = f.read()
    return out


def defines() -> set[str]:
    return set(re.findall(r"^\s*#define\s+(DSD_\w+)\s", read_decls(), flags=re.M))


def lib_names(tree: ast.AST) -> set[str]:
    """Every `lib.<name>` in a module."""
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lib"}


def c_calls(tree: ast.AST):
    """(function name, arguments passed, line) of every C call: `lib.f(...)` directly, or
    `_call(lib.f, ...)`, which appends the error slot."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "lib":
            yield f.attr, len(node.args), node.lineno
        elif (isinstance(f, ast.Name) and f.id == "_call" and node.args
              and isinstance(node.args[0], ast.Attribute) and isinstance(node.args[0].value, ast.Name)
              and node.args[0].value.id == "lib"):
            yield node.args[0].attr, len(node.args) - 1 + 1, node.lineno


def test_only_the_layer_calls_the_library():
    offenders = []
    for name, text in sources().items():
        if name == LAYER:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\blib\.dsd_", code):
                offenders.append(f"{name}:{i}: {line.strip()}")
            if name != LOADER and re.search(r"\bffi\.", code):
                offenders.append(f"{name}:{i}: {line.strip()}")
    assert not offenders, "C calls outside dsd/_capi.py:\n" + "\n".join(offenders)


def test_the_layer_is_where_the_calls_are():
    tree = ast.parse(sources()[LAYER])
    called = {name for name, _, _ in c_calls(tree)}
    assert len(called) > 100, sorted(called)  # the scan sees the calls (a test that can fail)


def test_every_lib_name_is_declared():
    declared = set(functions()) | defines()
    missing = []
    for name, text in sources().items():
        for attr in sorted(lib_names(ast.parse(text))):
            if attr not in declared:
                missing.append(f"{name}: lib.{attr}")
    assert not missing, "not in dsd_decls.h:\n" + "\n".join(missing)


def test_every_call_passes_the_prototypes_arguments():
    protos = functions()
    wrong = []
    for name, text in sources().items():
        for fn, n, line in c_calls(ast.parse(text)):
            if fn in protos and n != len(protos[fn][1]):
                wrong.append(f"{name}:{line}: {fn} gets {n} arguments, the header declares "
                             f"{len(protos[fn][1])}: {', '.join(p for p, _ in protos[fn][1])}")
    assert not wrong, "\n".join(wrong)


def test_fallible_functions_go_through_the_error_slot():
    """A direct `lib.f(...)` call of a function taking `dsd_error** err` must pass one that
    the layer raises from (only optim_get_param_state does, to map NOT_FOUND to None)."""
    protos = functions()
    text = sources()[LAYER]
    direct = sorted({fn for fn, _, _ in c_calls(ast.parse(text))
                     if fn in protos and protos[fn][1] and protos[fn][1][-1][0] == "err"
                     and f"_call(lib.{fn}," not in text})
    assert direct == ["dsd_optim_get_param_state"], direct


def test_public_names_resolve():
    dsd = pytest.importorskip("dsd")
    for name in dsd.__all__:
        assert getattr(dsd, name) is not None, name
    assert dsd.abi_version()[0] == dsd.lib.DSD_ABI_VERSION_MAJOR

"""What dsd_decls.h declares, read with pycparser (which cffi itself uses): every function
with its parameter names and C types. Shared by the ABI tests."""
from __future__ import annotations

import os
import re

import pycparser
from pycparser import c_ast

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
DECLS = os.path.join(REPO, "capi", "include", "dsd", "dsd_decls.h")

_PRELUDE = """
typedef signed char int8_t; typedef int int32_t; typedef long long int64_t;
typedef unsigned int uint32_t; typedef unsigned long long uint64_t; typedef unsigned long size_t;
typedef unsigned long uintptr_t; typedef _Bool bool;
"""


def read_decls() -> str:
    with open(DECLS, encoding="utf-8") as f:
        return f.read()


def _type_str(node) -> str:
    quals = ""
    if isinstance(node, c_ast.PtrDecl):
        return _type_str(node.type) + "*"
    if isinstance(node, c_ast.TypeDecl):
        quals = "const " if "const" in node.quals else ""
        inner = node.type
        if isinstance(inner, c_ast.IdentifierType):
            return quals + " ".join(inner.names)
        if isinstance(inner, c_ast.Struct):
            return quals + "struct " + inner.name
    if isinstance(node, c_ast.FuncDecl):
        return "fnptr"
    raise ValueError(f"unexpected type node {node}")


def functions() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """name -> (return type, [(param name, param type), ...]) for every declared function."""
    text = re.sub(r"/\*.*?\*/", " ", read_decls(), flags=re.S)  # comments, as cffi strips them
    text = re.sub(r"//[^\n]*", " ", text)
    text = re.sub(r"^\s*#.*$", "", text, flags=re.M)
    ast = pycparser.CParser().parse(_PRELUDE + text)
    out = {}
    for decl in ast.ext:
        if isinstance(decl, c_ast.Decl) and isinstance(decl.type, c_ast.FuncDecl):
            fn = decl.type
            params = []
            for p in (fn.args.params if fn.args else []):
                if isinstance(p, c_ast.Typename):  # (void)
                    continue
                params.append((p.name, _type_str(p.type)))
            out[decl.name] = (_type_str(fn.type), params)
    return out

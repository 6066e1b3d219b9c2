#!/usr/bin/env python3
"""Writes bindings/julia/src/LibDsd.jl from capi/include/dsd/dsd_decls.h, the way Clang.jl's
generator writes a LibXXX.jl: every #define constant, integer typedef, struct (with the C
field types, so Julia lays it out as C does), opaque type, callback type, and every function as
a wrapper around `@ccall libdsd.<name>(...)::<ret>` with exactly the C types.

The header is parsed with pycparser (cffi's parser, which the Python binding depends on), after
stripping comments and #defines as cffi does. Output is deterministic: header order, fixed
formatting.

    .venv/bin/python tools/gen_julia.py            # rewrites bindings/julia/src/LibDsd.jl
    .venv/bin/python tools/gen_julia.py --stdout   # prints it (tests/julia compares with the file)
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import pycparser
from pycparser import c_ast

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
HEADER = os.path.join(REPO, "capi", "include", "dsd", "dsd_decls.h")
OUTPUT = os.path.join(REPO, "bindings", "julia", "src", "LibDsd.jl")

# The fixed-width types dsd_decls.h uses (dsd.h gets them from <stdint.h>, <stdbool.h>).
_PRELUDE = """
typedef signed char int8_t; typedef short int16_t; typedef int int32_t; typedef long long int64_t;
typedef unsigned char uint8_t; typedef unsigned short uint16_t;
typedef unsigned int uint32_t; typedef unsigned long long uint64_t; typedef unsigned long size_t;
typedef _Bool bool;
"""
_PRELUDE_NAMES = {"int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t",
                  "uint64_t", "size_t", "bool"}

# C base type -> Julia type.
BASE = {
    "void": "Cvoid",
    "bool": "Bool",
    "_Bool": "Bool",
    "char": "Cchar",
    "int": "Cint",
    "double": "Cdouble",
    "float": "Cfloat",
    "int8_t": "Int8",
    "int16_t": "Int16",
    "int32_t": "Int32",
    "int64_t": "Int64",
    "uint8_t": "UInt8",
    "uint16_t": "UInt16",
    "uint32_t": "UInt32",
    "uint64_t": "UInt64",
    "size_t": "Csize_t",
}

# Julia words that cannot name an argument or a field.
_JULIA_RESERVED = {
    "baremodule", "begin", "break", "catch", "const", "continue", "do", "else", "elseif", "end",
    "export", "false", "finally", "for", "function", "global", "if", "import", "let", "local",
    "macro", "module", "quote", "return", "struct", "true", "try", "using", "while", "in", "isa",
    "where", "abstract", "mutable", "primitive", "outer",
}


def julia_name(name: str) -> str:
    return name + "_" if name in _JULIA_RESERVED else name


def _strip(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r"^\s*#.*$", "", text, flags=re.M)


def _doc_comments(text: str) -> dict[str, str]:
    """The comment right above each declaration, keyed by the first name it declares."""
    docs = {}
    pattern = re.compile(r"^[ \t]*/\*((?:(?!\*/).)*)\*/[ \t]*\n((?:[^/]|/(?!\*))*)", re.S | re.M)
    for m in pattern.finditer(text):
        body, following = m.group(1), m.group(2)
        if body.lstrip().startswith("=") or following.startswith("\n"):
            continue  # a section banner, or a comment not directly above a declaration
        head = following.lstrip()
        name = (re.match(r"typedef\s+struct\s+(\w+)", head)
                or re.match(r"typedef\s+[\w ]+\(\*\s*(\w+)\)", head)
                or re.match(r"typedef\s+\w+\s+(\w+)\s*;", head)
                or re.search(r"\b(dsd_\w+)\s*\(", following))
        if name and name.group(1) not in docs:
            lines = [re.sub(r"^\s*\*? ?", "", line) for line in body.strip().splitlines()]
            docs[name.group(1)] = " ".join(line.strip() for line in lines if line.strip())
    return docs


class Header:
    """What the header declares, in order."""

    def __init__(self, text: str):
        self.text = text
        self.defines = re.findall(r"^\s*#define\s+(DSD_\w+)\s+(-?\d+)\b", text, flags=re.M)
        self.ast = pycparser.CParser().parse(_PRELUDE + _strip(text), filename="dsd_decls.h")
        self.items: list[tuple[str, object]] = []  # (kind, payload) in header order
        self.typedefs: dict[str, str] = {}  # integer typedef name -> C base type
        self.structs: dict[str, list[tuple[str, c_ast.Node]]] = {}
        self.opaque: list[str] = []
        self.callbacks: dict[str, c_ast.FuncDecl] = {}
        self.functions: dict[str, c_ast.FuncDecl] = {}
        self.struct_typedef: dict[str, str] = {}  # struct tag -> typedef name
        self._walk()

    def _walk(self) -> None:
        for node in self.ast.ext:
            if isinstance(node, c_ast.Typedef):
                if node.name in _PRELUDE_NAMES:
                    continue
                t = node.type
                if isinstance(t, c_ast.TypeDecl) and isinstance(t.type, c_ast.IdentifierType):
                    self.typedefs[node.name] = " ".join(t.type.names)
                    self.items.append(("typedef", node.name))
                elif isinstance(t, c_ast.TypeDecl) and isinstance(t.type, c_ast.Struct):
                    s = t.type
                    self.struct_typedef[s.name] = node.name
                    if s.decls is None:
                        if node.name not in self.structs and node.name not in self.opaque:
                            self.opaque.append(node.name)
                            self.items.append(("opaque", node.name))
                    else:
                        self.structs[node.name] = [(d.name, d.type) for d in s.decls]
                        self.items.append(("struct", node.name))
                elif isinstance(t, c_ast.PtrDecl) and isinstance(t.type, c_ast.FuncDecl):
                    self.callbacks[node.name] = t.type
                    self.items.append(("callback", node.name))
                else:
                    raise SystemExit(f"gen_julia: unsupported typedef {node.name}")
            elif isinstance(node, c_ast.Decl):
                if isinstance(node.type, c_ast.FuncDecl):
                    self.functions[node.name] = node.type
                    self.items.append(("function", node.name))
                elif isinstance(node.type, c_ast.Struct) and node.type.decls is None:
                    # `struct DLManagedTensor;`: a type this header only names.
                    if node.type.name not in self.opaque:
                        self.opaque.append(node.type.name)
                        self.items.append(("opaque", node.type.name))
                else:
                    raise SystemExit(f"gen_julia: unsupported declaration {node.name}")


def julia_type(node: c_ast.Node, header: Header) -> str:
    """The Julia type of a C type node: `const char*` is Cstring everywhere (arguments, returns
    and fields), other pointers Ptr{T}, function pointers Ptr{Cvoid}."""
    if isinstance(node, c_ast.PtrDecl):
        inner = node.type
        if isinstance(inner, c_ast.FuncDecl):
            return "Ptr{Cvoid}"
        if (isinstance(inner, c_ast.TypeDecl) and isinstance(inner.type, c_ast.IdentifierType)
                and inner.type.names == ["char"] and "const" in inner.quals):
            return "Cstring"
        return "Ptr{" + julia_type(inner, header) + "}"
    if isinstance(node, c_ast.TypeDecl):
        inner = node.type
        if isinstance(inner, c_ast.IdentifierType):
            name = " ".join(inner.names)
            if name in BASE:
                return BASE[name]
            if name in header.typedefs or name in header.structs or name in header.opaque \
                    or name in header.callbacks:
                return name
            raise SystemExit(f"gen_julia: unknown type {name}")
        if isinstance(inner, c_ast.Struct):
            return header.struct_typedef.get(inner.name, inner.name)
    if isinstance(node, c_ast.FuncDecl):
        return "Ptr{Cvoid}"
    raise SystemExit(f"gen_julia: unsupported type node {type(node).__name__}")


def c_type(node: c_ast.Node) -> str:
    """The C spelling of a type node, for the comments of the generated wrappers."""
    if isinstance(node, c_ast.PtrDecl):
        s = c_type(node.type) + "*"
        return s + " const" if "const" in node.quals else s
    if isinstance(node, c_ast.TypeDecl):
        q = "const " if "const" in node.quals else ""
        inner = node.type
        if isinstance(inner, c_ast.IdentifierType):
            return q + " ".join(inner.names)
        if isinstance(inner, c_ast.Struct):
            return q + "struct " + inner.name
    if isinstance(node, c_ast.FuncDecl):
        return "fn"
    raise SystemExit("gen_julia: unsupported type node")


def params(fn: c_ast.FuncDecl) -> list[c_ast.Node]:
    out = []
    for p in (fn.args.params if fn.args else []):
        if isinstance(p, c_ast.Typename) and c_type(p.type) == "void":
            continue
        out.append(p)
    return out


def _wrap_doc(doc: str, width: int = 96) -> list[str]:
    words, lines, line = doc.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width - 2:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    if line:
        lines.append(line)
    return ["# " + l for l in lines]


def generate(text: str) -> str:
    h = Header(text)
    docs = _doc_comments(text)
    out: list[str] = []
    w = out.append
    w("# Generated by tools/gen_julia.py from capi/include/dsd/dsd_decls.h: DO NOT EDIT.")
    w("# Regenerate with `.venv/bin/python tools/gen_julia.py`; tests/julia fails when this")
    w("# file and the header disagree. The idiomatic API is Dsd.jl; this module is the C ABI,")
    w("# one to one.")
    w("module LibDsd")
    w("")
    w("# The library every @ccall below goes through. Dsd.__init__ sets it (DSD_LIBRARY, the")
    w("# \"libdsd\" preference, or the soname) with set_library! before the first call: a")
    w("# non-constant library is evaluated when a call site first runs, then cached there.")
    w(f'libdsd::String = "libdsd.so.{dict(h.defines)["DSD_ABI_VERSION_MAJOR"]}"')
    w("")
    w("function set_library!(path::AbstractString)")
    w("    global libdsd = String(path)")
    w("    return nothing")
    w("end")
    w("")
    w("# Constants (#define)")
    for name, value in h.defines:
        w(f"const {name} = {value}")
    w("")
    for kind, name in h.items:
        if kind != "function" and out[-1] == "end":
            w("")
        if kind != "function" and name in docs:
            out.extend(_wrap_doc(docs[name]))
        if kind == "typedef":
            w(f"const {name} = {BASE[h.typedefs[name]]}")
        elif kind == "opaque":
            w(f"mutable struct {name} end")
        elif kind == "callback":
            fn = h.callbacks[name]
            sig = ", ".join(c_type(p.type) for p in params(fn))
            w(f"# {c_type(fn.type)} (*{name})({sig})")
            w(f"const {name} = Ptr{{Cvoid}}")
        elif kind == "struct":
            w(f"struct {name}")
            for field, t in h.structs[name]:
                w(f"    {julia_name(field)}::{julia_type(t, h)}")
            w("end")
            w("")
        elif kind == "function":
            fn = h.functions[name]
            ps = params(fn)
            names = [julia_name(p.name) for p in ps]
            w("")
            if name in docs:
                out.extend(_wrap_doc(docs[name]))
            ret_c = c_type(fn.type)
            w(f"# {ret_c} {name}({', '.join(c_type(p.type) + ' ' + p.name for p in ps)})")
            w(f"function {name}({', '.join(names)})")
            args = ", ".join(f"{n}::{julia_type(p.type, h)}" for n, p in zip(names, ps))
            w(f"    @ccall libdsd.{name}({args})::{julia_type(fn.type, h)}")
            w("end")
    w("")
    w("end # module LibDsd")
    text_out = "\n".join(out) + "\n"
    return re.sub(r"\n{3,}", "\n\n", text_out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--header", default=HEADER)
    ap.add_argument("--output", default=OUTPUT)
    ap.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    a = ap.parse_args()
    with open(a.header, encoding="utf-8") as f:
        result = generate(f.read())
    if a.stdout:
        sys.stdout.write(result)
    else:
        os.makedirs(os.path.dirname(a.output), exist_ok=True)
        with open(a.output, "w", encoding="utf-8") as f:
            f.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

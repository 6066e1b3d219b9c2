"""Static checks of the Julia binding (bindings/julia), which no machine here can run:

- every .jl file parses with the tree-sitter Julia grammar, without ERROR or MISSING nodes;
- every @ccall of LibDsd.jl names a function of dsd_decls.h with the same arguments, in order,
  of the Julia types this file's own C -> Julia table gives, and the same return type; every
  function of the header has its wrapper; no ccall anywhere else;
- the idiomatic layer (Dsd.jl, the CUDA extension) calls LibDsd functions that exist, with the
  header's number of arguments, and names only constants and types LibDsd defines; what the
  example, the tests and the README call as `Dsd.<name>` is defined in Dsd.jl;
- the constants, integer typedefs, opaque and callback types match the header;
- the struct layouts Julia derives from LibDsd.jl's field types (C alignment rules) equal the C
  compiler's, printed by struct_layout.c (path in JULIA_STRUCT_LAYOUT);
- tools/gen_julia.py regenerates LibDsd.jl byte for byte;
- Project.toml declares what the sources use.

Each checker is also run on a deliberately broken input, so none of them can pass vacuously.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pycparser
import pytest
import tree_sitter
import tree_sitter_julia
from pycparser import c_ast

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tests", "abi"))
from header_info import functions as header_functions  # noqa: E402  (pycparser, as cffi)

JULIA = os.path.join(REPO, "bindings", "julia")
LIBDSD = os.path.join(JULIA, "src", "LibDsd.jl")
DSD = os.path.join(JULIA, "src", "Dsd.jl")
EXT = os.path.join(JULIA, "ext", "DsdCUDAExt.jl")
HEADER = os.path.join(REPO, "capi", "include", "dsd", "dsd_decls.h")

PARSER = tree_sitter.Parser(tree_sitter.Language(tree_sitter_julia.language()))


# ------------------------------------------------------------------------------------------
# The header, read independently of tools/gen_julia.py

# C type -> Julia type: the binding's contract, written down here a second time on purpose.
C_TO_JULIA = {
    "void": "Cvoid", "bool": "Bool", "char": "Cchar", "double": "Cdouble",
    "int8_t": "Int8", "int16_t": "Int16", "int32_t": "Int32", "int64_t": "Int64",
    "uint8_t": "UInt8", "uint16_t": "UInt16", "uint32_t": "UInt32", "uint64_t": "UInt64",
    "size_t": "Csize_t",
}

_PRELUDE = """
typedef signed char int8_t; typedef short int16_t; typedef int int32_t; typedef long long int64_t;
typedef unsigned char uint8_t; typedef unsigned short uint16_t; typedef unsigned int uint32_t;
typedef unsigned long long uint64_t; typedef unsigned long size_t; typedef _Bool bool;
"""


def header_text() -> str:
    with open(HEADER, encoding="utf-8") as f:
        return f.read()


def header_decls():
    """(defines, integer typedefs, structs {name: [(field, C type)]}, opaque names, callbacks)."""
    text = header_text()
    defines = dict(re.findall(r"^\s*#define\s+(DSD_\w+)\s+(-?\d+)\b", text, flags=re.M))
    body = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    body = re.sub(r"^\s*#.*$", "", body, flags=re.M)
    ast = pycparser.CParser().parse(_PRELUDE + body)
    prelude = {"int8_t", "int16_t", "int32_t", "int64_t", "uint8_t", "uint16_t", "uint32_t",
               "uint64_t", "size_t", "bool"}
    typedefs, structs, opaque, callbacks = {}, {}, set(), set()
    for node in ast.ext:
        if isinstance(node, c_ast.Typedef) and node.name not in prelude:
            t = node.type
            if isinstance(t, c_ast.TypeDecl) and isinstance(t.type, c_ast.IdentifierType):
                typedefs[node.name] = " ".join(t.type.names)
            elif isinstance(t, c_ast.TypeDecl) and isinstance(t.type, c_ast.Struct):
                if t.type.decls is None:
                    opaque.add(node.name)
                else:
                    structs[node.name] = [(d.name, _c_type(d.type)) for d in t.type.decls]
            elif isinstance(t, c_ast.PtrDecl) and isinstance(t.type, c_ast.FuncDecl):
                callbacks.add(node.name)
        elif isinstance(node, c_ast.Decl) and isinstance(node.type, c_ast.Struct):
            opaque.add(node.type.name)
    return defines, typedefs, structs, opaque, callbacks


def _c_type(node) -> str:
    if isinstance(node, c_ast.PtrDecl):
        return _c_type(node.type) + "*"
    quals = "const " if "const" in getattr(node, "quals", []) else ""
    inner = node.type
    if isinstance(inner, c_ast.IdentifierType):
        return quals + " ".join(inner.names)
    if isinstance(inner, c_ast.Struct):
        return quals + "struct " + inner.name
    raise AssertionError(f"unexpected C type node {node}")


def julia_type_of(c: str) -> str:
    """The Julia type the binding must use for a C type string of header_info ("const
    char**", "struct DLManagedTensor*", "dsd_error**")."""
    c = c.strip()
    stars = len(c) - len(c.rstrip("*"))
    base = c.rstrip("*").strip()
    const = base.startswith("const ")
    base = base.removeprefix("const ").strip()
    base = base.removeprefix("struct ").strip()
    if base == "char" and const and stars >= 1:
        jl, stars = "Cstring", stars - 1  # borrowed NUL-terminated strings, everywhere
    else:
        jl = C_TO_JULIA.get(base, base)  # a dsd typedef or struct keeps its C name
    for _ in range(stars):
        jl = "Ptr{" + jl + "}"
    return jl


# ------------------------------------------------------------------------------------------
# Julia sources, read with tree-sitter

def parse(source: bytes):
    return PARSER.parse(source)


def syntax_errors(source: bytes) -> list[str]:
    found = []

    def walk(n):
        if n.type == "ERROR" or n.is_missing:
            found.append(f"line {n.start_point[0] + 1}: {n.type} {n.text[:60]!r}")
        for c in n.children:
            walk(c)

    walk(parse(source).root_node)
    return found


def nodes(root, type_):
    stack = [root]
    while stack:
        n = stack.pop()
        if n.type == type_:
            yield n
        stack.extend(reversed(n.children))


def text(n) -> str:
    return re.sub(r"\s+", "", n.text.decode())


def positional_args(arglist) -> list:
    return [c for c in arglist.named_children if c.type not in ("named_argument", "comment",
                                                                "line_comment", "block_comment")]


def _macro_name(n) -> str:
    ident = next((c for c in n.children if c.type == "macro_identifier"), None)
    return text(ident) if ident is not None else ""


def ccalls(root):
    """Every @ccall: (name, lib, [(arg, type)], return type, node)."""
    out = []
    for m in nodes(root, "macrocall_expression"):
        if _macro_name(m) != "@ccall":
            continue
        args = next(c for c in m.children if c.type == "macro_argument_list")
        typed = args.named_children[0]
        assert typed.type == "typed_expression", f"@ccall without a return type: {text(m)}"
        call, ret = typed.named_children[0], typed.named_children[-1]
        callee = call.named_children[0]
        assert callee.type == "field_expression", f"@ccall without a library: {text(m)}"
        lib, name = (text(c) for c in callee.named_children)
        params = []
        for a in positional_args(call.named_children[1]):
            assert a.type == "typed_expression", f"untyped @ccall argument in {name}: {text(a)}"
            params.append((text(a.named_children[0]), text(a.named_children[-1])))
        out.append((name, lib, params, text(ret), m))
    return out


def plain_ccalls(root) -> list[str]:
    """ccall(...) / cglobal(...) calls (the non-macro forms)."""
    found = []
    for c in nodes(root, "call_expression"):
        callee = c.named_children[0]
        if callee.type == "identifier" and text(callee) in ("ccall", "cglobal"):
            found.append(text(c)[:80])
    for m in nodes(root, "macrocall_expression"):
        if _macro_name(m) in ("@ccall", "@cglobal"):
            found.append(text(m)[:80])
    return found


def wrappers(root) -> dict[str, tuple[list[str], list]]:
    """function NAME(params) ... end -> (params, @ccalls inside)."""
    out = {}
    for f in nodes(root, "function_definition"):
        sig = next(c for c in f.children if c.type == "signature")
        call = sig.named_children[0]
        if call.type != "call_expression":
            continue
        name = text(call.named_children[0])
        params = [text(p) for p in positional_args(call.named_children[1])]
        out[name] = (params, ccalls(f))
    return out


def consts(root) -> dict[str, str]:
    out = {}
    for c in nodes(root, "const_statement"):
        a = c.named_children[0]
        if a.type == "assignment":
            out[text(a.named_children[0])] = text(a.named_children[-1])
    return out


def structs(root) -> dict[str, tuple[bool, list[tuple[str, str]]]]:
    out = {}
    for s in nodes(root, "struct_definition"):
        mutable = any(c.type == "mutable" for c in s.children)
        head = next(c for c in s.children if c.type == "type_head")
        name = next(nodes(head, "identifier"))  # `struct A <: B`: A
        fields = [(text(f.named_children[0]), text(f.named_children[-1]))
                  for f in s.named_children if f.type == "typed_expression"]
        out[text(name)] = (mutable, fields)
    return out


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def jl_files() -> list[str]:
    found = []
    for d, _, files in os.walk(JULIA):
        found += [os.path.join(d, f) for f in files if f.endswith(".jl")]
    return sorted(found)


# ------------------------------------------------------------------------------------------
# Checkers (return a list of problems; the tests assert it is empty, and that a broken input
# makes it non-empty)

def check_ccalls(source: bytes) -> list[str]:
    header = header_functions()
    problems = []
    ws = wrappers(parse(source).root_node)
    every = ccalls(parse(source).root_node)
    inside = sum(len(c) for _, c in ws.values())
    if inside != len(every):
        problems.append(f"{len(every) - inside} @ccall outside a wrapper function")
    for fname, (params, calls) in ws.items():
        if not calls:
            continue
        if len(calls) != 1:
            problems.append(f"{fname}: {len(calls)} @ccall (one expected)")
        name, lib, args, ret, _ = calls[0]
        if lib != "libdsd":
            problems.append(f"{fname}: calls {lib}.{name}, not libdsd")
        if name != fname:
            problems.append(f"wrapper {fname} calls {name}")
        if name not in header:
            problems.append(f"{name}: not a function of dsd_decls.h")
            continue
        c_ret, c_params = header[name]
        if len(args) != len(c_params):
            problems.append(f"{name}: {len(args)} arguments, the header has {len(c_params)}")
            continue
        if [a for a, _ in args] != params:
            problems.append(f"{name}: the wrapper's parameters {params} are not passed in order")
        for (arg, jl), (cname, ctype) in zip(args, c_params):
            want = julia_type_of(ctype)
            if jl != want:
                problems.append(f"{name}({cname}): Julia {jl}, C {ctype} needs {want}")
        if ret != julia_type_of(c_ret):
            problems.append(f"{name}: returns {ret}, C {c_ret} needs {julia_type_of(c_ret)}")
    missing = sorted(set(header) - {n for n, (_, c) in ws.items() if c})
    if missing:
        problems.append(f"header functions without a wrapper: {missing}")
    return problems


def check_declarations(source: bytes) -> list[str]:
    defines, typedefs, hstructs, opaque, callbacks = header_decls()
    root = parse(source).root_node
    cs, ss = consts(root), structs(root)
    problems = []
    for name, value in defines.items():
        if cs.get(name) != value:
            problems.append(f"{name}: {cs.get(name)} in LibDsd.jl, {value} in the header")
    extra = sorted(n for n in cs if n.startswith("DSD_") and n not in defines)
    if extra:
        problems.append(f"constants the header lacks: {extra}")
    for name, base in typedefs.items():
        if cs.get(name) != C_TO_JULIA[base]:
            problems.append(f"typedef {name}: {cs.get(name)}, the header's {base} is {C_TO_JULIA[base]}")
    for name in callbacks:
        if cs.get(name) != "Ptr{Cvoid}":
            problems.append(f"callback {name}: {cs.get(name)}, not Ptr{{Cvoid}}")
    for name in opaque:
        if ss.get(name) != (True, []):
            problems.append(f"opaque {name} is not `mutable struct {name} end`")
    for name, fields in hstructs.items():
        if name not in ss or ss[name][0]:
            problems.append(f"struct {name} missing or mutable")
            continue
        got = ss[name][1]
        if [f for f, _ in got] != [f for f, _ in fields]:
            problems.append(f"struct {name}: fields {[f for f, _ in got]}, header {[f for f, _ in fields]}")
            continue
        for (f, jl), (_, c) in zip(got, fields):
            if jl != julia_type_of(c):
                problems.append(f"{name}.{f}: {jl}, C {c} needs {julia_type_of(c)}")
    return problems


# Size and alignment of Julia's primitive types on x86_64 / aarch64 Linux (= the C ABI's).
PRIMITIVE = {"Bool": 1, "Int8": 1, "UInt8": 1, "Cchar": 1, "Int16": 2, "UInt16": 2,
             "Int32": 4, "UInt32": 4, "Cint": 4, "Cfloat": 4, "Int64": 8, "UInt64": 8,
             "Csize_t": 8, "Cdouble": 8, "Cstring": 8}


def julia_layouts(source: bytes) -> dict[str, tuple[int, int, dict[str, int]]]:
    """struct -> (size, alignment, {field: offset}), computed from LibDsd.jl's field types
    with the rules Julia uses for isbits structs (those of C)."""
    root = parse(source).root_node
    cs, ss = consts(root), structs(root)
    memo: dict[str, tuple[int, int, dict[str, int]]] = {}

    def size_align(t: str) -> tuple[int, int]:
        if t.startswith("Ptr{"):
            return 8, 8
        if t in PRIMITIVE:
            return PRIMITIVE[t], PRIMITIVE[t]
        if t in cs:
            return size_align(cs[t])
        if t in ss:
            s, a, _ = layout(t)
            return s, a
        raise AssertionError(f"no layout for Julia type {t}")

    def layout(name: str):
        if name not in memo:
            offset, align, fields = 0, 1, {}
            for f, t in ss[name][1]:
                s, a = size_align(t)
                offset = (offset + a - 1) // a * a
                fields[f] = offset
                offset += s
                align = max(align, a)
            memo[name] = ((offset + align - 1) // align * align, align, fields)
        return memo[name]

    return {name: layout(name) for name, (mutable, _) in ss.items() if not mutable}


def c_layouts() -> dict[str, tuple[int, int, dict[str, int]]]:
    exe = os.environ.get("JULIA_STRUCT_LAYOUT")
    if not exe:
        pytest.fail("JULIA_STRUCT_LAYOUT (the struct_layout program) is not set")
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    result: dict[str, tuple[int, int, dict[str, int]]] = {}
    for line in out.splitlines():
        kind, name, *nums = line.split()
        if kind == "struct":
            result[name] = (int(nums[0]), int(nums[1]), {})
        else:
            s, f = name.split(".")
            result[s][2][f] = int(nums[0])
    return result


def check_layouts(source: bytes, c: dict) -> list[str]:
    jl = julia_layouts(source)
    problems = []
    for name in sorted(set(c) | set(jl)):
        if name not in jl or name not in c:
            problems.append(f"{name}: only in {'C' if name in c else 'Julia'}")
        elif jl[name] != c[name]:
            problems.append(f"{name}: Julia (size, align, offsets) {jl[name]} != C {c[name]}")
    return problems


def check_dsd_calls(source: bytes) -> list[str]:
    """Calls from the idiomatic layer into LibDsd: names exist, argument counts match."""
    header = header_functions()
    defines, typedefs, hstructs, opaque, callbacks = header_decls()
    known = set(header) | set(defines) | set(typedefs) | set(hstructs) | opaque | callbacks
    known |= {"set_library!", "libdsd"}
    problems = []
    root = parse(source).root_node

    def libdsd_member(n):
        if n.type == "field_expression" and len(n.named_children) == 2 \
                and text(n.named_children[0]) in ("L", "LibDsd", "Dsd.LibDsd"):
            return text(n.named_children[1])
        return None

    for n in nodes(root, "field_expression"):
        m = libdsd_member(n)
        if m is not None and m not in known:
            problems.append(f"LibDsd has no {m}")
    for call in nodes(root, "call_expression"):
        callee, arglist = call.named_children[0], call.named_children[1]
        if arglist.type != "argument_list":
            continue
        args = positional_args(arglist)
        if any(a.type == "splat_expression" for a in args):
            continue
        name = libdsd_member(callee)
        if name in header:
            if len(args) != len(header[name][1]):
                problems.append(f"line {call.start_point[0] + 1}: {name} with {len(args)} "
                                f"arguments, the header has {len(header[name][1])}")
        elif text(callee) == "checked" and args:
            name = libdsd_member(args[0])
            if name is None:
                problems.append(f"line {call.start_point[0] + 1}: checked() of a non-LibDsd function")
            elif name in header:
                c_params = header[name][1]
                if not c_params or c_params[-1][1] != "dsd_error**":
                    problems.append(f"checked({name}): the function takes no err")
                elif len(args) - 1 != len(c_params) - 1:
                    problems.append(f"line {call.start_point[0] + 1}: checked({name}) passes "
                                    f"{len(args) - 1} arguments + err, the header has "
                                    f"{len(c_params) - 1} + err")
    return problems


def defined_names(source: bytes) -> set[str]:
    root = parse(source).root_node
    names = set(consts(root)) | set(structs(root))
    for f in nodes(root, "function_definition"):
        sig = next(c for c in f.children if c.type == "signature")
        call = sig.named_children[0]
        while call.type in ("typed_expression", "where_expression"):
            call = call.named_children[0]
        if call.type == "call_expression":
            names.add(text(call.named_children[0]).split(".")[-1])
    for a in nodes(root, "assignment"):
        lhs = a.named_children[0]
        while lhs.type in ("typed_expression", "where_expression"):
            lhs = lhs.named_children[0]
        if lhs.type == "call_expression":
            names.add(text(lhs.named_children[0]).split(".")[-1])
        elif lhs.type == "identifier":
            names.add(text(lhs))
    return names


def check_dsd_names(source: bytes, api: set[str]) -> list[str]:
    problems = []
    for n in nodes(parse(source).root_node, "field_expression"):
        if len(n.named_children) == 2 and text(n.named_children[0]) == "Dsd":
            member = text(n.named_children[1])
            if member not in api and member != "LibDsd":
                problems.append(f"line {n.start_point[0] + 1}: Dsd.{member} is not defined in Dsd.jl")
    return problems


# ------------------------------------------------------------------------------------------
# Tests

def test_every_julia_file_parses_without_errors():
    files = jl_files()
    names = {os.path.relpath(f, JULIA) for f in files}
    assert {"src/LibDsd.jl", "src/Dsd.jl", "ext/DsdCUDAExt.jl", "examples/train_mlp.jl",
            "test/runtests.jl"} <= names, names
    problems = {os.path.relpath(f, JULIA): syntax_errors(read(f)) for f in files}
    assert not any(problems.values()), problems


def test_the_parser_check_catches_broken_julia():
    assert syntax_errors(b"function f(x\n    x +\nend\n")
    assert syntax_errors(b"struct A\n    x::Int32\n")  # missing `end`
    assert not syntax_errors(b"f(x) = x + 1\n")


def test_every_ccall_matches_the_header_and_every_function_is_wrapped():
    assert check_ccalls(read(LIBDSD)) == []
    assert len(wrappers(parse(read(LIBDSD)).root_node)) >= len(header_functions())


@pytest.mark.parametrize("old,new,needle", [
    ("capacity::Csize_t, err", "capacity::Int32, err", "capacity"),         # a wrong width
    ("err::Ptr{Ptr{dsd_error}})::dsd_status\nend\n\n# Releases", "err::Ptr{dsd_error})::dsd_status\nend\n\n# Releases", "err"),
    ("key::Cstring, value::Bool", "value::Bool, key::Cstring", "dsd_state_dict_set_bool"),  # order
    ("@ccall libdsd.dsd_comm_barrier(comm::Ptr{dsd_comm}, err::Ptr{Ptr{dsd_error}})",
     "@ccall libdsd.dsd_comm_barrier(comm::Ptr{dsd_comm})", "dsd_comm_barrier"),  # a lost argument
    ("::UInt32\nend", "::Int32\nend", "dsd_abi_version"),                   # a wrong return type
])
def test_the_signature_check_catches_a_wrong_ccall(old, new, needle):
    source = read(LIBDSD).decode()
    assert old in source, old
    problems = check_ccalls(source.replace(old, new, 1).encode())
    assert any(needle in p for p in problems), problems


def test_the_signature_check_catches_a_missing_wrapper():
    source = read(LIBDSD).decode()
    start = source.index("function dsd_comm_barrier(")
    end = source.index("end\n", start) + 4
    problems = check_ccalls((source[:start] + source[end:]).encode())
    assert any("without a wrapper" in p and "dsd_comm_barrier" in p for p in problems), problems


def test_no_ccall_outside_libdsd():
    for f in jl_files():
        if f != LIBDSD:
            assert plain_ccalls(parse(read(f)).root_node) == [], os.path.relpath(f, REPO)
    assert plain_ccalls(parse(b"x = ccall(:f, Cint, ())\n").root_node)
    assert plain_ccalls(parse(b"@ccall f()::Cint\n").root_node)


def test_constants_typedefs_opaque_and_struct_fields_match_the_header():
    assert check_declarations(read(LIBDSD)) == []


def test_the_declaration_check_catches_a_renumbered_constant_and_a_wrong_field():
    source = read(LIBDSD).decode()
    assert check_declarations(source.replace("const DSD_KIND_DICT = 9", "const DSD_KIND_DICT = 8").encode())
    assert check_declarations(source.replace("const dsd_status = Int32", "const dsd_status = Int64").encode())
    assert check_declarations(source.replace("    reserved::UInt32", "    reserved::Int32").encode())
    assert check_declarations(source.replace("mutable struct dsd_comm end", "struct dsd_comm end").encode())


def test_struct_layouts_equal_the_c_compilers():
    c = c_layouts()
    _, _, hstructs, _, _ = header_decls()
    assert set(c) == set(hstructs), "struct_layout.c must print every struct of the header"
    for name, fields in hstructs.items():
        assert list(c[name][2]) == [f for f, _ in fields], f"struct_layout.c misses fields of {name}"
    assert check_layouts(read(LIBDSD), c) == []


def test_the_layout_check_catches_a_wrong_field_type():
    c = c_layouts()
    source = read(LIBDSD).decode()
    broken = source.replace("    ndim::Csize_t\n    data::Ptr{Cvoid}", "    ndim::Int32\n    data::Ptr{Cvoid}")
    assert broken != source
    assert any("dsd_tensor_info" in p for p in check_layouts(broken.encode(), c))
    broken = source.replace("    thread_count::Int32\n    save_to_lowest_rank::Bool",
                            "    thread_count::Int64\n    save_to_lowest_rank::Bool")
    assert any("dsd_checkpoint_save_options" in p for p in check_layouts(broken.encode(), c))


def test_the_idiomatic_layer_calls_libdsd_functions_that_exist_with_their_arity():
    for f in (DSD, EXT):
        assert check_dsd_calls(read(f)) == [], f
    # Dsd.jl reaches a good part of the ABI through LibDsd, and only through it.
    used = {m for m in re.findall(r"\bL\.(dsd_\w+)\(|checked\(L\.(dsd_\w+)", read(DSD).decode())
            for m in m if m}
    assert len(used) >= 100, sorted(set(header_functions()) - used)


def test_the_arity_check_catches_a_wrong_call():
    assert check_dsd_calls(b"checked(L.dsd_comm_rank, c)\n")
    assert check_dsd_calls(b"checked(L.dsd_comm_rank, c, out, extra)\n")
    assert not check_dsd_calls(b"checked(L.dsd_comm_rank, c, out)\n")
    assert check_dsd_calls(b"L.dsd_state_dict_release(a, b)\n")
    assert check_dsd_calls(b"x = L.DSD_KIND_TUPLE\n")
    assert check_dsd_calls(b"checked(L.dsd_comm_retain, c)\n")  # takes no err


def test_the_example_tests_and_readme_call_only_what_dsd_jl_defines():
    api = defined_names(read(DSD))
    for f in (os.path.join(JULIA, "examples", "train_mlp.jl"), os.path.join(JULIA, "test", "runtests.jl"), EXT):
        assert check_dsd_names(read(f), api) == [], f
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks = re.findall(r"```julia\n(.*?)```", readme, flags=re.S)
    assert blocks, "README.md has no Julia example"
    for block in blocks:
        assert syntax_errors(block.encode()) == [], block
        assert check_dsd_names(block.encode(), api) == [], block
    assert check_dsd_names(b"Dsd.no_such_function(x)\n", api)


def test_libdsd_jl_is_what_the_generator_writes():
    gen = [sys.executable, os.path.join(REPO, "tools", "gen_julia.py"), "--stdout"]
    first = subprocess.run(gen, check=True, capture_output=True).stdout
    second = subprocess.run(gen, check=True, capture_output=True).stdout
    assert first == second, "tools/gen_julia.py is not deterministic"
    if first != read(LIBDSD):
        import difflib
        diff = difflib.unified_diff(read(LIBDSD).decode().splitlines(), first.decode().splitlines(),
                                    "LibDsd.jl (committed)", "LibDsd.jl (generated)", lineterm="")
        pytest.fail("bindings/julia/src/LibDsd.jl differs from what tools/gen_julia.py writes "
                    "from the header: run `.venv/bin/python tools/gen_julia.py`\n" + "\n".join(list(diff)[:60]))


def test_project_toml_declares_what_the_sources_use():
    with open(os.path.join(JULIA, "Project.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["name"] == "Dsd"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", project["uuid"])
    assert project["compat"]["julia"] == "1.9"
    assert project["deps"]["DLPack"] == "53c2dc0f-f7d5-43fd-8906-6c0220547083"
    assert project["weakdeps"]["CUDA"] == "052768ef-5323-5732-b1bb-66c8b64840ba"
    assert project["extensions"] == {"DsdCUDAExt": "CUDA"}
    for ext in project["extensions"]:
        assert re.search(rf"^module {ext}\b", read(os.path.join(JULIA, "ext", ext + ".jl")).decode(), re.M)
    assert re.search(r"^module Dsd\b", read(DSD).decode(), re.M)
    assert 'include("LibDsd.jl")' in read(DSD).decode()
    deps = set(project["deps"])
    for f, allowed in ((DSD, deps), (EXT, deps | set(project["weakdeps"]) | {"Dsd"})):
        used = set(re.findall(r"^\s*(?:using|import)\s+(\w+)", read(f).decode(), flags=re.M))
        assert used <= allowed, (f, used - allowed)


def test_the_c_sequence_names_the_blocks_of_the_example():
    example = read(os.path.join(JULIA, "examples", "train_mlp.jl")).decode()
    sequence = read(os.path.join(HERE, "train_mlp_sequence.c")).decode()
    blocks = lambda s: set(re.findall(r"\[block ([A-Z])\b", s))  # noqa: E731
    assert blocks(example) == set("ABCDEFG"), blocks(example)
    assert blocks(sequence) == blocks(example)
    # Every Julia statement the C program quotes as translated is in the example.
    example_lines = [line.strip() for line in example.splitlines() if line.strip()]
    quoted = re.findall(r"^\s*(?:/\*|\*)\s{3}(\S.*?)\s*(?:\*/)?$", sequence, flags=re.M)
    checked_ = 0
    for q in quoted:
        if not q.startswith(("close(", "Dsd.", "model =", "opt =", "g1 =", "g2 =", "state =",
                             "future =", "resumed =", "msd, osd", "b = ", "a = ", "sync_hyper!",
                             "ok =")):
            continue
        q = q.split(" -> ")[0].split(": ")[0]
        for piece in q.split(";"):
            prefix = piece.split("...")[0].strip()
            if prefix:
                checked_ += 1
                assert any(prefix in line for line in example_lines), (prefix, q)
    assert checked_ >= 20, checked_


# Base and Core functions the Julia sources call (everything else must be defined there).
BASE_FUNCTIONS = {
    "ArgumentError", "Csize_t", "Dict", "Float32", "Float64", "Int", "Int32", "Int64",
    "KeyError", "Ref", "String", "Tuple", "UInt", "UInt32", "abs2", "abspath", "all", "any",
    "append!", "catch_backtrace", "collect", "convert", "copy", "empty!", "enumerate", "error",
    "exit", "fieldnames", "fieldtype", "fill", "finalizer", "foreach", "get", "getfield",
    "include", "isempty", "length", "lock", "map", "max", "merge", "mktempdir", "new", "pairs",
    "pointer", "pointer_from_objref", "print", "println", "prod", "reinterpret", "reshape",
    "rethrow", "reverse", "sin", "sizeof", "sleep", "sqrt", "sum", "throw", "transpose",
    "typeof", "unlock", "unsafe_load", "unsafe_string", "unsafe_wrap", "values", "vec", "yield",
    "zero", "zip", "wait", "close", "isready", "size", "strides", "ndims", "keys", "haskey",
    "push!", "delete!", "joinpath", "occursin", "rand", "view", "Array", "Any", "WeakRef",
}


def undefined_calls(source: bytes, also_defined: set[str] = frozenset()) -> list[str]:
    """Plain calls `f(...)` of names neither defined in the file (functions, structs, consts,
    parameters and locals) nor in BASE_FUNCTIONS: a misspelled helper, a forgotten function."""
    root = parse(source).root_node
    local = defined_names(source) | set(also_defined)
    for sig in nodes(root, "signature"):
        for ident in nodes(sig, "identifier"):
            local.add(text(ident))
    problems = []
    for c in nodes(root, "call_expression"):
        callee = c.named_children[0]
        if callee.type == "identifier" and text(callee) not in local | BASE_FUNCTIONS:
            problems.append(f"line {c.start_point[0] + 1}: {text(callee)}(...) is not defined")
    return problems


def test_julia_sources_call_only_functions_they_define_or_base_has():
    api = defined_names(read(DSD)) | defined_names(read(LIBDSD))
    assert undefined_calls(read(DSD), api) == []
    example = os.path.join(JULIA, "examples", "train_mlp.jl")
    assert undefined_calls(read(example)) == []
    assert undefined_calls(b"function f(x)\n    _hadnle(x)\nend\n")

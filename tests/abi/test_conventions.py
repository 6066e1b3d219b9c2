"""The conventions block at the top of dsd_decls.h, checked on the header itself: every rule a
binding author relies on is tested here, so the header cannot drift from what it promises."""
from __future__ import annotations

import glob
import os
import re

from header_info import REPO, functions, read_decls

FNS = functions()
TEXT = read_decls()

# Roots, by lifetime vocabulary (the header's "Lifetimes" convention).
REFCOUNTED = {"dsd_comm", "dsd_mesh", "dsd_state_dict"}
SINGLE_OWNER = {"dsd_error", "dsd_model", "dsd_optim", "dsd_incompatible_keys", "dsd_future",
                "dsd_async_checkpointer", "dsd_checkpoint_manager"}
HANDLES = {"dsd_tensor", "dsd_layout"}


def declarations_with_comments():
    """(function name, the comment that documents it) in header order. Consecutive
    declarations after one comment share it."""
    out = []
    comment = ""
    pos = 0
    token = re.compile(r"/\*.*?\*/|^[^\n;{}#/]*?\b(dsd_[a-z0-9_]+)\s*\(", re.S | re.M)
    for m in token.finditer(TEXT):
        if m.group(0).startswith("/*"):
            comment = m.group(0)
            continue
        name = m.group(1)
        if name in FNS and not m.group(0).lstrip().startswith("typedef"):
            out.append((name, comment))
        pos = m.end()
    return out


def test_every_function_is_documented_once():
    names = [n for n, _ in declarations_with_comments()]
    assert sorted(set(names)) == sorted(FNS), set(FNS) ^ set(names)


def test_every_fallible_function_lists_its_status_codes():
    missing = []
    for name, comment in declarations_with_comments():
        if FNS[name][0] != "dsd_status" or name == "dsd_error_code":  # a getter, not fallible
            continue
        m = re.search(r"Returns\b(.*)", comment, re.S)
        if not m or not (re.search(r"DSD_E_[A-Z_]+|DSD_OK", m.group(1)) or "common codes" in m.group(1)
                         or re.search(r"the codes of dsd_\w+", m.group(1))):
            missing.append(name)
    assert not missing, f"no 'Returns ...' line with status codes: {missing}"


def test_listed_codes_exist():
    defined = set(re.findall(r"#define (DSD_E_[A-Z_]+) \d+", TEXT)) | {"DSD_OK"}
    used = set(re.findall(r"\b(DSD_E_[A-Z_]+|DSD_OK)\b", TEXT))
    assert used <= defined, used - defined


def test_enumerations_never_use_zero():
    for m in re.finditer(r"#define (DSD_[A-Z0-9_]+) (-?\d+)\b", TEXT):
        name, value = m.group(1), int(m.group(2))
        if name == "DSD_OK" or name.startswith("DSD_ABI_VERSION"):
            continue
        assert value != 0, f"{name} is 0: a zeroed field must never be a meaningful choice"


def test_outputs_come_last_and_are_named_out():
    for name, (ret, params) in FNS.items():
        names = [p for p, _ in params if p != "err"]
        assert not any(p.endswith("_out") for p in names), (name, names)
        outs = [i for i, p in enumerate(names) if p == "out" or p.startswith("out_")]
        if not outs:
            continue
        tail = names[outs[0]:]
        # After the first output: only outputs, and the capacity of an output buffer.
        assert all(p == "out" or p.startswith("out_") or p == "capacity" for p in tail), (name, names)


def test_arrays_are_pointer_then_size_t_length():
    allowed_counts = {"ndim", "count", "capacity", "len"}
    for name, (ret, params) in FNS.items():
        for i, (p, t) in enumerate(params):
            if t == "size_t" and p not in ("index",):
                assert p in allowed_counts, f"{name}: size_t {p} (counts are ndim/count/capacity/len)"
                assert i > 0 and params[i - 1][1].endswith("*"), f"{name}: {p} does not follow a pointer"
            if p in ("ndim", "count", "capacity"):
                assert t == "size_t", f"{name}: {p} is {t}"


def test_ranks_are_int32():
    for name, (ret, params) in FNS.items():
        for p, t in params:
            if p in ("rank", "size") and name.startswith("dsd_comm"):
                assert t == "int32_t", (name, p, t)
            if p == "ranks":
                assert t == "const int32_t*", (name, p, t)
        if name in ("dsd_comm_rank", "dsd_comm_size"):
            assert params[1][1] == "int32_t*"
        if name == "dsd_mesh_ranks":
            assert params[1][1] == "int32_t*"


def test_read_only_calls_take_const_objects():
    readers = re.compile(r"_(count|size|rank|backend|ndim|shape|ranks|device_type|coordinate|key|"
                         r"kind|find|entries|canonical_fqn|latest_step|is_staged|is_done|int_keys|"
                         r"container_kind|equal|flatten|param_group_count)$|_get_")
    for name, (ret, params) in FNS.items():
        if not readers.search(name) or name.startswith(("dsd_get_", "dsd_error_")) or "_set_" in name:
            continue
        p, t = params[0]
        base = t.replace("const ", "").rstrip("*")
        if t.endswith("*") and (base in REFCOUNTED or base in SINGLE_OWNER):
            assert t.startswith("const "), f"{name} reads {p} but takes it as {t}"


def test_one_lifetime_vocabulary_per_root():
    for root in REFCOUNTED:
        assert f"{root}_retain" in FNS and f"{root}_release" in FNS, root
        assert f"{root}_free" not in FNS, root
        assert FNS[f"{root}_retain"] == (f"{root}*", [(FNS[f"{root}_retain"][1][0][0], f"{root}*")])
    for root in SINGLE_OWNER:
        assert f"{root}_free" in FNS, root
        assert f"{root}_retain" not in FNS and f"{root}_release" not in FNS, root
    for h in HANDLES:
        assert f"{h}_retain" in FNS and f"{h}_release" in FNS and f"{h}_free" not in FNS, h
    declared = set(re.findall(r"typedef struct (dsd_[a-z_]+) \1;", TEXT))
    assert declared == REFCOUNTED | SINGLE_OWNER, declared ^ (REFCOUNTED | SINGLE_OWNER)


def test_every_option_struct_has_struct_size_first_and_an_init():
    structs = re.findall(r"typedef struct (dsd_[a-z_]+_options) \{\s*uint32_t struct_size;", TEXT)
    all_options = set(re.findall(r"typedef struct (dsd_[a-z_]+_options) \{", TEXT))
    assert structs and set(structs) == all_options, all_options - set(structs)
    for s in structs:
        assert FNS.get(f"{s}_init") == ("void", [("options", f"{s}*")]), s


def test_struct_size_is_read_by_one_helper():
    # Every options reader goes through capi/src/options.h's read_options(): elsewhere
    # struct_size is only set (by the _init functions).
    offenders = []
    for path in glob.glob(os.path.join(REPO, "capi", "src", "*")):
        if os.path.basename(path) == "options.h":
            continue
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if "struct_size" in line and not re.search(r"->struct_size = sizeof\(", line):
                    offenders.append(f"{os.path.relpath(path, REPO)}:{no}: {line.strip()}")
    assert not offenders, "struct_size read outside read_options():\n" + "\n".join(offenders)
    readers = 0
    for path in glob.glob(os.path.join(REPO, "capi", "src", "*.cpp")):
        with open(path, encoding="utf-8") as f:
            readers += len(re.findall(r"read_options\(", f.read()))
    structs = re.findall(r"typedef struct (dsd_[a-z_]+_options) \{", TEXT)
    assert readers >= len(structs)


def test_err_is_the_last_parameter_of_every_fallible_function():
    for name, (ret, params) in FNS.items():
        if ret == "dsd_status" and name != "dsd_error_code":
            assert params[-1] == ("err", "dsd_error**"), name

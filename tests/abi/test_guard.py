"""Every exported function that can fail runs its body through capi/src/guard.h's guard(),
which turns any error or exception into a status and an error object: no exception ever
crosses the C ABI. (Functions that return dsd_status either call guard() or delegate to
another exported function that does.)"""
import glob
import os
import re

from header_info import REPO, functions

DEF = re.compile(r"^dsd_status (dsd_\w+)\((.*?)\)\s*\{\n(.*?)^\}", re.S | re.M)


def definitions():
    out = {}
    for path in glob.glob(os.path.join(REPO, "capi", "src", "*.cpp")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for name, _, body in DEF.findall(text):
            out[name] = (os.path.basename(path), body)
    return out


def test_every_fallible_function_goes_through_the_guard():
    defs = definitions()
    declared = {n for n, (ret, params) in functions().items() if ret == "dsd_status" and params and params[-1][0] == "err"}
    missing = declared - set(defs)
    assert not missing, f"declared but no definition found by the scan: {sorted(missing)}"
    unguarded = []
    for name in sorted(declared):
        _, body = defs[name]
        first = body.strip().splitlines()[0].strip() if body.strip() else ""
        # The body's own return statement (two-space indent) hands everything to guard().
        if any(line.startswith("  return guard(err,") for line in body.splitlines()):
            continue
        if re.match(r"return dsd_\w+\(", first):
            continue  # delegates to another exported function
        unguarded.append(f"{name} ({defs[name][0]}): {first}")
    assert not unguarded, "exported bodies outside guard():\n" + "\n".join(unguarded)

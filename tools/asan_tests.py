"""Splits the tests of an ASan build for `./run asan`: prints the names of those that run
natively (`native`) or inside a Python process (`python`), from `meson introspect --tests`.

A Python process must have the ASan runtime preloaded before it loads the ASan-built libdsd,
and CPython's one-time allocations are not leaks worth reporting, so the two sets run with
different environments.

    python3 tools/asan_tests.py BUILD_DIR native|python SUITE...
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def runs_python(cmd: list[str]) -> bool:
    exe = os.path.basename(cmd[0])
    return exe.startswith("python") or any(a.endswith(".py") for a in cmd[1:])


def main() -> int:
    build, kind, suites = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    tests = json.loads(subprocess.run(["meson", "introspect", "--tests", build], check=True,
                                      capture_output=True, text=True).stdout)
    for t in tests:
        if suites and not suites.intersection(s.split(":")[-1] for s in t["suite"]):
            continue
        if runs_python(t["cmd"]) == (kind == "python"):
            print(t["name"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

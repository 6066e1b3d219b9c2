"""The built library's ABI equals the committed baseline (capi/abi/libdsd.abi, written by
tools/update-abi-baseline), as libabigail's abidiff sees it: every exported dsd_* function
with its parameter and return types, and every type of the public header with its size and
field offsets. A removed or changed function or a changed public type fails; a function
added deliberately (with capi/dsd.symbols) does not. The C++ core behind the opaque types is
not part of the ABI and is filtered out by capi/abi/dsd.abignore."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from header_info import REPO

LIB = os.environ["DSD_LIBRARY"]
BASELINE = os.path.join(REPO, "capi", "abi", "libdsd.abi")
IGNORE = os.path.join(REPO, "capi", "abi", "dsd.abignore")
HEADERS = os.path.join(REPO, "capi", "include", "dsd")


def abidiff(baseline: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["abidiff", "--no-corpus-path", "--no-added-syms", "--suppressions", IGNORE,
         "--headers-dir2", HEADERS, "--drop-private-types", baseline, os.path.realpath(LIB)],
        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def _need_abidiff():
    if shutil.which("abidiff") is None:
        pytest.fail("abidiff is missing (apt: abigail-tools, which ./run installs)")


def test_the_library_matches_the_committed_abi_baseline():
    r = abidiff(BASELINE)
    assert r.returncode == 0, (
        "the C ABI differs from capi/abi/libdsd.abi (if the change is deliberate and "
        f"compatible, run tools/update-abi-baseline):\n{r.stdout}{r.stderr}")


def test_a_changed_function_is_caught(tmp_path):
    # The check itself: a baseline in which one function took another parameter type.
    with open(BASELINE, encoding="utf-8") as f:
        text = f.read()
    start = text.index("<function-decl name='dsd_tensor_shape'")
    end = text.index("</function-decl>", start)
    decl = text[start:end]
    size_t_param = decl.split("<parameter type-id='")[3].split("'")[0]
    bool_id = text.split("<type-decl name='bool'")[1].split("id='")[1].split("'")[0]
    changed = decl.replace(f"<parameter type-id='{size_t_param}'", f"<parameter type-id='{bool_id}'", 1)
    assert changed != decl
    doctored = tmp_path / "changed.abi"
    doctored.write_text(text[:start] + changed + text[end:], encoding="utf-8")
    r = abidiff(str(doctored))
    assert r.returncode != 0 and "dsd_tensor_shape" in r.stdout, r.stdout + r.stderr


def test_a_removed_function_is_caught(tmp_path):
    with open(BASELINE, encoding="utf-8") as f:
        text = f.read()
    doctored = tmp_path / "removed.abi"
    # A baseline that had one more function than the library exports.
    doctored.write_text(text.replace("dsd_tensor_strides", "dsd_tensor_stridez"), encoding="utf-8")
    r = abidiff(str(doctored))
    assert r.returncode != 0 and "dsd_tensor_stridez" in r.stdout, r.stdout + r.stderr

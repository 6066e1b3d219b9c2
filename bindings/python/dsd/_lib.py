"""Loads libdsd with cffi in ABI mode, from the C header read verbatim.

The library is found, in order: at $DSD_LIBRARY; next to this package (an installed wheel);
in the build tree ($DSD_BUILD_DIR, else <repo>/build). The header is read from next to this
package or from the source tree. Nothing here calls the library: _capi does (and refuses a
library of another ABI major version when it is imported).
"""
from __future__ import annotations

import glob
import os

import cffi

_here = os.path.dirname(os.path.abspath(__file__))
_repo = os.path.abspath(os.path.join(_here, "..", "..", ".."))


def _find_header() -> str:
    for path in (os.path.join(_here, "dsd_decls.h"),
                 os.path.join(_repo, "capi", "include", "dsd", "dsd_decls.h")):
        if os.path.exists(path):
            return path
    raise ImportError("dsd: cannot find dsd_decls.h next to the package or in the source tree")


def _find_library() -> str:
    env = os.environ.get("DSD_LIBRARY")
    if env:
        if not os.path.exists(env):
            raise ImportError(f"dsd: DSD_LIBRARY={env} does not exist")
        return env
    candidates = sorted(glob.glob(os.path.join(_here, "libdsd.so*")))
    build = os.environ.get("DSD_BUILD_DIR", os.path.join(_repo, "build"))
    candidates.append(os.path.join(build, "capi", "libdsd.so"))
    for path in candidates:
        if os.path.exists(path):
            return path
    raise ImportError("dsd: cannot find libdsd.so; build it with ./run build or set DSD_LIBRARY")


ffi = cffi.FFI()
with open(_find_header(), encoding="utf-8") as _f:
    ffi.cdef(_f.read())

library_path = _find_library()
lib = ffi.dlopen(library_path)


"""Loads libdsd with cffi in ABI mode, from the C header read verbatim.

The library is found, in order: at $DSD_LIBRARY; next to this package (an installed wheel);
in the build tree ($DSD_BUILD_DIR, else <repo>/build). The header is read from next to this
package or from the source tree. An installed package's library is loaded only into the
PyTorch release it was built against (_build_info.TORCH_VERSION): libtorch has no stable C++
ABI. Nothing here calls the library: _capi does (and refuses a library of another ABI major
version when it is imported).
"""
from __future__ import annotations

import glob
import importlib.metadata
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
    packaged = sorted(glob.glob(os.path.join(_here, "libdsd.so*")))
    if packaged:
        check_torch_version()
        return packaged[0]
    build = os.environ.get("DSD_BUILD_DIR", os.path.join(_repo, "build"))
    path = os.path.join(build, "capi", "libdsd.so")
    if os.path.exists(path):
        return path
    raise ImportError("dsd: cannot find libdsd.so; build it with ./run build or set DSD_LIBRARY")


def check_torch_version() -> None:
    """ImportError unless the installed PyTorch is the release this package was built against
    (its version without the local part: 2.13.0+cpu and 2.13.0 match). Nothing to check in a
    source tree, which has no _build_info."""
    try:
        from . import _build_info
    except ImportError:
        return
    built = _build_info.TORCH_VERSION
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"dsd {_build_info.VERSION} was built against PyTorch {built}, and this "
                          f"environment has no PyTorch: pip install torch=={built.split('+')[0]}") from None
    if installed.split("+")[0] != built.split("+")[0]:
        raise ImportError(
            f"dsd {_build_info.VERSION} was built against PyTorch {built}, but this environment "
            f"has PyTorch {installed}: libtorch has no stable C++ ABI, so libdsd cannot load into "
            f"another release. Install torch=={built.split('+')[0]}, or rebuild dsd against this "
            "PyTorch: pip install --no-build-isolation --force-reinstall <dsd source directory>")


ffi = cffi.FFI()
with open(_find_header(), encoding="utf-8") as _f:
    ffi.cdef(_f.read())

library_path = _find_library()
lib = ffi.dlopen(library_path)


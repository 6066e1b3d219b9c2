"""`python -m dsd` and the `dsd` console script: run dsd's command-line tool (tools/dsd:
inspect, verify, convert, diff) with the given arguments and return its exit status.

The executable is found as _lib finds the library: $DSD_CLI; next to this package (an
installed wheel: dsd/bin/dsd or dsd/dsd); next to the loaded library (<prefix>/bin/dsd beside
<prefix>/lib, or tools/dsd beside capi/ in a build tree); in the build tree ($DSD_BUILD_DIR,
else <repo>/build)."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from . import _lib

_here = os.path.dirname(os.path.abspath(__file__))


def _candidates() -> list[str]:
    lib_dir = os.path.dirname(os.path.abspath(_lib.library_path))
    build = os.environ.get("DSD_BUILD_DIR", os.path.join(_lib._repo, "build"))
    return [os.path.join(_here, "bin", "dsd"), os.path.join(_here, "dsd"),
            os.path.join(lib_dir, "..", "bin", "dsd"), os.path.join(lib_dir, "..", "tools", "dsd"),
            os.path.join(build, "tools", "dsd")]


def find_cli() -> str:
    """The path of the dsd executable; FileNotFoundError naming the places looked at."""
    env = os.environ.get("DSD_CLI")
    if env:
        if not os.access(env, os.X_OK):
            raise FileNotFoundError(f"dsd: DSD_CLI={env} is not an executable file")
        return env
    tried = _candidates()
    for path in tried:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.normpath(path)
    raise FileNotFoundError("dsd: cannot find the dsd executable (set DSD_CLI, or build it with "
                            "./run build); looked at: " + ", ".join(os.path.normpath(p) for p in tried))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `dsd ARGS...` (argv: the arguments, default sys.argv[1:]) and returns its exit
    status (0 success; verify: 1 damage found; 2 usage; 3 not found; see `dsd --help`); 127
    when the executable cannot be found, 128+N when it died of signal N."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        exe = find_cli()
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 127
    try:
        rc = subprocess.call([exe, *args])
    except KeyboardInterrupt:
        return 130
    return 128 - rc if rc < 0 else rc

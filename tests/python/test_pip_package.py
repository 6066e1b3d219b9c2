"""The pip package (pyproject.toml, meson-python): `pip wheel --no-build-isolation .` builds
libdsd and the executables against this environment's PyTorch; the wheel installs into a fresh
venv outside the repo (its own torch==2.13.0), where `import dsd` loads the library from inside
the package and nothing from the build tree, save/load/verify work, `python -m dsd` and the `dsd`
console script run the CLI, and a mismatched PyTorch is refused at import.

The wheel is built in <repo>/build-wheel (kept between runs; ccache reuses the objects of ./run's
build tree, so a first build costs the links and the cache lookups, not a recompile)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# Variables that would point the installed package at the build tree.
LEAKY = ("DSD_LIBRARY", "DSD_BUILD_DIR", "DSD_CLI", "PYTHONPATH", "PYTHONHOME")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY}
    env.update(extra)
    return env


def run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                             f"stderr:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheelhouse")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
         "--disable-pip-version-check", "-w", str(out),
         f"--config-settings=build-dir={os.path.join(REPO, 'build-wheel')}", REPO],
        timeout=3000, cwd=str(out), env=clean_env(CCACHE_NOHASHDIR="1"))
    wheels = glob.glob(str(out / "dsd-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> str:
    root = str(tmp_path_factory.mktemp("fresh") / "venv")
    assert not root.startswith(REPO + os.sep)
    run([sys.executable, "-m", "venv", root], timeout=300, env=clean_env())
    py = os.path.join(root, "bin", "python")
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0", wheel],
        timeout=1500, env=clean_env())
    return root


def test_wheel_holds_the_library_executables_and_build_info(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for want in ("dsd/__init__.py", "dsd/py.typed", "dsd/dsd_decls.h", "dsd/_build_info.py",
                 "dsd/libdsd.so", "dsd/bin/dsd", "dsd/bin/dsdrun"):
        assert want in names, (want, names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".in")]
    # Every module of the source package (bindings/python/meson.build lists them one by one).
    source = os.path.join(REPO, "bindings", "python", "dsd")
    missing = [f for f in os.listdir(source) if f.endswith(".py") and f"dsd/{f}" not in names]
    assert not missing, f"not in the wheel (add them to bindings/python/meson.build): {missing}"
    info = zipfile.ZipFile(wheel).read("dsd/_build_info.py").decode()
    import torch
    assert f'TORCH_VERSION = "{torch.__version__}"' in info
    # A CPU PyTorch builds a package without CUDA or NCCL.
    assert "NCCL = False" in info


SCRIPT = r"""
import os, sys, torch, dsd
import dsd._build_info as info
pkg = os.path.dirname(dsd.__file__)
assert dsd.library_path.startswith(pkg + os.sep), dsd.library_path
assert info.TORCH_VERSION == torch.__version__, (info.TORCH_VERSION, torch.__version__)
sd = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)},
      "step": 7}
path = sys.argv[1]
dsd.save(sd, path)
out = dsd.load_full(path)
assert torch.equal(out["model.w"] if "model.w" in out else out["model"]["w"], sd["model"]["w"])
target = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.bfloat16)}, "step": 0}
dsd.load(target, path)
assert torch.equal(target["model"]["w"], sd["model"]["w"]) and target["step"] == 7
dsd.verify(path)
# libtorch is the venv's own, found through the library's $ORIGIN-relative run path.
maps = open("/proc/self/maps").read()
libs = {line.split()[-1] for line in maps.splitlines() if "libtorch_cpu.so" in line}
assert libs == {os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")}, libs
print("ok", dsd.version(), info.VERSION)
"""


def test_save_load_in_a_fresh_venv(venv, tmp_path):
    py = os.path.join(venv, "bin", "python")
    ckpt = str(tmp_path / "ckpt")
    p = run([py, "-c", SCRIPT, ckpt], timeout=300, cwd=str(tmp_path), env=clean_env())
    ok, version, built = p.stdout.split()
    assert ok == "ok" and version == built, p.stdout
    # Nothing in the installed binaries points back at the build environment.
    site = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "dsd"))[0]
    for binary, want in ((os.path.join(site, "libdsd.so"), "$ORIGIN/../torch/lib"),
                         (os.path.join(site, "bin", "dsd"), "$ORIGIN/../../torch/lib")):
        dyn = run(["readelf", "-d", binary], timeout=60).stdout
        assert REPO not in dyn, dyn
        assert f"Library runpath: [{want}]" in dyn, dyn
    # The CLI, as `python -m dsd` and as the console script.
    p = run([py, "-m", "dsd", "verify", ckpt], timeout=120, cwd=str(tmp_path), env=clean_env())
    p = run([os.path.join(venv, "bin", "dsd"), "inspect", ckpt], timeout=120, cwd=str(tmp_path),
            env=clean_env())
    assert "model" in p.stdout and "w" in p.stdout, p.stdout
    bad = subprocess.run([os.path.join(venv, "bin", "dsd"), "verify", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120, env=clean_env())
    assert bad.returncode == 3, (bad.returncode, bad.stdout, bad.stderr)


def test_another_torch_release_is_refused_at_import(venv, tmp_path):
    site = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "dsd"))[0]
    info = os.path.join(site, "_build_info.py")
    original = open(info, encoding="utf-8").read()
    try:
        with open(info, "w", encoding="utf-8") as f:
            f.write(re.sub(r'TORCH_VERSION = "[^"]*"', 'TORCH_VERSION = "2.12.0+cpu"', original))
        p = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import dsd"],
                           capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                           env=clean_env())
    finally:
        with open(info, "w", encoding="utf-8") as f:
            f.write(original)
    assert p.returncode != 0
    assert "ImportError" in p.stderr and "built against PyTorch 2.12.0" in p.stderr, p.stderr
    assert "has PyTorch 2.13.0" in p.stderr, p.stderr

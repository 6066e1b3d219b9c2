"""Prints what Meson needs to build against the libtorch inside an installed PyTorch.

One line per fact, `key=value`, so meson.build can read it without a JSON parser.
"""
import os
import sys

try:
    import torch
    import torch.utils
except Exception as exc:  # noqa: BLE001 - report any import failure to meson
    print(f"error=cannot import torch with {sys.executable}: {exc}")
    sys.exit(0)

root = os.path.dirname(torch.__file__)
print(f"version={torch.__version__}")
print(f"include={os.path.join(root, 'include')}")
print(f"include_api={os.path.join(root, 'include', 'torch', 'csrc', 'api', 'include')}")
print(f"libdir={os.path.join(root, 'lib')}")
print(f"cxx11_abi={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"cmake_prefix={torch.utils.cmake_prefix_path}")
print(f"cuda={torch.version.cuda or ''}")
print(f"python={sys.executable}")
try:
    import nvidia.nccl as nccl  # the nvidia-nccl-cu13 wheel
    base = list(nccl.__path__)[0]
    print(f"nccl_root={base}")
except Exception:  # noqa: BLE001
    print("nccl_root=")
